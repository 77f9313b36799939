"""Model-zoo benchmark with controls: do the profiles help, against what, and where not?

    python benchmarks/zoo.py --dataset=ml-100k --models=DeepFM,DCN,DCNV2,WideDeep,xDeepFM,AutoInt,FM,NFM --seeds=3
    python benchmarks/zoo.py --dataset=ml-100k --render          # rebuild md/csv/png from the JSONL only
    python benchmarks/zoo.py --dataset=ml-100k --report_only     # only the profile report

Runs the grid models x feature sets x settings x model seeds and writes, under results/:

* ``zoo_<dataset>.jsonl``: one line per finished run (appended as each run ends; a restart skips the runs already
  there, so a killed benchmark loses at most the run in progress);
* ``zoo_<dataset>.md``: mean +- std of AUC and LogLoss per model / feature set / setting, the paired difference
  to the no-profile baseline of the same model and setting with a paired t-test over seeds, UIP against the
  controls and the cheap baselines, and the configuration;
* ``zoo_<dataset>.csv``: every run (seconds, best epoch, threads, ...);
* ``zoo_<dataset>.png``: AUC gain over the baseline per model, feature set and setting (std over seeds as bars);
* ``profile_report_<dataset>.md``: what the IDs of this inference run mean (usage, NMI with user attributes,
  typical items and genres per ID).

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
  uip-untrained the bank's first E-step: the same quantiser on the untrained encoder (with uip_epochs: 0, the
                same IDs as uip)
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
import json
import logging
import os
import platform
import sys
import time
from logging import getLogger
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recbole_uip.bank import FeatureBank  # noqa: E402
from recbole_uip.benchmarking import paired_test, parse_known_with_overrides, results_dir, run_record  # noqa: E402
from recbole_uip.compat import patch_recbole_checkpoint_loading  # noqa: E402
from recbole_uip.config import UIPSettings  # noqa: E402
from recbole_uip.data.atomic import MANIFEST_NAME, publish_directory, read_atomic  # noqa: E402
from recbole_uip.quick_start import (  # noqa: E402
    augmented_config, build_config, check_dataset_files, infer_profiles, write_augmented_dataset,
)
from recbole_uip.model.fusion import model_class_for_run  # noqa: E402
from recbole_uip.report import (  # noqa: E402
    attribute_histogram, attribute_shares, attribute_user_vectors, item_attribute_field, kmeans_ids, profile_report,
    rating_statistics, render_profile_report, training_histories,
)
from recbole_uip.utils import sha256_json, write_json_atomic  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
DEFAULT_MODELS = "DeepFM,DCN,DCNV2,WideDeep,xDeepFM,AutoInt,FM,NFM"
SETTINGS = ("standard", "id_free")
FIRST_MODEL_SEED = 2020          # model seeds are 2020, 2021, ...; the split seed stays config['seed']
RANDOM_IDS_SEED = 0
SHUFFLE_SEED = 12345             # the permutation benchmarks/informativeness.py uses
ZOO_FORMAT = 1                   # bump when the meaning of a run changes (resets what counts as done)

# Training configuration, chosen from measured single runs on ml-100k at 1 thread (uip+own, standard): RecBole's
# defaults (batch 2048, lr 0.001, patience 10, 300 epochs) need 30-50 epochs per run, far beyond a 384-run grid.
# Batch 4096 with lr 0.01 and patience 2 stopped every model after 6-21 epochs; against lr 0.005 / patience 3 (8-26
# epochs) test AUC was lower only for DeepFM (0.7891 vs 0.7914) and equal or higher for the other models; lr 0.02
# cost DeepFM 0.7 AUC points. The epoch cap is never hit (checked per run: cap_hit in the JSONL).
TRAINING_DEFAULTS = {"train_batch_size": 4096, "learning_rate": 0.01, "stopping_step": 2, "epochs": 100,
                     "eval_batch_size": 16384}
# Per-model RecBole keys that replace RecBole's model defaults (--model_keys replaces this mapping). With its default
# CIN [100, 100, 100] one xDeepFM epoch took 16 s at 1 thread (the other seven models together: 12 s), and DCNV2's
# default [768, 768] MLP 5 s: the grid would not fit in hours. These two are scaled down; the others keep the defaults.
MODEL_KEYS_DEFAULT: dict[str, dict] = {"xDeepFM": {"cin_layer_size": [50, 50]}, "DCNV2": {"mlp_hidden_size": [256, 256]}}


@dataclasses.dataclass(frozen=True)
class FeatureSet:
    """Which ID set's dataset copy a run uses and which user columns it loads."""

    name: str
    id_set: str            # the dataset copy: "uip" (the inferred bank) or a control / baseline ID set
    own: bool              # load the dataset's own .user features
    profiles: bool         # load the uip_* columns (holding this copy's IDs)
    description: str


FEATURE_SETS = {fs.name: fs for fs in [
    FeatureSet("none", "uip", False, False, "no user features"),
    FeatureSet("own", "uip", True, False, "the dataset's own .user features"),
    FeatureSet("uip", "uip", False, True, "UIP profile IDs"),
    FeatureSet("uip+own", "uip", True, True, "UIP profile IDs and the dataset's own features"),
    FeatureSet("random", "random", False, True, "control: random IDs, same number of IDs per column"),
    FeatureSet("shuffled", "shuffled", False, True, "control: UIP IDs permuted across users"),
    FeatureSet("kmeans-attr", "kmeans-attr", False, True, "cheap baseline: k-means over item-attribute histograms"),
    FeatureSet("kmeans-llm", "kmeans-llm", False, True, "cheap baseline: k-means over the LLM's user vectors z"),
    FeatureSet("kmeans-nollm", "kmeans-nollm", False, True,
               "cheap baseline: k-means over the same user vectors built from genre multi-hots instead of LLM item embeddings"),
    FeatureSet("kmeans-ratings", "kmeans-ratings", False, True,
               "cheap baseline: k-means over each user's rating statistics alone (generosity, spread, activity)"),
    FeatureSet("uip-untrained", "uip-untrained", False, True,
               "control: the same quantiser on the untrained start (the bank's first E-step)"),
]}
# Comparisons reported next to "vs none": (feature set, reference).
COMPARISONS = [("uip", "shuffled"), ("uip", "random"), ("uip", "kmeans-attr"), ("uip", "kmeans-ratings"), ("uip", "kmeans-nollm"),
               ("uip", "kmeans-llm"), ("uip", "uip-untrained"), ("uip+own", "own")]


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
    parser.add_argument("--feature_sets", default=",".join(FEATURE_SETS),
                        help=f"comma-separated subset of {', '.join(FEATURE_SETS)} (default: all; none is needed "
                             "for the differences)")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="standard,id_free (default: both)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    for key, value in TRAINING_DEFAULTS.items():
        parser.add_argument(f"--{key}", type=type(value), default=value, help=f"RecBole {key} (default: {value})")
    parser.add_argument("--model_keys", default=json.dumps(MODEL_KEYS_DEFAULT),
                        help="YAML/JSON mapping model -> RecBole keys that replace that model's defaults, e.g. "
                             "'{xDeepFM: {cin_layer_size: [50, 50]}}' (default: %(default)s)")
    parser.add_argument("--render", action="store_true", help="only rebuild md/csv/png from the JSONL")
    parser.add_argument("--report_only", action="store_true", help="only write the profile report")
    parser.add_argument("--tag", default="", help="suffix of every output file name (for variants)")
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


def output_paths(dataset: str, tag: str) -> dict[str, Path]:
    """``results/<dataset>/<tag or default>/zoo.*`` (one folder per dataset and setting)."""
    folder = results_dir(dataset, tag or "default")
    paths = {ext: folder / f"zoo.{ext}" for ext in ("jsonl", "md", "csv", "png")}
    paths["notes"] = folder / "zoo_notes.md"
    paths["meta"] = folder / "zoo.meta.json"  # the command line and the ID sets' granularity
    paths["profile_report"] = folder / "profile_report.md"
    return paths


def model_dict(args, model: str, overrides: dict) -> dict:
    """The config_dict of one model's runs: overrides, the training keys, and that model's --model_keys."""
    return {**overrides, **training_keys(args), **args.model_keys.get(model, {})}


def training_keys(args) -> dict:
    """The RecBole keys this benchmark sets for every run (besides the dataset presets)."""
    return {key: getattr(args, key) for key in TRAINING_DEFAULTS} | {"valid_metric": "AUC", "show_progress": False,
                                                                     "metric_decimal_place": 6}


# ============================================================================================ ID sets
def alternative_bank(bank: FeatureBank, codes: np.ndarray, tag: str, note: str, codebooks=None) -> FeatureBank:
    """A bank with the same users and profiles as ``bank`` but other IDs (a control or a cheap baseline)."""
    return FeatureBank(fingerprint=f"{bank.fingerprint}-zoo{ZOO_FORMAT}-{tag}", profiles=bank.profiles, users=bank.users,
                       codes=np.asarray(codes, dtype=np.int64), codebooks=codebooks or bank.codebooks,
                       no_history_token=bank.no_history_token, metadata={"note": note, "source": bank.fingerprint})


def random_ids(bank: FeatureBank, sizes: list[int], seed: int = RANDOM_IDS_SEED) -> np.ndarray:
    """``(U, P)`` uniform random IDs, as many per column as that profile's codebook."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, k, size=len(bank.users)) for k in sizes], axis=1)


def shuffled_ids(bank: FeatureBank, seed: int = SHUFFLE_SEED) -> np.ndarray:
    """The UIP IDs with whole rows permuted across users (each profile keeps its usage and the pairs stay)."""
    return bank.codes[np.random.default_rng(seed).permutation(len(bank.users))]


def kmeans_columns(vectors: np.ndarray, sizes: list[int], first_seed: int = 0) -> np.ndarray:
    """``(U, P)``: one k-means per profile over the same per-user vectors, with seed = ``first_seed`` + column
    index and as many clusters as that profile's codebook (the columns differ by their k-means++ start only)."""
    return np.stack([kmeans_ids(vectors, k, seed=first_seed + column) for column, k in enumerate(sizes)], axis=1)


def attribute_vectors(config, settings: UIPSettings, bank: FeatureBank) -> tuple[np.ndarray, str]:
    """Per-user item-attribute histograms of the training split (rows in bank order), as shares of the user's
    attribute mentions; and the attribute field's name."""
    incidence, dataset = training_histories(config, bank.users)
    field = item_attribute_field(dataset, settings.item_text_fields)
    if field is None:
        raise ValueError(f"{config['dataset']}: no token item field besides the title for the kmeans-attr baseline.")
    histogram = attribute_histogram(incidence, dataset, field)
    return attribute_shares(histogram), field


def is_current(folder: Path, fingerprint: str) -> bool:
    """Whether ``folder`` is a complete dataset copy written for ``fingerprint``."""
    manifest = folder / MANIFEST_NAME
    try:
        return json.loads(manifest.read_text(encoding="utf-8")).get("fingerprint") == fingerprint
    except (OSError, ValueError):
        return False


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
        "kmeans-llm": lambda: (kmeans_columns(bank.summaries, sizes),
                               "k-means over the bank's user vectors z (LLM item embeddings, no prompt tuning), seed = column"),
        "kmeans-nollm": lambda: (kmeans_columns(attribute_user_vectors(config, settings, bank.users), sizes),
                                 "k-means over the encoder's user vectors built from genre multi-hots (no LLM), seed = column"),
        "kmeans-ratings": lambda: (kmeans_columns(rating_statistics(config, settings, bank.users), sizes),
                                   "k-means over the users' rating statistics (generosity, spread, activity), seed = column"),
        "uip-untrained": lambda: (bank.initial_codes,
                                  "the bank's first E-step: the same quantiser on the untrained starting point"),
    }
    for id_set in sorted(needed - {"uip"}):
        folder = target.parent / f"{config['dataset']}-uipzoo-{id_set}"
        fingerprint = f"{bank.fingerprint}-zoo{ZOO_FORMAT}-{id_set}"
        if not is_current(folder, fingerprint):
            if id_set == "kmeans-llm" and bank.summaries is None:
                raise ValueError("The bank holds no LLM summaries: the kmeans-llm baseline cannot be built.")
            if id_set == "uip-untrained" and bank.initial_codes is None:
                raise ValueError("The bank holds no initial codes: the untrained control cannot be built.")
            codes, note = builders[id_set]()
            write_augmented_dataset(config, settings, files, alternative_bank(bank, codes, id_set, note), folder)
            logger.info(f"zoo: wrote the {id_set} IDs to {folder}")
        folders[id_set] = folder
    return folders


def write_id_free_copy(config, source: Path, folder: Path) -> Path:
    """A variant of the dataset copy ``source`` whose ``.inter`` carries every ``.user`` column joined in, and
    which has no ``.user`` file: a run can then drop user_id (``unused_col``) and still see the user features.

    Rewritten only when ``source``'s manifest changed. Every other atomic file is copied unchanged.
    """
    import shutil

    fingerprint = json.loads((source / MANIFEST_NAME).read_text(encoding="utf-8"))["fingerprint"] + "-idfree"
    if is_current(folder, fingerprint):
        return folder
    separator, encoding = config["field_separator"], config["encoding"]
    user_field = config["USER_ID_FIELD"]
    name = folder.name

    def build(tmp: Path) -> None:
        inter = read_atomic(source / f"{source.name}.inter", separator, encoding)
        users = read_atomic(source / f"{source.name}.user", separator, encoding)
        extra = [f for f in users.fields if f != user_field and f not in inter.fields]
        user_index = users.fields.index(user_field)
        row_of = {row[user_index]: row for row in users.rows}
        pick = [users.fields.index(f) for f in extra]
        inter_user = inter.fields.index(user_field)
        with open(tmp / f"{name}.inter", "w", encoding=encoding, newline="") as handle:
            handle.write(separator.join([inter.header] + [f"{f}:{users.field_type(f)}" for f in extra]) + "\n")
            for row in inter.rows:
                user_row = row_of.get(row[inter_user])
                handle.write(separator.join(row + [user_row[i] if user_row else "" for i in pick]) + "\n")
        for path in source.iterdir():
            suffix = path.name[len(source.name) + 1:]
            if path.is_file() and path.name.startswith(source.name + ".") and suffix not in ("inter", "user"):
                shutil.copyfile(path, tmp / f"{name}.{suffix}")
        write_json_atomic(tmp / MANIFEST_NAME, {"fingerprint": fingerprint, "source": str(source),
                                                "note": ".user columns joined into .inter; no .user file"})

    return publish_directory(build, folder)


# ============================================================================================ configs and data
def own_user_fields(config) -> list[str]:
    """The dataset's own user features as its presets load them (ml-100k: age, gender, occupation)."""
    load_col = config["load_col"] or {}
    return [f for f in load_col.get("user", []) if f != config["USER_ID_FIELD"]]


def user_columns(feature_set: FeatureSet, own: list[str], settings: UIPSettings) -> list[str]:
    return (own if feature_set.own else []) + (list(settings.field_names) if feature_set.profiles else [])


def run_config(base_config, settings: UIPSettings, folder: Path, columns: list[str], setting: str, overrides: dict):
    """The ``Config`` of one (feature set, setting) for the model of ``base_config``.

    Built by the package's ``augmented_config`` (which carries the dataset's presets over to the copy and switches
    RecBole's dataset cache off); then ``load_col`` is narrowed to the feature set's user columns. In ``id_free``,
    the columns come from ``.inter`` and user_id is loaded for the split only (``unused_col``).
    """
    config = augmented_config(base_config, settings, folder, None, overrides)
    user_field = base_config["USER_ID_FIELD"]
    load_col = {key: list(value) for key, value in config["load_col"].items()}
    if setting == "standard":
        load_col["user"] = [user_field] + columns
    else:
        load_col.pop("user", None)
        load_col["inter"] = [f for f in load_col["inter"] if f not in columns] + columns
        config["unused_col"] = {"inter": [user_field]}
    config["load_col"] = load_col
    return config


def build_loaders(config):
    """RecBole's dataset and (train, valid, test) dataloaders, seeded as ``run_recbole_with_config`` seeds them."""
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import init_seed

    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    return dataset, data_preparation(config, dataset)


@dataclasses.dataclass
class SplitView:
    """One dataset's split, in raw values, for checking that every run sees the same interactions."""

    items: list[np.ndarray]          # per split: raw item tokens, in order
    labels: list[np.ndarray]
    timestamps: list[np.ndarray]
    users: list[np.ndarray] | None   # raw user tokens (None when user_id was dropped)


def split_view(dataset, loaders) -> SplitView:
    """The raw (item, label, timestamp[, user]) sequences of train, valid and test."""
    views = SplitView([], [], [], [] if dataset.uid_field in loaders[0]._dataset.inter_feat else None)
    for loader in loaders:
        inter = loader._dataset.inter_feat
        views.items.append(np.asarray(dataset.id2token(dataset.iid_field, inter[dataset.iid_field].numpy())))
        views.labels.append(inter[dataset.label_field].numpy().copy())
        views.timestamps.append(inter[dataset.time_field].numpy().copy() if dataset.time_field in inter
                                else np.zeros(len(inter)))
        if views.users is not None:
            views.users.append(np.asarray(dataset.id2token(dataset.uid_field, inter[dataset.uid_field].numpy())))
    return views


def feature_tokens(dataset, loaders, field: str, setting: str) -> list[np.ndarray]:
    """Per split, the raw value of user feature ``field`` each interaction is given (joined from ``.user`` in
    ``standard``, read from ``.inter`` in ``id_free``)."""
    out = []
    for loader in loaders:
        inter = loader._dataset.inter_feat
        if setting == "standard":
            ids = dataset.user_feat[field][inter[dataset.uid_field]].numpy()
        else:
            ids = inter[field].numpy()
        out.append(np.asarray(dataset.id2token(field, ids)))
    return out


def assert_same_split(reference: SplitView, view: SplitView, label: str) -> None:
    """Raise if ``view`` is not interaction-for-interaction the reference split (no leakage between settings)."""
    for part, name in enumerate(("train", "valid", "test")):
        same = (np.array_equal(reference.items[part], view.items[part])
                and np.array_equal(reference.labels[part], view.labels[part])
                and np.array_equal(reference.timestamps[part], view.timestamps[part]))
        if not same:
            raise AssertionError(f"{label}: the {name} split differs from the plain run's split (item, label, "
                                 "timestamp); the profiles were learned on the plain run's training part.")
        if view.users is not None and not np.array_equal(reference.users[part], view.users[part]):
            raise AssertionError(f"{label}: the {name} split has other users than the plain run's split.")


def assert_user_features(reference: SplitView, dataset, loaders, folder: Path, columns: list[str], setting: str,
                         config, label: str) -> None:
    """Raise unless every interaction carries exactly its own user's values of ``columns`` (from the copy's
    ``.user`` file, or for the id_free variant the ``.user`` of the copy it was joined from)."""
    source = folder if setting == "standard" else Path(json.loads((folder / MANIFEST_NAME).read_text())["source"])
    table = read_atomic(source / f"{source.name}.user", config["field_separator"], config["encoding"])
    user_index = table.fields.index(config["USER_ID_FIELD"])
    for field in columns:
        index = table.fields.index(field)
        value_of = {row[user_index]: row[index] for row in table.rows}
        for part, actual in enumerate(feature_tokens(dataset, loaders, field, setting)):
            expected = np.asarray([value_of[u] for u in reference.users[part]])
            if not np.array_equal(expected, actual):
                raise AssertionError(f"{label}: interactions do not carry their user's '{field}' values.")


# ============================================================================================ one run
class _NullWriter:
    """Stands in for RecBole's per-trainer TensorBoard writer: 384 runs would leave 384 event folders and
    background threads behind. Only logging is affected, never training."""

    def add_scalar(self, *args, **kwargs):
        pass

    def add_hparams(self, *args, **kwargs):
        pass

    def close(self):
        pass


def train_and_test(config, loaders, model_seed: int) -> dict:
    """Train ``config['model']`` on prebuilt dataloaders and test its best checkpoint.

    The body of ``recbole_uip.quick_start.run_recbole_with_config`` after ``data_preparation``: the model seed
    seeds initialisation and dropout; the dataloaders' generators are reset to ``config['seed']`` first, as a
    freshly built dataloader is, so a run does not depend on which runs came before it.
    """
    from recbole.utils import get_trainer, init_seed
    import recbole.trainer.trainer as recbole_trainer

    patch_recbole_checkpoint_loading()
    train_data, valid_data, test_data = loaders
    for loader in loaders:
        loader.generator.manual_seed(config["seed"])
    init_seed(model_seed + config["local_rank"], config["reproducibility"])
    start = time.perf_counter()
    model = model_class_for_run(config)(config, train_data._dataset).to(config["device"])
    saved_get_tensorboard = recbole_trainer.get_tensorboard
    recbole_trainer.get_tensorboard = lambda logger: _NullWriter()
    try:
        trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    finally:
        recbole_trainer.get_tensorboard = saved_get_tensorboard
    _, best_valid = trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    test_result = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
    seconds = time.perf_counter() - start
    checkpoint = Path(trainer.saved_model_file)
    best_epoch = int(torch.load(checkpoint, map_location="cpu", weights_only=False)["epoch"]) + 1
    checkpoint.unlink(missing_ok=True)
    epochs_run = len(trainer.train_loss_dict)
    return {"auc": float(test_result["auc"]), "logloss": float(test_result["logloss"]),
            "valid_auc": float(best_valid["auc"]), "valid_logloss": float(best_valid["logloss"]),
            "best_epoch": best_epoch, "epochs_run": epochs_run, "epochs_cap": int(config["epochs"]),
            "cap_hit": epochs_run >= int(config["epochs"]), "seconds": round(seconds, 2)}


# ============================================================================================ JSONL
def read_records(path: Path) -> list[dict]:
    """Every run in the JSONL (a torn last line, from a kill mid-write, is ignored)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def append_record(path: Path, record: dict) -> None:
    """Append one run and flush it to disk before the next run starts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def run_key(record: dict) -> tuple:
    return record["signature"], record["model"], record["feature_set"], record["setting"], record["seed"]


# ============================================================================================ the grid
def prepare(args, overrides: dict, logger):
    """Infer or reuse the profiles; return the base config, settings, files, the uip folder and the bank."""
    config = build_config(args.models[0], args.dataset, None, {**overrides, **training_keys(args), "uip": True})
    settings = UIPSettings.from_config(config)
    files = check_dataset_files(config)
    start = time.perf_counter()
    target = infer_profiles(config, settings)
    logger.info(f"zoo: profiles ready in {time.perf_counter() - start:.1f}s ({target})")
    return config, settings, files, target, FeatureBank.load(target / "bank")


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
    base, settings, files, target, bank = prepare(args, overrides, logger)
    signature = run_signature(args, overrides, bank)
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
    write_json_atomic(paths["meta"], {"signature": signature, "bank": bank.fingerprint[:12],
                                      "command": "python benchmarks/zoo.py " + " ".join(args.argv),
                                      "granularity": id_set_granularity(base, files, bank, folders)})
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


def run_signature(args, overrides: dict, bank: FeatureBank) -> str:
    """What makes two runs of the same (model, feature set, setting, seed) comparable: the bank, the training keys,
    the thread count (it changes float reductions), the other overrides and this script's format."""
    kept = {k: v for k, v in overrides.items() if k not in ("checkpoint_dir", "uip_num_threads", "uip_output_dir")}
    return sha256_json({"format": ZOO_FORMAT, "dataset": args.dataset, "bank": bank.fingerprint, "threads": args.threads,
                        "training": training_keys(args), "model_keys": args.model_keys, "overrides": kept})[:16]


def check_fields(config, dataset, columns: list[str], setting: str) -> None:
    """Raise unless the model will embed exactly user_id (standard only), the item fields and ``columns``."""
    from recbole.utils import FeatureSource

    user_sources = [FeatureSource.USER, FeatureSource.USER_ID, FeatureSource.INTERACTION]
    user_side = set(dataset.fields(source=user_sources)) - {config["LABEL_FIELD"], config["ITEM_ID_FIELD"],
                                                           config["TIME_FIELD"], config["RATING_FIELD"]}
    expected = set(columns) | ({config["USER_ID_FIELD"]} if setting == "standard" else set())
    if setting == "id_free":
        user_side -= {config["USER_ID_FIELD"]}      # loaded for the split only; unused_col drops it before training
        if config["USER_ID_FIELD"] not in (config["unused_col"] or {}).get("inter", []):
            raise AssertionError("id_free run would embed user_id")
    if user_side != expected:
        raise AssertionError(f"{setting}: user-side fields {sorted(user_side)} != expected {sorted(expected)}")


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


def fmt_p(p: float) -> str:
    return "n/a" if p != p else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


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
    produced_by = grid_meta(paths, records).get("command") or (
        "python benchmarks/zoo.py " + " ".join(f"--{k}={v}" for k, v in command))
    lines = [f"# Model zoo on {r0['dataset']}: profiles vs controls and cheap baselines", "",
             f"Produced by `{produced_by}` "
             f"(`--render` rebuilds this file from `{paths['jsonl'].name}`).", "", "## Configuration", ""]
    lines += [f"- **Dataset and split**: {r0['dataset']}, RecBole 1.2.1 context-aware defaults: labeled mode, rating "
              "threshold from the dataset presets (ml-100k: label = rating >= 4), random 8:1:1 split (RS, RO) with the "
              "split seed 2020 fixed for every run; the model seed (initialisation, dropout) varies: "
              f"{sorted({r['seed'] for r in records})}. Every dataset is asserted to reproduce the plain run's "
              "train/valid/test split interaction by interaction, and every interaction to carry its own user's "
              "feature values.",
              f"- **Training**: Adam, learning rate {r0['learning_rate']}, train batch {r0['train_batch_size']}, eval "
              f"batch {r0['eval_batch_size']}, early stopping on validation AUC with patience {r0['stopping_step']} "
              f"epochs, at most {r0['epochs_cap']} epochs (cap hit in {sum(r['cap_hit'] for r in records)} of "
              f"{len(records)} runs), the best-validation checkpoint is tested. Model hyper-parameters are RecBole's "
              "defaults for each model (embedding size, MLP sizes, dropout, ...)" + model_keys_text(records) + ".",
              f"- **Machine**: {r0['threads']} torch thread(s) per run, CPU only ({platform.processor() or platform.machine()}), "
              f"torch {torch.__version__}; seconds are wall-clock per run (training + validation + test) and depend on "
              "other load on the machine. "
              f"Sum of run times {seconds / 60:.1f} min; runs finished between {first} and {last} (UTC).",
              f"- **Profiles**: {profile_line(args)}",
              "- **Feature sets**: " + "; ".join(f"`{fs.name}`: {fs.description}" for fs in FEATURE_SETS.values()) + ". "
              "User columns loaded: " + "; ".join(f"`{fs}`: {', '.join(columns_of(records, fs)) or '-'}" for fs in sets)
              + ". Every run also loads the item features of the dataset presets (ml-100k: release_year, class). "
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


def grid_meta(paths: dict, records: list[dict]) -> dict:
    """What the grid run wrote beside the JSONL (command line, ID-set granularity), if it matches the records."""
    try:
        data = json.loads(paths["meta"].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if data.get("signature") == records[0]["signature"] else {}


def granularity_lines(paths: dict, records: list[dict]) -> list[str]:
    """The table of how finely each ID set splits the users (written by the grid run beside the JSONL)."""
    data = grid_meta(paths, records)
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
    order = ["own", "uip", "shuffled", "random", "kmeans-attr", "kmeans-llm"]
    for name in sorted(data["granularity"], key=lambda n: order.index(n) if n in order else 99):
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
def setup_logging(config):
    """RecBole's logger (its file under log/ keeps every epoch); on stdout only our progress lines and warnings."""
    from recbole.utils import init_logger

    init_logger(config)
    logger = getLogger()
    for handler in logger.handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
    progress = logging.StreamHandler(sys.stdout)
    progress.setLevel(logging.INFO)
    progress.addFilter(lambda record: record.getMessage().startswith(("zoo", "UIP")))
    progress.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger.addHandler(progress)
    return logger


def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides.setdefault("uip_num_threads", args.threads)
    paths = output_paths(args.dataset, args.tag)
    paths["jsonl"].parent.mkdir(parents=True, exist_ok=True)
    # one folder per process: RecBole names checkpoints by model and second, so two runs would share a file
    overrides.setdefault("checkpoint_dir", str(ROOT / "saved" / f"zoo-{args.dataset}-{os.getpid()}"))
    # one profile folder per tag: two grids with other settings must never write the same <dataset>-uip/ copy
    overrides.setdefault("uip_output_dir", str(Path("dataset") / f"zoo-{args.tag or 'default'}"))

    config = build_config(args.models[0], args.dataset, None, {**overrides, "uip": True})
    # the folder's resolved settings and portable command (no machine paths); --render keeps the grid's command
    command = ["benchmarks/zoo.py", *args.argv]
    if args.render and paths["meta"].is_file():
        command = json.loads(paths["meta"].read_text(encoding="utf-8"))["command"].split()[1:]
    write_json_atomic(paths["jsonl"].parent / "settings.json",
                      run_record(config, UIPSettings.from_config(config), command))
    if not args.render:
        logger = setup_logging(config)
        if args.report_only:
            base, settings, files, _, bank = prepare(args, overrides, logger)
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
    latest = records[-1]["signature"]
    current = [r for r in records if r["signature"] == latest]
    if len(current) < len(records):
        print(f"Rendering the {len(current)} runs of signature {latest}; {len(records) - len(current)} older runs ignored.")
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
