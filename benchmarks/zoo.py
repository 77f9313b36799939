"""Model-zoo benchmark with controls: do the profiles help, against what, and where not?

    python benchmarks/zoo.py --dataset=ml-100k --models=DeepFM,DCN,DCNV2,WideDeep,xDeepFM,AutoInt,FM,NFM --seeds=3
    python benchmarks/zoo.py --dataset=ml-100k --render          # rebuild md/csv/png from the JSONL only
    python benchmarks/zoo.py --dataset=ml-100k --report_only     # only the profile report

Runs the grid models x feature sets x settings x model seeds and writes, in the folder of the dataset and the
resolved ``uip_*`` settings (``results/<dataset>/<settings fingerprint>/``, see ``recbole_uip.benchmarking``):

* ``zoo.jsonl``: one line per finished run (appended as each run ends; a restart skips the runs already there, so
  a killed benchmark loses at most the run in progress);
* ``zoo.md``: mean +- std of AUC and LogLoss per model / feature set / setting, the paired difference to the
  no-profile baseline of the same model and setting with a paired t-test over seeds, UIP against the controls and
  the cheap baselines, and the configuration;
* ``zoo.csv``: every run (seconds, best epoch, threads, ...);
* ``zoo.png``: AUC gain over the baseline per model, feature set and setting (std over seeds as bars);
* ``zoo.meta.json`` (the grid's run record, signature and ID-set granularity) and the folder's ``settings.json``;
* ``profile_report.md``: what the IDs of this inference run mean (usage, NMI with user attributes, typical items
  and genres per ID).

Feature sets (user columns loaded; items always bring their own .item features):
  none          no user features
  own           the dataset's own .user features (ml-100k: age, gender, occupation)
  uip           only the uip_* profile columns
  uip+own       both
  random        random IDs, same number of IDs per column as UIP (control)
  shuffled      the UIP IDs permuted across users (control: same marginals, no link to the user)
  kmeans-attr   k-means over each user's item-attribute histogram of the training split (no LLM); one column
                per profile, each a k-means with its own seed and as many IDs as that profile's codebook
  kmeans-llm    k-means over the bank's user vectors z (from the LLM's item embeddings and the ratings; no
                prompt tuning); one column per profile, seeds as above
  kmeans-ratings  k-means over each user's rating statistics alone (generosity, spread, activity; no item, no LLM)
  kmeans-nollm  k-means over user vectors built like z from genre multi-hots instead of LLM item embeddings
  uip-untrained the bank's untrained control: the same quantiser, with as many E-steps as uip, on the untrained
                encoder (with uip_epochs: 0, the same IDs as uip)
  uip-random-step  the bank's random-direction control: the untrained encoder moved each round by the trained
                encoder's step with random singular vectors (its singular values kept, as far for the users), with
                as many E-steps (isolates the directions the likelihood chose from the mere movement)
Every ID set is written as its own augmented dataset copy through the package's ``write_augmented_dataset``;
``load_col`` decides which user columns a run loads.

Settings:
  standard      user_id is embedded as a feature (as a plain RecBole run)
  id_free       user_id is not a model feature: the user columns are joined into ``.inter`` of a dataset variant
                and user_id is loaded only to make the split (``unused_col``), then dropped. The script asserts
                that every dataset's train/valid/test split equals the plain run's split interaction by interaction
                (item, label, timestamp) and that each interaction carries its own user's feature values.

The profiles are inferred (or reused, when the fingerprint matches) once through ``infer_profiles``; the RecBole
dataset and dataloaders are built once per (feature set, setting) and reused for every model and seed, with the
dataloaders' generators reset before each run exactly as a fresh build would leave them.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import functools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from recbole_uip.bank import FeatureBank
from recbole_uip.benchmarking import (
    RESULTS, append_record, fmt_p, latest_records, paired_test, parse_known_with_overrides, progress_logging, read_records,
    results_dir, run_record, write_settings_json,
)
from recbole_uip.config import UIPSettings
from recbole_uip.ctr_runs import (
    FIRST_MODEL_SEED, MODEL_KEYS_DEFAULT, TRAINING_DEFAULTS, assert_same_split, assert_user_features, build_loaders,
    check_fields, model_dict, prepare_profiles, run_config, run_signature, split_view, train_and_test, training_keys,
)
from recbole_uip.data.atomic import read_atomic
from recbole_uip.feature_sets import (
    RANDOM_IDS_SEED, SHUFFLE_SEED, attribute_vectors, kmeans_columns, own_user_fields, random_ids, shuffled_ids,
    offset_kmeans_columns, weighted_kmeans_columns, write_id_free_copy, write_id_set,
)
from recbole_uip.quick_start import build_config
from recbole_uip.report import (
    attribute_user_vectors, encoder_column_weights, kmeans_ids, profile_report, rating_statistics,
    render_profile_report,
)
from recbole_uip.utils import write_json_atomic

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = "DeepFM,DCN,DCNV2,WideDeep,xDeepFM,AutoInt,FM,NFM"
SETTINGS = ("standard", "id_free")
ZOO_FORMAT = 1                   # bump when the meaning of a run changes (resets what counts as done)

@dataclasses.dataclass(frozen=True)
class FeatureSet:
    """Which ID set's dataset copy a run uses and which user columns it loads."""

    name: str
    id_set: str            # the dataset copy: "uip" (the inferred bank) or a control / baseline ID set
    own: bool              # load the dataset's own .user features
    profiles: bool         # load the uip_* columns (holding this copy's IDs)
    description: str


KMEANS_DRAWS = 3               # kmeans-llm and kmeans-offsets: draw d uses the seeds DRAW_SEED_STEP * (d - 1) + column
DRAW_SEED_STEP = 10


def draw_id_set(base: str, draw: int) -> str:
    """The ID set of k-means draw ``draw`` (1, 2, ...) of ``base``: ``base`` itself for the first."""
    return base if draw == 1 else f"{base}-draw{draw}"


def kmeans_draw(draw: int, clusters, what: str) -> tuple[np.ndarray, str]:
    """k-means draw ``draw`` (1, 2, ...): ``clusters(first_seed)`` with the seeds ``DRAW_SEED_STEP * (draw - 1)``
    + column, and the note that says so."""
    first_seed = DRAW_SEED_STEP * (draw - 1)
    return clusters(first_seed), f"k-means over {what}, seed = " + (f"{first_seed} + " if first_seed else "") + "column"


FEATURE_SETS = {fs.name: fs for fs in [
    FeatureSet("none", "uip", False, False, "no user features"),
    FeatureSet("own", "uip", True, False, "the dataset's own .user features"),
    FeatureSet("uip", "uip", False, True, "UIP profile IDs"),
    FeatureSet("uip+own", "uip", True, True, "UIP profile IDs and the dataset's own features"),
    FeatureSet("random", "random", False, True, "control: random IDs, same number of IDs per column"),
    FeatureSet("shuffled", "shuffled", False, True, "control: UIP IDs permuted across users"),
    FeatureSet("kmeans-attr", "kmeans-attr", False, True, "cheap baseline: k-means over item-attribute histograms"),
    FeatureSet("kmeans-llm", "kmeans-llm", False, True, "cheap baseline: k-means over the LLM's user vectors z"),
    FeatureSet("kmeans-llm-weighted", "kmeans-llm-weighted", False, True,
               "decomposition: k-means over z with each column weighted as the bank's encoder weighs it (the diagonal "
               "of A^T A over its mean, per profile): is what the encoder learnt a weight per column of z?"),
    FeatureSet("kmeans-offsets", "kmeans-offsets", False, True,
               "redraw: k-means over the bank's final offsets A z (the data and metric the bank's IDs were "
               "quantised with, another draw; with the untrained encoder, essentially kmeans-llm)"),
    *(FeatureSet(draw_id_set(name, draw), draw_id_set(name, draw), False, True, f"{name} with k-means draw {draw}")
      for draw in range(2, KMEANS_DRAWS + 1) for name in ("kmeans-llm", "kmeans-offsets")),
    FeatureSet("kmeans-nollm", "kmeans-nollm", False, True,
               "cheap baseline: k-means over the same user vectors built from genre multi-hots instead of LLM item embeddings"),
    FeatureSet("kmeans-ratings", "kmeans-ratings", False, True,
               "cheap baseline: k-means over each user's rating statistics alone (generosity, spread, activity)"),
    FeatureSet("uip-untrained", "uip-untrained", False, True,
               "control: the same quantiser, with as many E-steps, on the untrained start"),
    FeatureSet("uip-random-step", "uip-random-step", False, True,
               "control: the untrained encoder moved each round by the trained encoder's step with random singular "
               "vectors (same singular values, as far for the users), as many E-steps"),
]}
# Comparisons reported next to "vs none": (feature set, reference).
COMPARISONS = [("uip", "shuffled"), ("uip", "random"), ("uip", "kmeans-attr"), ("uip", "kmeans-ratings"), ("uip", "kmeans-nollm"),
               ("uip", "kmeans-llm"), ("uip", "kmeans-llm-weighted"), ("kmeans-llm-weighted", "kmeans-llm"),
               ("uip", "uip-untrained"), ("uip", "uip-random-step"), ("uip-random-step", "uip-untrained"),
               ("kmeans-llm", "uip-untrained"),      # two k-means draws over the same z: how much a draw moves AUC
               # the trained encoder's metric against z's own, draw by draw (the same k-means seeds), then how far
               # each construction's draws spread
               *((draw_id_set("kmeans-offsets", d), draw_id_set("kmeans-llm", d)) for d in range(1, KMEANS_DRAWS + 1)),
               *((draw_id_set(name, d), name) for name in ("kmeans-llm", "kmeans-offsets")
                 for d in range(2, KMEANS_DRAWS + 1)),
               ("uip+own", "own")]


# ============================================================================================ command line
def parse_args(argv=None) -> tuple[argparse.Namespace, dict]:
    """The benchmark's flags, and every other ``--key=value`` as RecBole / ``uip_*`` overrides."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any other --key=value is passed to RecBole / recbole-uip like run_recbole_uip.py does (values are "
               "YAML); uip_* keys change the profiles' fingerprint and therefore recompute them.")
    parser.add_argument("--dataset", default="ml-100k", help="RecBole dataset name (default: ml-100k)")
    parser.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated context-aware models "
                        f"(default: {DEFAULT_MODELS})")
    parser.add_argument("--seeds", type=int, default=3, help="model seeds per cell: 2020, 2021, ... (default: 3)")
    parser.add_argument("--feature_sets", default=",".join(f for f in FEATURE_SETS if "-draw" not in f),
                        help=f"comma-separated subset of {', '.join(FEATURE_SETS)} (default: all but the further "
                             "k-means draws; none is needed for the differences)")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="standard,id_free (default: both)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    for key, value in TRAINING_DEFAULTS.items():
        parser.add_argument(f"--{key}", type=type(value), default=value, help=f"RecBole {key} (default: {value})")
    parser.add_argument("--model_keys", default=json.dumps(MODEL_KEYS_DEFAULT),
                        help="YAML/JSON mapping model -> RecBole keys that replace that model's defaults, e.g. "
                             "'{xDeepFM: {cin_layer_size: [50, 50]}}' (default: %(default)s)")
    parser.add_argument("--render", action="store_true", help="only rebuild md/csv/png from the JSONL")
    parser.add_argument("--report_only", action="store_true",
                        help="only write the profile report (the folder's record and commands are kept)")
    parser.add_argument("--results", default=str(RESULTS),
                        help="the results root (default: the repository's); the grid's folder is "
                             "<root>/<dataset>/<settings fingerprint>/")
    args, overrides = parse_known_with_overrides(parser, argv)
    import yaml

    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.model_keys = yaml.safe_load(args.model_keys) or {}
    if not isinstance(args.model_keys, dict) or not all(isinstance(v, dict) for v in args.model_keys.values()):
        parser.error("--model_keys must map model names to {key: value} mappings")
    args.feature_sets = [f.strip() for f in args.feature_sets.split(",") if f.strip()]
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [f for f in args.feature_sets if f not in FEATURE_SETS] + [s for s in args.settings if s not in SETTINGS]
    if unknown:
        parser.error(f"unknown feature set / setting: {', '.join(unknown)}")
    return args, overrides


def output_paths(folder: Path) -> dict[str, Path]:
    """``<folder>/zoo.*``: the grid's files in its results folder (``results_dir`` of its run record)."""
    paths = {ext: folder / f"zoo.{ext}" for ext in ("jsonl", "md", "csv", "png")}
    paths["notes"] = folder / "zoo_notes.md"
    paths["meta"] = folder / "zoo.meta.json"  # the command line, the ID sets' granularity and the run record
    paths["profile_report"] = folder / "profile_report.md"
    return paths


# ============================================================================================ ID sets
def partition_granularity(columns) -> dict:
    """How finely a user-level feature set splits the users: ``columns`` is ``(U, C)`` (one row per user, any
    hashable values). Returns the number of distinct rows (groups), the entropy of the group sizes in bits, and
    the largest group's share. Without user_id, a finer partition lets a model learn more per-user bias whatever
    the values mean, so controls are only comparable at equal granularity (``shuffled`` keeps UIP's exactly)."""
    rows = ["\x1f".join(map(str, row)) for row in columns]
    _, counts = np.unique(np.array(rows), return_counts=True)
    shares = counts / counts.sum()
    return {"users": len(rows), "groups": int(len(counts)), "entropy_bits": float(-(shares * np.log2(shares)).sum()),
            "largest_share": float(shares.max())}


def id_set_granularity(config, files: dict, bank: FeatureBank, folders: dict[str, Path]) -> dict[str, dict]:
    """:func:`partition_granularity` of every ID set in ``folders`` and of the dataset's own user features,
    over the bank's users (those with training history)."""
    out = {name: partition_granularity(FeatureBank.load(folder / "bank").codes) for name, folder in folders.items()}
    own = own_user_fields(config)
    if own and "user" in files:
        table = read_atomic(files["user"], config["field_separator"], config["encoding"])
        index = [table.fields.index(f) for f in own]
        row_of = {row[table.fields.index(config["USER_ID_FIELD"])]: row for row in table.rows}
        out["own"] = partition_granularity([[row_of.get(u, [""] * len(table.fields))[i] for i in index] for u in bank.users])
    return out


def prepare_id_sets(config, settings: UIPSettings, files: dict, target: Path, bank: FeatureBank,
                    needed: set[str], logger) -> dict[str, Path]:
    """The dataset copy of every needed ID set: ``uip`` is ``target``; the others are written next to it as
    ``<dataset>-uipzoo-<id set>`` (rewritten only when their source bank changed)."""
    sizes = [settings.codebook_sizes[p] for p in bank.profiles]
    folders = {"uip": target}
    builders = {
        "random": lambda: (random_ids(bank, sizes), f"uniform random IDs, seed {RANDOM_IDS_SEED}"),
        "shuffled": lambda: (shuffled_ids(bank), f"UIP IDs permuted across users, seed {SHUFFLE_SEED}"),
        "kmeans-attr": lambda: (kmeans_columns(attribute_vectors(config, settings, bank)[0], sizes),
                                "k-means over item-attribute histograms of the training split, seed = column"),
        "kmeans-llm-weighted": lambda: (
            weighted_kmeans_columns(bank.summaries, encoder_column_weights(bank.encoder.weights), sizes),
            "k-means over the bank's user vectors z, each column weighted as the bank's encoder weighs it, seed = column"),
        # every k-means draw of z (no prompt tuning) and of the bank's final offsets A z
        **{draw_id_set("kmeans-llm", d): functools.partial(
               kmeans_draw, d, lambda seed: kmeans_columns(bank.summaries, sizes, seed),
               "the bank's user vectors z (LLM item embeddings, no prompt tuning)")
           for d in range(1, KMEANS_DRAWS + 1)},
        **{draw_id_set("kmeans-offsets", d): functools.partial(
               kmeans_draw, d, lambda seed: offset_kmeans_columns(bank.offsets, sizes, seed),
               "the bank's final offsets A z")
           for d in range(1, KMEANS_DRAWS + 1)},
        "kmeans-nollm": lambda: (kmeans_columns(attribute_user_vectors(config, settings, bank.users), sizes),
                                 "k-means over the encoder's user vectors built from genre multi-hots (no LLM), seed = column"),
        "kmeans-ratings": lambda: (kmeans_columns(rating_statistics(config, settings, bank.users), sizes),
                                   "k-means over the users' rating statistics (generosity, spread, activity), seed = column"),
        "uip-untrained": lambda: (bank.initial_codes,
                                  "the bank's untrained control: the same quantiser, with as many E-steps, on the "
                                  "untrained starting point"),
        "uip-random-step": lambda: (bank.random_step_codes,
                                    "the bank's random-direction control: the untrained encoder moved each round by the "
                                    "trained encoder's step with random singular vectors, as many E-steps"),
    }
    for id_set in sorted(needed - {"uip"}):
        folder = target.parent / f"{config['dataset']}-uipzoo-{id_set}"

        def build(id_set=id_set):
            euclidean_only = id_set == "kmeans-llm-weighted" or id_set.startswith("kmeans-offsets")
            if euclidean_only and settings.quantiser_metric != "euclidean":
                raise ValueError(f"uip_quantiser_metric: {settings.quantiser_metric} measures the offsets along "
                                 "their own principal directions, so neither the encoder's column weights nor the "
                                 f"offsets' Euclidean distances are what the codebooks weigh: {id_set} needs the "
                                 "euclidean metric.")
            if id_set == "kmeans-llm-weighted" and (bank.summaries is None or bank.encoder is None):
                raise ValueError("The bank holds no encoder (uip_encoder: none): the kmeans-llm-weighted "
                                 "decomposition cannot be built.")
            if id_set.startswith("kmeans-offsets") and bank.offsets is None:
                raise ValueError("The bank holds no offsets: the kmeans-offsets redraws cannot be built.")
            if id_set.startswith("kmeans-llm") and bank.summaries is None:
                raise ValueError("The bank holds no LLM summaries: the kmeans-llm baseline cannot be built.")
            if id_set == "uip-untrained" and bank.initial_codes is None:
                raise ValueError("The bank holds no initial codes: the untrained control cannot be built.")
            if id_set == "uip-random-step" and bank.random_step_codes is None:
                raise ValueError("The bank holds no random-direction control (a bank of format 5 or earlier, free "
                                 "per-user tokens, or no encoder): infer the profiles again with uip_encoder: linear.")
            return builders[id_set]()

        if write_id_set(config, settings, files, bank, id_set, folder, build):
            logger.info(f"zoo: wrote the {id_set} IDs to {folder}")
        folders[id_set] = folder
    return folders


# ============================================================================================ configs and data
def user_columns(feature_set: FeatureSet, own: list[str], settings: UIPSettings) -> list[str]:
    return (own if feature_set.own else []) + (list(settings.field_names) if feature_set.profiles else [])


def run_key(record: dict) -> tuple:
    return record["signature"], record["model"], record["feature_set"], record["setting"], record["seed"]


# ============================================================================================ the grid
def write_profile_report(config, settings, files, bank: FeatureBank, path: Path, header: str) -> None:
    """The profile report of this inference run, with the cheap baselines' IDs alongside for reference."""
    sizes = [settings.codebook_sizes[p] for p in bank.profiles]
    vectors, field = attribute_vectors(config, settings, bank)
    groupings = {f"k-means over {field} histograms (no LLM), seed 0": (kmeans_ids(vectors, sizes[0], seed=0), sizes[0])}
    if bank.summaries is not None:
        groupings["k-means over the bank's user vectors z (no prompt tuning), seed 0"] = (kmeans_ids(bank.summaries, sizes[0], seed=0), sizes[0])
    user_table = read_atomic(files["user"], config["field_separator"], config["encoding"]) if "user" in files else None
    item_table = read_atomic(files["item"], config["field_separator"], config["encoding"]) if "item" in files else None
    report = profile_report(config, settings, bank, user_table, item_table, groupings)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_profile_report(report, header), encoding="utf-8")


def run_grid(args, overrides: dict, paths: dict, logger) -> None:
    """Every (setting, feature set, model, seed) not yet in the JSONL; each run appended as it finishes."""
    model_bases = {m: build_config(m, args.dataset, None, {**model_dict(args, m, overrides), "uip": True})
                   for m in args.models}
    for model_base in model_bases.values():
        check_context_model(model_base)
    base, settings, files, target, bank = prepare_profiles(args, overrides, logger)
    signature = run_signature(args, overrides, bank, ZOO_FORMAT)
    write_profile_report(base, settings, files, bank, paths["profile_report"], report_header(args))
    logger.info(f"zoo: profile report written to {paths['profile_report']}")
    done = {run_key(r) for r in read_records(paths["jsonl"])}
    feature_sets = [FEATURE_SETS[name] for name in args.feature_sets]
    seeds = [FIRST_MODEL_SEED + i for i in range(args.seeds)]
    todo = [(s, fs, m, seed) for s in args.settings for fs in feature_sets for m in args.models for seed in seeds
            if (signature, m, fs.name, s, seed) not in done]
    logger.info(f"zoo: {len(todo)} runs to do, {len(args.settings) * len(feature_sets) * len(args.models) * len(seeds) - len(todo)} already done "
                f"(signature {signature})")
    folders = prepare_id_sets(base, settings, files, target, bank, {fs.id_set for fs in feature_sets}, logger)
    # every command that added runs of this signature (e.g. the id_free grid, then the standard one), in order
    meta = grid_meta(paths, signature)
    previous = meta.get("commands") or ([meta["command"]] if meta.get("command") else [])
    command = "python " + " ".join(args.record["command"])          # portable: no machine paths
    write_json_atomic(paths["meta"], {"signature": signature, "bank": bank.fingerprint[:12],
                                      "commands": previous + [command] * (command not in previous),
                                      # every ID set any command of this grid used, not only this command's
                                      "granularity": {**meta.get("granularity", {}),
                                                      **id_set_granularity(base, files, bank, folders)},
                                      "record": args.record})
    if not todo:
        return

    # The plain run's split (the dataset the users run without --uip): every dataset below must reproduce it.
    plain = build_config(args.models[0], args.dataset, None, {**overrides, **training_keys(args)})
    plain_dataset, plain_loaders = build_loaders(plain)
    reference = split_view(plain_dataset, plain_loaders)
    del plain_dataset, plain_loaders

    own = own_user_fields(base)
    finished = 0
    for setting in args.settings:
        for fs in feature_sets:
            cell_runs = [(m, seed) for (s, f, m, seed) in todo if s == setting and f is fs]
            if not cell_runs:
                continue
            folder = folders[fs.id_set]
            if setting == "id_free":
                folder = write_id_free_copy(base, folder, folder.parent / f"{args.dataset}-uipzoo-{fs.id_set}-idfree")
            columns = user_columns(fs, own, settings)
            start = time.perf_counter()
            data_config = run_config(model_bases[args.models[0]], settings, folder, columns, setting,
                                     model_dict(args, args.models[0], overrides))
            dataset, loaders = build_loaders(data_config)
            label = f"{fs.name}/{setting}"
            view = split_view(dataset, loaders)
            assert_same_split(reference, view, label)
            assert_user_features(reference, dataset, loaders, folder, columns, setting, base, label)
            logger.info(f"zoo: {label}: dataset built and checked in {time.perf_counter() - start:.1f}s "
                        f"(same split as the plain run; user columns {columns or 'none'}; user_id "
                        f"{'embedded' if setting == 'standard' else 'not a feature'})")
            for model in args.models:
                seeds_left = [seed for (m, seed) in cell_runs if m == model]
                if not seeds_left:
                    continue
                config = run_config(model_bases[model], settings, folder, columns, setting, model_dict(args, model, overrides))
                check_fields(config, dataset, columns, setting)
                for seed in seeds_left:
                    result = train_and_test(config, loaders, seed)
                    record = {"signature": signature, "dataset": args.dataset, "model": model, "feature_set": fs.name,
                              "setting": setting, "seed": seed, "user_columns": columns, **result,
                              "llm": settings.llm, "bank": bank.fingerprint[:12],
                              "threads": torch.get_num_threads(), **training_keys(args),
                              "model_keys": args.model_keys.get(model, {}),
                              "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
                    append_record(paths["jsonl"], record)
                    finished += 1
                    logger.info(f"zoo [{finished}/{len(todo)}] {model} {fs.name} {setting} seed {seed}: "
                                f"AUC {result['auc']:.4f} LogLoss {result['logloss']:.4f} best epoch "
                                f"{result['best_epoch']}/{result['epochs_run']} {result['seconds']:.1f}s")


def check_context_model(config) -> None:
    """The zoo compares context-aware (CTR) models: they embed every loaded user and interaction token field, which
    both settings rely on. Other models are refused with a clear message."""
    from recbole.utils import ModelType

    if config["MODEL_TYPE"] != ModelType.CONTEXT:
        raise ValueError(f"{config['model']} is a {config['MODEL_TYPE'].name.lower()} model; the zoo benchmark runs "
                         "context-aware models (DeepFM, DCN, DCNV2, WideDeep, xDeepFM, AutoInt, FM, NFM, ...). "
                         "benchmarks/sequential.py covers sequential models.")


# ============================================================================================ summaries
def by_cell(records: list[dict]) -> dict[tuple, dict[int, dict]]:
    """``{(setting, model, feature_set): {seed: record}}``."""
    cells: dict[tuple, dict[int, dict]] = {}
    for r in records:
        cells.setdefault((r["setting"], r["model"], r["feature_set"]), {})[r["seed"]] = r
    return cells


def compare(cells: dict, setting: str, model: str, a: str, b: str, metric: str):
    """Paired difference of ``metric`` between feature sets ``a`` and ``b`` over the seeds both have."""
    ra, rb = cells.get((setting, model, a), {}), cells.get((setting, model, b), {})
    seeds = sorted(set(ra) & set(rb))
    if not seeds:
        return None
    return (*paired_test([ra[s][metric] for s in seeds], [rb[s][metric] for s in seeds]), len(seeds))


def render(records: list[dict], args, paths: dict) -> None:
    """Write md, csv and png from the records of one signature."""
    write_csv(records, paths["csv"])
    plot_gains(records, paths["png"], caption_lines(records, args))
    paths["md"].write_text(render_markdown(records, args, paths), encoding="utf-8")


def write_csv(records: list[dict], path: Path) -> None:
    columns = ["dataset", "model", "feature_set", "setting", "seed", "auc", "logloss", "valid_auc", "valid_logloss",
               "best_epoch", "epochs_run", "epochs_cap", "cap_hit", "seconds", "threads", "train_batch_size",
               "learning_rate", "stopping_step", "eval_batch_size", "user_columns", "finished_at", "signature"]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in sorted(records, key=lambda r: (r["setting"], r["model"], list(FEATURE_SETS).index(r["feature_set"]), r["seed"])):
            writer.writerow({**r, "user_columns": " ".join(r.get("user_columns", []))})


def caption_lines(records: list[dict], args) -> list[str]:
    r = records[0]
    dates = sorted(x["finished_at"][:10] for x in records)
    return [f"{r['dataset']}, labeled CTR split RS 8:1:1 (RO, seed 2020), {len({x['seed'] for x in records})} model seeds; "
            f"runs {dates[0]}..{dates[-1]}",
            f"{r['threads']} torch thread(s); batch {r['train_batch_size']}, Adam lr {r['learning_rate']}, early stopping "
            f"on valid AUC (patience {r['stopping_step']}, cap {r['epochs_cap']}); RecBole model defaults"
            f"{' except ' + ', '.join(sorted({x['model'] for x in records if x.get('model_keys')})) + ' (see md)' if any(x.get('model_keys') for x in records) else ''}; "
            f"LLM {r.get('llm')}, bank {r.get('bank')}"]


def plot_gains(records: list[dict], path: Path, caption: list[str]) -> None:
    """Bars: AUC of each feature set minus the same model's 'none' AUC (paired over seeds), error bars = std of the
    paired difference over seeds; one panel per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = by_cell(records)
    settings = [s for s in SETTINGS if any(k[0] == s for k in cells)]
    models = list(dict.fromkeys(r["model"] for r in records))
    sets = [f for f in FEATURE_SETS if f != "none" and any(k[2] == f for k in cells)]
    fig, axes = plt.subplots(len(settings), 1, figsize=(max(10, 1.4 * len(models) + 3), 4.2 * len(settings)),
                             squeeze=False)
    width = 0.8 / max(len(sets), 1)
    colours = plt.get_cmap("tab10")
    for ax, setting in zip(axes[:, 0], settings):
        for j, fs in enumerate(sets):
            means, stds = [], []
            for model in models:
                c = compare(cells, setting, model, fs, "none", "auc")
                means.append(c[0] if c else np.nan)
                stds.append(c[1] if c and c[1] == c[1] else 0.0)
            x = np.arange(len(models)) + (j - (len(sets) - 1) / 2) * width
            ax.bar(x, means, width, yerr=stds, capsize=2, label=fs, color=colours(j))
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(np.arange(len(models)))
        ax.set_xticklabels(models)
        ax.set_ylabel("test AUC - AUC without user features")
        ax.set_title(f"setting: {setting} ({'user_id embedded' if setting == 'standard' else 'no user_id feature'})")
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(ncol=min(len(sets), 7), fontsize=8, loc="upper left", bbox_to_anchor=(0, 1.25))
    fig.text(0.01, 0.005, "\n".join(caption), fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render_markdown(records: list[dict], args, paths: dict) -> str:
    cells = by_cell(records)
    settings = [s for s in SETTINGS if any(k[0] == s for k in cells)]
    models = list(dict.fromkeys(r["model"] for r in sorted(records, key=lambda r: args.models.index(r["model"])
                                                               if r["model"] in args.models else 99)))
    sets = [f for f in FEATURE_SETS if any(k[2] == f for k in cells)]
    r0 = records[0]
    seconds = sum(r["seconds"] for r in records)
    first = min(r["finished_at"] for r in records)
    last = max(r["finished_at"] for r in records)
    command = [("dataset", r0["dataset"]), ("models", ",".join(models)), ("seeds", len({r["seed"] for r in records}))]
    command += [(k, r0[k]) for k, v in TRAINING_DEFAULTS.items() if r0.get(k) != v]
    meta = grid_meta(paths, records[0]["signature"])
    produced_by = meta.get("commands") or [meta.get("command") or (
        "python benchmarks/zoo.py " + " ".join(f"--{k}={v}" for k, v in command))]
    lines = [f"# Model zoo on {r0['dataset']}: profiles vs controls and cheap baselines", "",
             "Produced by " + " and ".join(f"`{c}`" for c in produced_by) + " "
             f"(`--render` rebuilds this file from `{paths['jsonl'].name}`).", "", "## Configuration", ""]
    split = args.record["split"]
    lines += [f"- **Dataset and split**: {r0['dataset']}, RecBole 1.2.1 context-aware defaults: labeled mode, the label "
              f"from the dataset preset's threshold, `eval_args` {split['eval_args']} (the split of {split['model']}) with "
              f"the split seed {split['seed']} fixed for every run; the model seed (initialisation, dropout) varies: "
              f"{sorted({r['seed'] for r in records})}. Every dataset is asserted to reproduce the plain run's "
              "train/valid/test split interaction by interaction, and every interaction to carry its own user's "
              "feature values.",
              f"- **Training**: Adam, learning rate {r0['learning_rate']}, train batch {r0['train_batch_size']}, eval "
              f"batch {r0['eval_batch_size']}, early stopping on validation AUC with patience {r0['stopping_step']} "
              f"epochs, at most {r0['epochs_cap']} epochs (cap hit in {sum(r['cap_hit'] for r in records)} of "
              f"{len(records)} runs), the best-validation checkpoint is tested. Model hyper-parameters are RecBole's "
              "defaults for each model (embedding size, MLP sizes, dropout, ...)" + model_keys_text(records) + ".",
              f"- **Machine**: {r0['threads']} torch thread(s) per run, {args.record['device']} ({args.record['cpu']}, "
              f"{args.record['cpu_count']} cores visible), torch {args.record['torch']}; seconds are wall-clock per run (training + validation + test) and depend on "
              "other load on the machine. "
              f"Sum of run times {seconds / 60:.1f} min; runs finished between {first} and {last} (UTC).",
              f"- **Profiles**: {profile_line(args)}",
              "- **Feature sets**: " + "; ".join(f"`{fs.name}`: {fs.description}" for fs in FEATURE_SETS.values()) + ". "
              "User columns loaded: " + "; ".join(f"`{fs}`: {', '.join(columns_of(records, fs)) or '-'}" for fs in sets)
              + ". Every run also loads the item features the dataset's `load_col` names. "
              "Random IDs: uniform, seed 0. Shuffled: UIP rows permuted across users (seed 12345). k-means baselines: "
              "one k-means per profile column with as many clusters as that profile's codebook (seed = column index; "
              "the two columns differ only by their k-means++ start); attribute histograms are the user's genre shares "
              "in the training split; the LLM vectors are the bank's encoder inputs z; rating statistics are each user's "
              "generosity, spread of ratings and activity; the no-LLM vectors are z built from genre multi-hots.",
              "- **Settings**: `standard`: user_id embedded as a feature (as in a plain RecBole run); `id_free`: user_id "
              "is not a model feature: the user columns are joined into `.inter` of a dataset variant, user_id is "
              "loaded only to make the (identical) split and dropped by `unused_col` before training.",
              "- **Statistics**: mean +- std over model seeds; differences are paired by seed (same model, setting and "
              "seed); p = paired t-test over the seeds (with 3 seeds, 2 degrees of freedom: it measures the "
              "difference against initialisation noise only, not against another split or dataset). Many comparisons "
              "are made: at p < 0.05 about 1 in 20 null comparisons comes out 'significant' by chance."]
    lines += ["", "## Summary", ""] + summary_lines(cells, settings, models)
    lines += granularity_lines(paths, records)
    if paths["notes"].is_file():
        lines += ["", "## Discussion", "", paths["notes"].read_text(encoding="utf-8").strip()]
    lines += ["", f"![AUC gains]({paths['png'].name})", ""]
    for setting in settings:
        lines += ["", f"## Results, setting `{setting}`", "",
                  "ΔAUC / ΔLogLoss: paired difference to `none` (same model, setting, seed); p: paired t-test. "
                  "Lower LogLoss is better. Epochs: best epoch (mean) / epochs run (mean).", "",
                  "| model | features | AUC | ΔAUC (p) | LogLoss | ΔLogLoss (p) | epochs | s/run | runs |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for model in models:
            for fs in sets:
                runs = list(cells.get((setting, model, fs), {}).values())
                if not runs:
                    continue
                auc = np.array([r["auc"] for r in runs])
                ll = np.array([r["logloss"] for r in runs])
                vs_none = (lambda metric: "-" if fs == "none" else diff_text(compare(cells, setting, model, fs, "none", metric)))
                cells_text = [f"{auc.mean():.4f} ± {std(auc):.4f}", vs_none("auc"),
                              f"{ll.mean():.4f} ± {std(ll):.4f}", vs_none("logloss"),
                              f"{np.mean([r['best_epoch'] for r in runs]):.1f} / {np.mean([r['epochs_run'] for r in runs]):.1f}",
                              f"{np.mean([r['seconds'] for r in runs]):.0f}", str(len(runs))]
                lines.append(f"| {model} | {fs} | " + " | ".join(cells_text) + " |")
        lines += ["", f"### UIP against the controls and the cheap baselines (`{setting}`)", "",
                  "Paired ΔAUC (p); a positive value means the first feature set is better.", "",
                  "| model | " + " | ".join(f"{a} − {b}" for a, b in COMPARISONS) + " |",
                  "|---|" + "---|" * len(COMPARISONS)]
        for model in models:
            lines.append(f"| {model} | " + " | ".join(diff_text(compare(cells, setting, model, a, b, "auc"))
                                                      for a, b in COMPARISONS) + " |")
    return "\n".join(lines) + "\n"


def grid_meta(paths: dict, signature: str) -> dict:
    """What the grid run wrote beside the JSONL (commands, ID-set granularity, run record), if it is the grid of
    ``signature`` (the runs'), else ``{}``."""
    try:
        data = json.loads(paths["meta"].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if data.get("signature") == signature else {}


def granularity_lines(paths: dict, records: list[dict]) -> list[str]:
    """The table of how finely each ID set splits the users (written by the grid run beside the JSONL)."""
    data = grid_meta(paths, records[0]["signature"])
    if not data.get("granularity"):
        return []
    lines = ["", "### How finely each feature set splits the users", "",
             "Computed over the users with training history, from the ID sets this grid used. Without user_id, a "
             "partition carries per-group bias whatever its values mean, and the finer it is, the closer it comes to "
             "a user ID. So `random` (independent uniform columns, usually finer than UIP; compare the rows below) is "
             "not a no-information control in the `id_free` setting; `shuffled` has exactly UIP's groups and sizes "
             "and is the control that isolates what the IDs say about their users.", "",
             "| feature set | groups (distinct value combinations) | entropy of group sizes (bits) | largest group |",
             "|---|---|---|---|"]
    order = list(FEATURE_SETS)
    for name in sorted(data["granularity"], key=lambda n: order.index(n) if n in order else len(order)):
        g = data["granularity"][name]
        lines.append(f"| {name} | {g['groups']} of {g['users']} users | {g['entropy_bits']:.2f} | "
                     f"{g['largest_share']:.1%} |")
    return lines


def columns_of(records: list[dict], feature_set: str) -> list[str]:
    """The user columns the runs of ``feature_set`` loaded (as recorded)."""
    return next((r["user_columns"] for r in records if r["feature_set"] == feature_set), [])


def model_keys_text(records: list[dict]) -> str:
    """', except: <model> <keys>' for models whose RecBole defaults were replaced (benchmark sizes)."""
    changed = {}
    for r in records:
        if r.get("model_keys"):
            changed[r["model"]] = r["model_keys"]
    if not changed:
        return ""
    return ", except (to fit the grid's time budget): " + "; ".join(
        f"{model} " + ", ".join(f"`{k}: {v}`" for k, v in keys.items()) for model, keys in changed.items())


def std(values: np.ndarray) -> float:
    return float(values.std(ddof=1)) if len(values) > 1 else 0.0


def diff_text(comparison) -> str:
    if comparison is None:
        return "-"
    mean, _, p, _ = comparison
    return f"{mean:+.4f} ({fmt_p(p)})"


def summary_lines(cells: dict, settings: list[str], models: list[str]) -> list[str]:
    """Per setting and comparison: the mean paired ΔAUC over models, a t-test over the per-model mean differences,
    and in which models the difference is significant at p < 0.05 (per-model paired t-test over seeds)."""
    from scipy import stats

    lines = ["Generated from the runs below (no hand-entered numbers). Per comparison A − B: the mean over models of "
             "the paired ΔAUC (and ΔLogLoss, where negative is better), a one-sample t-test over the per-model mean "
             "ΔAUC (models as replicates), how many models have ΔAUC > 0, and the models where the per-model paired "
             "t-test over seeds gives p < 0.05.", ""]
    pairs = [("uip", "none"), ("own", "none"), ("uip+own", "none")] + COMPARISONS
    for setting in settings:
        lines += [f"**{setting}**", "", "| A − B | mean ΔAUC | p over models | ΔAUC > 0 in | A better at p < 0.05 | "
                  "A worse at p < 0.05 | mean ΔLogLoss |", "|---|---|---|---|---|---|---|"]
        for a, b in pairs:
            results = {m: compare(cells, setting, m, a, b, "auc") for m in models}
            results = {m: c for m, c in results.items() if c is not None}
            if not results:
                continue
            means = np.array([c[0] for c in results.values()])
            p_models = float(stats.ttest_1samp(means, 0).pvalue) if len(means) > 1 and np.ptp(means) > 0 else float("nan")
            better = [m for m, c in results.items() if c[0] > 0 and c[2] < 0.05]
            worse = [m for m, c in results.items() if c[0] < 0 and c[2] < 0.05]
            logloss = [c[0] for m in results if (c := compare(cells, setting, m, a, b, "logloss")) is not None]
            lines.append(f"| {a} − {b} | {means.mean():+.4f} | {fmt_p(p_models)} | {(means > 0).sum()}/{len(means)} | "
                         f"{', '.join(better) or '-'} | {', '.join(worse) or '-'} | {np.mean(logloss):+.4f} |")
        lines.append("")
    return lines


def profile_line(args) -> str:
    return getattr(args, "profile_line", "see the profile report")


def report_header(args) -> str:
    """Where the profile report comes from (its own first lines describe the inference run)."""
    return (f"Written by `python benchmarks/zoo.py --dataset={args.dataset}` (also `--report_only`) on "
            f"{dt.datetime.now(dt.timezone.utc).date().isoformat()} (UTC); the IDs are the ones the zoo benchmark "
            f"trains on. The two k-means rows are the cheap baselines' first columns (seed 0), for reference.")


# ============================================================================================ main
def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides.setdefault("uip_num_threads", args.threads)
    # one folder per process: RecBole names checkpoints by model and second, so two runs would share a file
    overrides.setdefault("checkpoint_dir", str(ROOT / "saved" / f"zoo-{args.dataset}-{os.getpid()}"))
    config = build_config(args.models[0], args.dataset, None, {**overrides, "uip": True})
    command = ["benchmarks/zoo.py", *args.argv]
    record = run_record(config, UIPSettings.from_config(config), command)
    paths = output_paths(results_dir(record, Path(args.results)))
    paths["jsonl"].parent.mkdir(parents=True, exist_ok=True)
    # one profile folder per setting: two grids with other settings must never write the same <dataset>-uip/ copy
    overrides.setdefault("uip_output_dir", str(Path("dataset") / f"zoo-{paths['jsonl'].parent.name}"))

    # the folder's resolved settings and portable command (no machine paths), kept in zoo.meta.json and summed up in
    # settings.json; --render and --report_only keep the grid's record (they only redraw what it made)
    meta = json.loads(paths["meta"].read_text(encoding="utf-8")) if paths["meta"].is_file() else {}
    redraw = args.render or args.report_only
    args.record = (meta.get("record") if redraw else None) or record
    if not redraw or "record" not in meta:
        write_json_atomic(paths["meta"], {**meta, "record": args.record})
    write_settings_json(paths["meta"].parent)
    if not args.render:
        logger = progress_logging(config)
        if args.report_only:
            base, settings, files, _, bank = prepare_profiles(args, overrides, logger)
            write_profile_report(base, settings, files, bank, paths["profile_report"], report_header(args))
            print(paths["profile_report"])
            return 0
        start = time.perf_counter()
        run_grid(args, overrides, paths, logger)
        logger.info(f"zoo: grid finished in {(time.perf_counter() - start) / 60:.1f} min of wall time this session")
    records = read_records(paths["jsonl"])
    if not records:
        print(f"No runs in {paths['jsonl']}.")
        return 1
    current = latest_records(records)
    if len(current) < len(records):
        print(f"Rendering the {len(current)} runs of signature {current[0]['signature']}; "
              f"{len(records) - len(current)} older runs ignored.")
    args.profile_line = profile_summary(paths)
    render(current, args, paths)
    print(f"Wrote {paths['md']}, {paths['csv']}, {paths['png']}")
    return 0


def profile_summary(paths: dict) -> str:
    """The configuration line of the profile report, if it was written."""
    if not paths["profile_report"].is_file():
        return "see the profile report"
    lines = paths["profile_report"].read_text(encoding="utf-8").splitlines()
    line = next((l for l in lines if l.startswith("LLM `")), "")
    return f"{line} Details: [`{paths['profile_report'].name}`]({paths['profile_report'].name})."


if __name__ == "__main__":
    sys.exit(main())
