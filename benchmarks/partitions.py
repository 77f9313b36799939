"""How much of a downstream difference between ID sets is the luck of one partition?

    python benchmarks/partitions.py --dataset=ml-100k --partitions=5
    python benchmarks/partitions.py --dataset=ml-100k --render          # rebuild the markdown from the JSONL

The zoo compares the UIP IDs with one k-means partition per cheap baseline. Another k-means start over the same
representation can land elsewhere downstream; this benchmark measures that spread where user features matter (the
zoo's ``id_free`` setting: user_id is not a model feature), for each ID source:

  uip          partition 0: the bank's IDs; partitions 1..N-1: the bank's final offsets quantised again with the
               bank's own metric (its stored projection, if any) from other k-means++ starts
  shuffled     the bank's IDs permuted across users, one permutation per partition
  kmeans-attr  k-means over each user's training item-attribute histogram; partition s seeds column p with
               P*s + p for P profiles (partition 0 is the zoo's)
  kmeans-llm   the same over the bank's pooled LLM hidden states (no prompt tuning)

Every partition is trained with every model and model seed. Per partition it also reports the share of the
variance of the users' mean training rating that its groups explain (eta squared over the joint groups): a
training-split quantity that tracks much of the downstream value of a user partition.

Outputs ``results/partitions_<dataset>[_<tag>].{jsonl,md}``; the JSONL is appended run by run and a restart skips
what is done. Other ``--key=value`` flags are RecBole / ``uip_*`` keys, as in ``benchmarks/zoo.py`` (``uip_*`` keys
select which bank is inferred or reused).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from recbole_uip.bank import FeatureBank
from recbole_uip.benchmarking import (
    RESULTS, append_record, fmt_p, latest_records, parse_known_with_overrides, progress_logging, read_records,
)
from recbole_uip.ctr_runs import (
    FIRST_MODEL_SEED, MODEL_KEYS_DEFAULT, TRAINING_DEFAULTS, assert_same_split, assert_user_features, build_loaders,
    check_fields, model_dict, prepare_profiles, run_config, run_signature, split_view, train_and_test, training_keys,
)
from recbole_uip.data.behaviour import build_training_split
from recbole_uip.feature_sets import (
    SHUFFLE_SEED, attribute_vectors, kmeans_columns, shuffled_ids, write_id_free_copy, write_id_set,
)
from recbole_uip.inference.codebook import ProfileCodebook
from recbole_uip.quick_start import build_config
from recbole_uip.report import explained_variance, training_sequences
from recbole_uip.utils import write_json_atomic

ROOT = Path(__file__).resolve().parent.parent
ZOO_FORMAT = 1                 # the zoo's run format: part of the signature, as the zoo's runs have it
SOURCES = ("uip", "shuffled", "kmeans-attr", "kmeans-llm")
DEFAULT_MODELS = "DeepFM,FM,WideDeep"
FORMAT = 1                     # bump when the meaning of a run changes


def parse_args(argv=None) -> tuple[argparse.Namespace, dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--models", default=DEFAULT_MODELS, help=f"context-aware models (default: {DEFAULT_MODELS})")
    parser.add_argument("--seeds", type=int, default=3, help="model seeds per partition: 2020, 2021, ... (default: 3)")
    parser.add_argument("--partitions", type=int, default=5, help="partitions per ID source (default: 5)")
    parser.add_argument("--sources", default=",".join(SOURCES), help=f"subset of {', '.join(SOURCES)}")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument("--tag", default="", help="suffix of the output files")
    parser.add_argument("--render", action="store_true", help="only rebuild the markdown from the JSONL")
    for key, value in TRAINING_DEFAULTS.items():
        parser.add_argument(f"--{key}", type=type(value), default=value, help=f"RecBole {key} (default: {value})")
    args, overrides = parse_known_with_overrides(parser, argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    if unknown := [s for s in args.sources if s not in SOURCES]:
        parser.error(f"unknown ID source(s): {', '.join(unknown)}")
    if args.partitions < 2:
        parser.error("--partitions must be at least 2 (a spread needs two)")
    args.model_keys = MODEL_KEYS_DEFAULT
    return args, overrides


def output_paths(dataset: str, tag: str) -> dict[str, Path]:
    stem = f"partitions_{dataset}{'_' + tag if tag else ''}"
    return {"jsonl": RESULTS / f"{stem}.jsonl", "md": RESULTS / f"{stem}.md", "meta": RESULTS / f"{stem}.meta.json"}


# ============================================================================================ partitions
def requantised_ids(bank: FeatureBank, sizes: list[int], iterations: int, seed: int) -> np.ndarray:
    """``(U, P)``: the bank's final offsets quantised again from a k-means++ start seeded by ``seed`` (column p uses
    ``seed * 1000 + p``), measuring distances like the bank's quantiser (its stored projection, if any)."""
    if bank.offsets is None:
        raise ValueError("The bank holds no offsets: its IDs cannot be quantised again.")
    columns = []
    for p, size in enumerate(sizes):
        codebook = ProfileCodebook(size, bank.offsets.shape[-1])
        if bank.projections is not None:
            codebook.use_projection(torch.as_tensor(bank.projections[p]))   # the final E-step's metric, fixed
        ids, _ = codebook.fit(torch.as_tensor(bank.offsets[:, p]), iterations, torch.Generator().manual_seed(seed * 1000 + p))
        columns.append(ids.numpy())
    return np.stack(columns, axis=1)


def partition_ids(source: str, partition: int, bank: FeatureBank, sizes: list[int], settings, attributes) -> np.ndarray:
    """The ``(U, P)`` IDs of one partition of one source (see module docstring)."""
    if source == "uip":
        return bank.codes if partition == 0 else requantised_ids(bank, sizes, settings.kmeans_iters, partition)
    if source == "shuffled":
        return shuffled_ids(bank, seed=SHUFFLE_SEED + partition)
    vectors = attributes() if source == "kmeans-attr" else bank.summaries
    if vectors is None:
        raise ValueError("The bank holds no LLM summaries: the kmeans-llm baseline cannot be built.")
    return kmeans_columns(vectors, sizes, first_seed=len(sizes) * partition)


def joint_groups(ids: np.ndarray) -> np.ndarray:
    """``(U,)`` one group label per distinct row of ``ids (U, P)``."""
    return np.unique(ids, axis=0, return_inverse=True)[1].reshape(-1)


# ============================================================================================ grid
def run(args, overrides: dict, paths: dict, logger) -> None:
    base, settings, files, target, bank = prepare_profiles(args, overrides, logger)
    sizes = [settings.codebook_sizes[p] for p in bank.profiles]
    signature = f"{bank.fingerprint[:12]}-p{FORMAT}-{run_signature(args, overrides, bank, ZOO_FORMAT)}"
    done = {(r["source"], r["partition"], r["model"], r["seed"]) for r in read_records(paths["jsonl"])
            if r["signature"] == signature}
    seeds = [FIRST_MODEL_SEED + i for i in range(args.seeds)]
    plain = build_config(args.models[0], args.dataset, None, {**overrides, **training_keys(args)})
    plain_dataset, plain_loaders = build_loaders(plain)
    reference = split_view(plain_dataset, plain_loaders)
    del plain_dataset, plain_loaders
    _, mean_rating = training_sequences(*build_training_split(base), bank.users)
    attributes_cache: list[np.ndarray] = []

    def attributes() -> np.ndarray:
        if not attributes_cache:
            attributes_cache.append(attribute_vectors(base, settings, bank)[0])
        return attributes_cache[0]

    columns = list(settings.field_names)
    write_json_atomic(paths["meta"], {"signature": signature, "bank": bank.fingerprint[:12],
                                      "command": "python benchmarks/partitions.py " + " ".join(args.argv)})
    for source in args.sources:
        for partition in range(args.partitions):
            todo = [(m, s) for m in args.models for s in seeds if (source, partition, m, s) not in done]
            if not todo:
                continue
            ids = partition_ids(source, partition, bank, sizes, settings, attributes)
            groups = joint_groups(ids)
            eta2 = explained_variance(mean_rating, groups) if mean_rating is not None else None
            name = f"{args.dataset}-uippart-{source}-p{partition}"
            folder = target.parent / name
            write_id_set(base, settings, files, bank, f"part{FORMAT}-{source}-{partition}", folder,
                         lambda: (ids, f"{source}, partition {partition}"))
            folder = write_id_free_copy(base, folder, target.parent / f"{name}-idfree")
            data_config = run_config(base, settings, folder, columns, "id_free", model_dict(args, args.models[0], overrides))
            dataset, loaders = build_loaders(data_config)
            assert_same_split(reference, split_view(dataset, loaders), name)
            assert_user_features(reference, dataset, loaders, folder, columns, "id_free", base, name)
            for model in args.models:
                model_base = build_config(model, args.dataset, None, {**model_dict(args, model, overrides), "uip": True})
                config = run_config(model_base, settings, folder, columns, "id_free", model_dict(args, model, overrides))
                check_fields(config, dataset, columns, "id_free")
                for seed in [s for (m, s) in todo if m == model]:
                    result = train_and_test(config, loaders, seed)
                    append_record(paths["jsonl"], {
                        "signature": signature, "dataset": args.dataset, "source": source, "partition": partition,
                        "model": model, "seed": seed, "groups": int(groups.max() + 1), "eta2_mean_rating": eta2,
                        "auc": result["auc"], "logloss": result["logloss"], "best_epoch": result["best_epoch"],
                        "seconds": result["seconds"], "threads": torch.get_num_threads(), "bank": bank.fingerprint[:12],
                        "llm": settings.llm, **training_keys(args),
                        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})
                    logger.info(f"zoo-partitions {source} p{partition} {model} seed {seed}: AUC {result['auc']:.4f}")


# ============================================================================================ report
def partition_means(records: list[dict]) -> dict[str, dict[int, dict]]:
    """``{source: {partition: {"auc": mean over models and seeds, "eta2": ..., "groups": ..., "runs": n}}}``."""
    out: dict[str, dict[int, dict]] = {}
    for r in records:
        cell = out.setdefault(r["source"], {}).setdefault(r["partition"], {"aucs": [], "eta2": r["eta2_mean_rating"],
                                                                           "groups": r["groups"]})
        cell["aucs"].append(r["auc"])
    for partitions in out.values():
        for cell in partitions.values():
            cell["auc"], cell["runs"] = float(np.mean(cell["aucs"])), len(cell["aucs"])
    return out


def render_markdown(records: list[dict], meta: dict) -> str:
    from scipy import stats

    means = partition_means(records)
    models = sorted({r["model"] for r in records})
    seeds = sorted({r["seed"] for r in records})
    first = records[0]
    lines = [f"# How much of a downstream difference is the luck of one partition? ({first['dataset']})", "",
             f"Produced by `{meta.get('command', 'python benchmarks/partitions.py')}` (`--render` rebuilds this file from "
             "the JSONL). Setting `id_free` of the zoo (user_id is not a model feature; the ID columns are the only user "
             f"features), models {', '.join(models)}, model seeds {seeds}, {first['threads']} thread(s) per run, "
             f"training keys as in the zoo (batch {first['train_batch_size']}, lr {first['learning_rate']}, patience "
             f"{first['stopping_step']}). Bank `{first['bank']}` (LLM `{first['llm']}`). Every dataset is asserted to "
             "reproduce the plain run's split. AUC is the test AUC averaged over models and model seeds.", "",
             "## Per ID source: spread over partitions", "",
             "| source | partitions | mean AUC over partitions | std over partitions | min | max | mean eta² of mean rating | mean groups |",
             "|---|---|---|---|---|---|---|---|"]
    for source in [s for s in SOURCES if s in means]:
        cells = [means[source][p] for p in sorted(means[source])]
        aucs = np.array([c["auc"] for c in cells])
        eta = [c["eta2"] for c in cells if c["eta2"] is not None]
        lines.append(f"| {source} | {len(cells)} | {aucs.mean():.4f} | {aucs.std(ddof=1):.4f} | {aucs.min():.4f} | "
                     f"{aucs.max():.4f} | {np.mean(eta):.3f} | {np.mean([c['groups'] for c in cells]):.0f} |")
    lines += ["", "Comparisons of the partition means (Welch t-test over partitions: it asks whether the difference "
              "exceeds the spread between partitions of the same source):", "",
              "| A − B | ΔAUC | p |", "|---|---|---|"]
    for a, b in [("uip", "shuffled"), ("uip", "kmeans-attr"), ("uip", "kmeans-llm"), ("kmeans-attr", "kmeans-llm")]:
        if a in means and b in means:
            xa = [c["auc"] for c in means[a].values()]
            xb = [c["auc"] for c in means[b].values()]
            p = float(stats.ttest_ind(xa, xb, equal_var=False).pvalue)
            lines.append(f"| {a} − {b} | {np.mean(xa) - np.mean(xb):+.4f} | {fmt_p(p)} |")
    lines += ["", "## Every partition", "",
              "| source | partition | groups | eta² of mean rating | " + " | ".join(f"{m} AUC" for m in models) + " | mean AUC | runs |",
              "|---|---|---|---|" + "---|" * len(models) + "---|---|"]
    for source in [s for s in SOURCES if s in means]:
        for partition in sorted(means[source]):
            cell = means[source][partition]
            per_model = [np.mean([r["auc"] for r in records if r["source"] == source and r["partition"] == partition
                                  and r["model"] == m] or [np.nan]) for m in models]
            lines.append(f"| {source} | {partition} | {cell['groups']} | {cell['eta2']:.3f} | "
                         + " | ".join(f"{v:.4f}" for v in per_model) + f" | {cell['auc']:.4f} | {cell['runs']} |")
    all_cells = [c for partitions in means.values() for c in partitions.values() if c["eta2"] is not None]
    if len(all_cells) > 2:
        r, p = stats.pearsonr([c["eta2"] for c in all_cells], [c["auc"] for c in all_cells])
        lines += ["", f"Across all {len(all_cells)} partitions, the Pearson correlation between the eta² of the users' "
                  f"mean training rating and the mean test AUC is {r:.2f} (p {fmt_p(float(p))})."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides.setdefault("uip_num_threads", args.threads)
    overrides.setdefault("checkpoint_dir", str(ROOT / "saved" / f"partitions-{args.dataset}"))
    paths = output_paths(args.dataset, args.tag)
    RESULTS.mkdir(exist_ok=True)
    if not args.render:
        logger = progress_logging(build_config(args.models[0], args.dataset, None, {**overrides, "uip": True}))
        start = time.perf_counter()
        run(args, overrides, paths, logger)
        logger.info(f"zoo-partitions: finished in {(time.perf_counter() - start) / 60:.1f} min")
    records = read_records(paths["jsonl"])
    if not records:
        print(f"No runs in {paths['jsonl']}.")
        return 1
    records = latest_records(records)
    meta = json.loads(paths["meta"].read_text(encoding="utf-8")) if paths["meta"].is_file() else {}
    paths["md"].write_text(render_markdown(records, meta), encoding="utf-8")
    print(f"Wrote {paths['md']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
