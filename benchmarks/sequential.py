"""Sequential models with and without the profiles: leave-one-out, full ranking, several model seeds.

    python benchmarks/sequential.py --dataset=ml-100k --models=SASRec,GRU4Rec,BERT4Rec,NARM --seeds=3 --threads=1

The profiles are inferred once for the leave-one-out split (``infer_profiles``: reused when the bank matches)
and written under ``--output_dir``; every model then trains twice per seed through ``run_recbole_with_config``,
the function ``run_recbole_uip`` runs: on the plain dataset (no profiles) and on the ``-uip`` copy, where the
profile-fused subclass adds the profile vector to the sequence representation. The split is fixed; only the
model seed varies. Each finished run is appended to ``results/sequential_<dataset>.jsonl`` so a killed
benchmark resumes where it stopped; ``--render`` rebuilds the Markdown from that file.

The model configuration is reduced so that training converges on 2 CPU cores (the default SASRec config costs
about 170 s per epoch on one thread here): see ``REDUCED`` and the result file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from recbole_uip.cli_flags import parse_value
from recbole_uip.config import UIPSettings
from recbole_uip.quick_start import (
    augmented_config, build_config, check_dataset_files, infer_profiles, run_recbole_with_config, write_augmented_dataset,
)

RESULTS = Path(__file__).resolve().parent.parent / "results"

# One configuration for every model: short sequences and narrow layers, early stopping on validation NDCG@10.
REDUCED = {
    "MAX_ITEM_LIST_LENGTH": 20, "embedding_size": 32, "hidden_size": 32, "inner_size": 64, "n_layers": 1,
    "n_heads": 1, "train_batch_size": 1024, "learning_rate": 0.005, "epochs": 60, "stopping_step": 5,
    "eval_step": 1, "metrics": ["NDCG", "Hit"], "topk": [10], "valid_metric": "NDCG@10", "show_progress": False,
}
# RecBole's default split for sequential models is the leave-one-out one; checked, not set, so that the bank's
# fingerprint matches `python -m recbole_uip infer --model=SASRec --MAX_ITEM_LIST_LENGTH=20`.
LEAVE_ONE_OUT = {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user"}
METRICS = ("ndcg@10", "hit@10")
VARIANTS = {"none": "no profiles", "uip": "profiles", "shuffled": "profiles shuffled across users"}
SHUFFLE_SEED = 12345            # the permutation benchmarks/zoo.py and informativeness.py use


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean paired difference a - b and the paired t-test p-value (nan with fewer than 2 pairs)."""
    from scipy import stats

    diff = np.asarray(a) - np.asarray(b)
    p = float(stats.ttest_rel(a, b).pvalue) if len(diff) > 1 and diff.std() > 0 else float("nan")
    return float(diff.mean()), p


def load_runs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def render(runs: list[dict], meta: dict) -> str:
    lines = [f"# Sequential models with and without the profiles ({meta['dataset']})", "",
             f"Leave-one-out split (training: all but each user's last two interactions), full ranking over all items, "
             f"test set. {meta['threads']} torch thread(s), CPU, run on {meta['date']}. The split is fixed; "
             f"model seeds {meta['seeds']}. Profiles: {meta['profiles']} with codebooks {meta['codebook_sizes']} "
             f"from `{meta['llm']}`, inferred once on this split's training part ({meta['inference_seconds']} s when "
             f"the bank was computed). Fusion: the profile vector is added to the sequence representation.", "",
             "Epochs trained include the `stopping_step` + 1 epochs without improvement after the best one (eval every epoch); "
             "an entry equal to the `epochs` cap would mean the cap, not early stopping, ended training. Model configuration (reduced to train to convergence on 2 cores; the same for every model and variant, "
             "other keys at RecBole's defaults): `" + json.dumps(REDUCED) + "`.",
             "", "| model | variant | NDCG@10 mean (std) | Hit@10 mean (std) | runs | epochs trained | seconds per run |",
             "|---|---|---|---|---|---|---|"]
    models = list(dict.fromkeys(r["model"] for r in runs))
    for model in models:
        for variant in VARIANTS:
            rows = [r for r in runs if r["model"] == model and r["variant"] == variant]
            if not rows:
                continue
            cells = []
            for metric in METRICS:
                values = np.array([r[metric] for r in rows])
                cells.append(f"{values.mean():.4f} ({values.std(ddof=1) if len(values) > 1 else 0:.4f})")
            seconds = np.mean([r["seconds"] for r in rows])
            epochs = ", ".join(str(r["epochs_trained"]) for r in rows)
            lines.append(f"| {model} | {VARIANTS[variant]} | {cells[0]} | {cells[1]} | "
                         f"{len(rows)} | {epochs} | {seconds:.0f} |")
    for reference in ("none", "shuffled"):
        table = []
        for model in models:
            by_seed = {}
            for r in runs:
                if r["model"] == model:
                    by_seed.setdefault(r["seed"], {})[r["variant"]] = r
            pairs = [v for v in by_seed.values() if reference in v and "uip" in v]
            if not pairs:
                continue
            cells = []
            for metric in METRICS:
                diff, p = paired([v["uip"][metric] for v in pairs], [v[reference][metric] for v in pairs])
                cells += [f"{diff:+.4f}", f"{p:.3f}"]
            table.append(f"| {model} | {len(pairs)} | " + " | ".join(cells) + " |")
        if table:
            lines += ["", f"Paired over seeds (profiles minus {VARIANTS[reference]}):", "",
                      "| model | pairs | NDCG@10 diff | p (paired t) | Hit@10 diff | p (paired t) |",
                      "|---|---|---|---|---|---|", *table]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--models", default="SASRec,GRU4Rec,BERT4Rec,NARM")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output_dir", default="dataset/loo",
                        help="where the leave-one-out <dataset>-uip copy is written (kept apart from the CTR split's)")
    parser.add_argument("--variants", default="none,uip",
                        help="comma-separated: none (no profiles), uip (profiles), shuffled (the same IDs permuted "
                             "across users: the control)")
    parser.add_argument("--render", action="store_true", help="only rebuild the Markdown from the JSONL")
    args, rest = parser.parse_known_args(argv)
    overrides = {item.lstrip("-").partition("=")[0]: parse_value(item.partition("=")[2]) for item in rest}
    jsonl = RESULTS / f"sequential_{args.dataset}.jsonl"
    meta_path = RESULTS / f"sequential_{args.dataset}.meta.json"
    if args.render:
        (RESULTS / f"sequential_{args.dataset}.md").write_text(render(load_runs(jsonl), json.loads(meta_path.read_text())))
        return 0
    torch.set_num_threads(args.threads)
    from recbole.utils import init_logger

    RESULTS.mkdir(exist_ok=True)
    models = args.models.split(",")
    base = {**REDUCED, "uip_output_dir": args.output_dir, "uip_num_threads": 2, **overrides}
    config = build_config(models[0], args.dataset, None, {**base, "uip": True})
    if any(config["eval_args"].get(k) != v for k, v in LEAVE_ONE_OUT.items()):
        raise SystemExit(f"expected the leave-one-out split, got eval_args={config['eval_args']}")
    init_logger(config)
    settings = UIPSettings.from_config(config)
    start = time.perf_counter()
    target = infer_profiles(config, settings)          # once for the split; every model below shares it
    from recbole_uip.bank import FeatureBank

    bank = FeatureBank.load(target / "bank")
    meta = {"dataset": args.dataset, "threads": args.threads, "seeds": [2020 + s for s in range(args.seeds)],
            "profiles": settings.profile_names, "codebook_sizes": settings.codebook_sizes, "llm": settings.llm,
            "inference_seconds": bank.metadata.get("seconds"), "bank_check_seconds": round(time.perf_counter() - start, 1),
            "date": time.strftime("%Y-%m-%d"), "overrides": overrides}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    done = {(r["model"], r["variant"], r["seed"]) for r in load_runs(jsonl)}
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {sorted(VARIANTS)}")
    shuffled_target = None
    if "shuffled" in variants:
        shuffled = FeatureBank(
            fingerprint=bank.fingerprint + "-shuffled", profiles=bank.profiles, users=bank.users,
            codes=bank.codes[np.random.default_rng(SHUFFLE_SEED).permutation(len(bank.users))],
            codebooks=bank.codebooks, no_history_token=bank.no_history_token, metadata={"note": "rows permuted"})
        shuffled_target = write_augmented_dataset(config, settings, check_dataset_files(config), shuffled,
                                                  target.parent / f"{args.dataset}-uipshuf")
    for seed in meta["seeds"]:
        for model in models:
            plain = build_config(model, args.dataset, None, {**base, "uip": False})
            fused = augmented_config(build_config(model, args.dataset, None, {**base, "uip": True}), settings, target,
                                     None, {**base, "uip": True})
            configs = {"none": plain, "uip": fused}
            if shuffled_target is not None:
                configs["shuffled"] = augmented_config(build_config(model, args.dataset, None, {**base, "uip": True}),
                                                       settings, shuffled_target, None, {**base, "uip": True})
            for variant in variants:
                run_config = configs[variant]
                if (model, variant, seed) in done:
                    continue
                t0 = time.perf_counter()
                result = run_recbole_with_config(run_config, saved=True, model_seed=seed)
                row = {"model": model, "variant": variant, "seed": seed, "threads": args.threads,
                       "seconds": round(time.perf_counter() - t0, 1), "epochs_trained": result["epochs_trained"],
                       **{k: float(v) for k, v in result["test_result"].items()},
                       "valid": {k: float(v) for k, v in result["best_valid_result"].items()}}
                with open(jsonl, "a") as handle:
                    handle.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
                Path(result["saved_model_file"]).unlink(missing_ok=True)
    (RESULTS / f"sequential_{args.dataset}.md").write_text(render(load_runs(jsonl), meta))
    print((RESULTS / f"sequential_{args.dataset}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
