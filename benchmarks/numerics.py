"""How much the LLM's floating-point numerics move the inferred profiles: dtype x CPU threads, one process.

    python benchmarks/numerics.py --dataset=ml-100k --users=64 --epochs=2 [--key=value ...]

The same users (the first ``--users`` of the training histories), the same seed and settings are inferred under each
(dtype, threads) pair, one after the other in one process. Every run is compared with the run of the same dtype at
the lowest thread count (what the thread count alone changes) and with the float32 run at the lowest thread count
(the reference: what the dtype changes). Reported per run: wall time, and the relative difference
``||a - b|| / ||a||`` of the users' encoder inputs z (from the forward-only item embeddings), the shared encoder
and the quantised offsets, plus the share of (user, profile) IDs that agree after matching code labels (Hungarian).

Writes results/numerics_<dataset>.{md,json}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from logging import getLogger
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from recbole_uip.benchmarking import parse_known_with_overrides
from recbole_uip.config import UIPSettings
from recbole_uip.data.behaviour import collect_training_histories, resolve_text_fields
from recbole_uip.data.behaviour_text import BehaviourText
from recbole_uip.inference.llm import load_frozen_llm
from recbole_uip.inference.trainer import ProfileInferenceTrainer
from recbole_uip.quick_start import build_config, check_dataset_files

RESULTS = Path(__file__).resolve().parent.parent / "results"


def first_users(histories, count: int):
    """The histories restricted to their first ``count`` users (every per-user list cut alike)."""
    return dataclasses.replace(histories, users=histories.users[:count], items=histories.items[:count],
                               ratings=None if histories.ratings is None else histories.ratings[:count],
                               interaction_counts=histories.interaction_counts[:count])


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))


def matched_agreement(a: np.ndarray, b: np.ndarray) -> list[float]:
    """Per profile, the share of users whose IDs agree once the code labels of ``b (U, P)`` are matched to ``a``."""
    shares = []
    for p in range(a.shape[1]):
        size = int(max(a[:, p].max(), b[:, p].max())) + 1
        overlap = np.zeros((size, size))
        np.add.at(overlap, (a[:, p], b[:, p]), 1)
        rows, cols = linear_sum_assignment(-overlap)
        shares.append(float(overlap[rows, cols].sum() / len(a)))
    return shares


def compare(base: dict, run: dict) -> dict:
    """Relative differences of every array of ``run`` to ``base``, and the matched share of agreeing IDs."""
    return {**{name: relative_difference(base["arrays"][name], array) for name, array in run["arrays"].items()},
            "ids_agree": matched_agreement(base["codes"], run["codes"])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--users", type=int, default=64, help="users inferred (the corpus's first ones)")
    parser.add_argument("--epochs", type=int, default=2, help="EM rounds (uip_epochs)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--threads", default="1,2", help="CPU thread counts")
    args, overrides = parse_known_with_overrides(parser, argv)
    dtypes = args.dtypes.split(",")
    thread_counts = sorted(int(t) for t in args.threads.split(","))

    from recbole.utils import init_logger

    config = build_config("DeepFM", args.dataset, None,
                          {**overrides, "uip": True, "uip_epochs": args.epochs, "show_progress": False})
    init_logger(config)
    logger = getLogger()
    settings = UIPSettings.from_config(config)
    runs = []
    histories = first_users(collect_training_histories(
        config, settings, resolve_text_fields(config, settings, check_dataset_files(config)), logger), args.users)
    for dtype in dtypes:
        llm = load_frozen_llm(settings.llm, config["device"], dtype, settings.llm_cache_dir, logger)
        text = BehaviourText(histories, settings, llm.tokenizer)
        for threads in thread_counts:
            run_settings = dataclasses.replace(settings, llm_dtype=dtype, num_threads=threads)
            trainer = ProfileInferenceTrainer(config, run_settings, llm, histories, text, logger)
            start = time.perf_counter()
            result = trainer.fit()
            runs.append({
                "dtype": dtype, "threads": threads, "seconds": round(time.perf_counter() - start, 1),
                "arrays": {"summaries": result.summaries, "encoder": result.encoder, "offsets": result.offsets},
                "codes": result.codes,
            })
            logger.info(f"numerics: {dtype}, {threads} thread(s): {runs[-1]['seconds']} s")
    reference = runs[0]
    rows = []
    for run in runs:
        same_dtype = next(r for r in runs if r["dtype"] == run["dtype"])  # its dtype at the lowest thread count
        rows.append({
            "dtype": run["dtype"], "threads": run["threads"], "seconds": run["seconds"],
            "against_reference": compare(reference, run),
            "against_same_dtype": compare(same_dtype, run),
        })
    report = {
        "dataset": args.dataset, "users": args.users, "epochs": args.epochs, "llm": settings.llm,
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "reference": f"{reference['dtype']}, {reference['threads']} thread(s)", "overrides": overrides, "runs": rows,
        "argv": args.argv,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"numerics_{args.dataset}.json").write_text(json.dumps(report, indent=2) + "\n")
    md = render(report, settings.profile_names)
    (RESULTS / f"numerics_{args.dataset}.md").write_text(md)
    print(md)
    return 0


def render(report: dict, profiles: list[str]) -> str:
    lines = [
        f"# Numerics of profile inference: {report['dataset']}",
        "",
        f"Produced by `python benchmarks/numerics.py {' '.join(report.get('argv', []))}`. LLM {report['llm']}, torch "
        f"{report['torch']} on {report['cpu']}; the first {report['users']} users, {report['epochs']} EM rounds, same "
        f"seed, default settings otherwise (overrides: {report['overrides'] or 'none'}). Seconds are wall-clock per run "
        "(item embeddings and EM), one run at a time in one process.",
        "",
        "Relative difference ||base - run|| / ||base|| of the users' encoder inputs z, the shared encoder A and the "
        "quantised offsets A z, and the share of IDs that agree after matching code labels.",
    ]
    for key, title in (("against_same_dtype", "Against the same dtype at the lowest thread count (what the thread "
                                              "count alone changes)"),
                       ("against_reference", f"Against the reference run, {report['reference']} (what the dtype "
                                             "changes)")):
        lines += [
            "", f"## {title}", "",
            "| dtype | threads | seconds | z | encoder A | offsets | "
            + " | ".join(f"IDs agree: {p}" for p in profiles) + " |",
            "|---|---:|---:|---:|---:|---:|" + "---:|" * len(profiles),
        ]
        for row in report["runs"]:
            d = row[key]
            lines.append(
                f"| {row['dtype']} | {row['threads']} | {row['seconds']:.0f} | {d['summaries']:.1e} | {d['encoder']:.1e} "
                f"| {d['offsets']:.1e} | " + " | ".join(f"{s:.3f}" for s in d["ids_agree"]) + " |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
