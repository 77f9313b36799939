"""How one EM round scales with the number of users: time and peak memory at 1x, 2x and 4x the users.

    python benchmarks/scale.py --dataset=ml-100k [--multipliers=1,2,4] [--base_users=N] [--key=value ...]

The users are the dataset's training histories (the first ``--base_users`` of them, default all) repeated ``m``
times under new user tokens (synthetic users, the same text). Each multiplier runs in its own process, so its peak RSS is its own: set-up (histories, LLM, item
embeddings, first E-step), then one EM round (M-step pass, encoder line search, E-step), timed. A round should take
time in proportion to the users and the memory per user should stay constant: no step touches every user's
state (the free tokens, where on, are updated row by row).

Writes ``results/<dataset>/<settings fingerprint>/scale.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import time
from logging import getLogger

from recbole_uip.benchmarking import (
    benchmark_parser, parse_known_with_overrides, publish_benchmark, run_record, settings_table,
)


def first_users(histories, count: int):
    """The histories of the first ``count`` users (all for ``count <= 0``)."""
    if count <= 0 or count >= len(histories):
        return histories
    return dataclasses.replace(
        histories, users=histories.users[:count], items=histories.items[:count],
        ratings=None if histories.ratings is None else histories.ratings[:count],
        interaction_counts=histories.interaction_counts[:count])


def repeated(histories, times: int):
    """The histories of every user repeated ``times`` times, copy ``c`` of user ``u`` named ``u~c``."""
    if times == 1:
        return histories
    return dataclasses.replace(
        histories, users=[f"{u}~{c}" if c else u for c in range(times) for u in histories.users],
        items=histories.items * times, ratings=None if histories.ratings is None else histories.ratings * times,
        interaction_counts=histories.interaction_counts * times)


def child(args, overrides: dict) -> dict:
    """One multiplier: set up, then one timed EM round; returns the measurements."""
    import torch
    from recbole.utils import init_logger

    from recbole_uip.config import UIPSettings
    from recbole_uip.data.behaviour import collect_training_histories, resolve_text_fields
    from recbole_uip.data.behaviour_text import BehaviourText
    from recbole_uip.inference.llm import load_frozen_llm
    from recbole_uip.inference.trainer import ProfileInferenceTrainer
    from recbole_uip.quick_start import build_config, check_dataset_files

    config = build_config(args.model, args.dataset, None, {"uip": True, "show_progress": False, **overrides})
    init_logger(config)
    settings = UIPSettings.from_config(config)
    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    histories = repeated(first_users(collect_training_histories(
        config, settings, resolve_text_fields(config, settings, check_dataset_files(config))), args.base_users),
        args.multiplier)
    llm = load_frozen_llm(settings.llm, config["device"], settings.llm_dtype, settings.llm_cache_dir)
    trainer = ProfileInferenceTrainer(config, settings, llm, histories, BehaviourText(histories, settings, llm.tokenizer),
                                      getLogger())
    start = time.perf_counter()
    trainer.setup()
    trainer.assignments, _, scales = trainer.e_step(settings.kmeans_iters)
    setup_seconds = time.perf_counter() - start
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    shared_opt = torch.optim.Adam([trainer.soft.shared], lr=settings.shared_learning_rate) if settings.shared_learning_rate else None
    start = time.perf_counter()
    trainer.m_step(1, scales, shared_opt)
    m_step = time.perf_counter() - start
    if trainer.validation is not None:
        trainer.line_search(scales)
    search = time.perf_counter() - start - m_step
    trainer.e_step(settings.kmeans_iters)
    round_seconds = time.perf_counter() - start
    return {"multiplier": args.multiplier, "users": len(histories), "setup_seconds": round(setup_seconds, 1),
            "round_seconds": round(round_seconds, 1), "m_step_seconds": round(m_step, 1),
            "line_search_seconds": round(search, 1), "e_step_seconds": round(round_seconds - m_step - search, 1),
            "peak_rss_gib_before_round": round(rss_before, 3),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
            "record": run_record(config, settings, ["benchmarks/scale.py", *args.argv])}


def render(data: dict) -> str:
    rows = data["runs"]
    base = rows[0]
    lines = [f"# One EM round at {', '.join(str(r['multiplier']) + 'x' for r in rows)} the users ({base['record']['dataset']})",
             "", "Synthetic users: every training history repeated under new user tokens. Each multiplier in its own "
             "process.", "",
             "| users | round (s) | M-step (s) | line search (s) | E-step (s) | round s / user | vs 1x per user | "
             "peak RSS (GiB) | RSS above 1x per added user (KiB) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per_user = r["round_seconds"] / r["users"]
        extra = "" if r is base else f"{(r['peak_rss_gib'] - base['peak_rss_gib']) * 2**20 / (r['users'] - base['users']):.1f}"
        lines.append(f"| {r['users']} | {r['round_seconds']:.0f} | {r['m_step_seconds']:.0f} | {r['line_search_seconds']:.0f} | "
                     f"{r['e_step_seconds']:.1f} | {per_user:.3f} | {per_user / (base['round_seconds'] / base['users']):.2f} | "
                     f"{r['peak_rss_gib']:.2f} | {extra} |")
    lines += ["", "## Run", "", settings_table(data["record"])]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--model", default="DeepFM")
    parser.add_argument("--multipliers", default="1,2,4")
    parser.add_argument("--base_users", type=int, default=0, help="the first N training users are the 1x (default: all)")
    parser.add_argument("--multiplier", type=int, default=None, help=argparse.SUPPRESS)   # one child's share
    args, overrides = parse_known_with_overrides(parser, argv)
    if args.multiplier is not None:
        print("SCALE_RESULT " + json.dumps(child(args, overrides)), flush=True)
        return 0
    runs = []
    for multiplier in map(int, args.multipliers.split(",")):
        command = [sys.executable, __file__, f"--multiplier={multiplier}"] + [a for a in args.argv if not a.startswith("--multipliers")]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(next(line for line in output.splitlines() if line.startswith("SCALE_RESULT "))[13:]))
        print(f"{multiplier}x: {runs[-1]['users']} users, round {runs[-1]['round_seconds']} s, peak RSS {runs[-1]['peak_rss_gib']} GiB",
              flush=True)
    # the settings' folder, with the command that was run (each child's own record names its --multiplier)
    data = {"runs": runs, "record": {**runs[0]["record"], "command": ["benchmarks/scale.py", *args.argv]}}
    publish_benchmark(args, "scale", data, render(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
