"""A real kill and resume of profile inference: what a crash costs, measured.

    python benchmarks/kill_resume.py --dataset=ml-100k --kill_after=120 [--key=value ...]

Three runs of ``python -m recbole_uip infer`` with the same flags, one after the other: an uninterrupted run (time
``T``); a run killed with SIGKILL after ``--kill_after`` seconds (time ``t1``); the same command again, which
resumes from the last checkpoint (time ``t2``). The time lost is ``t1 + t2 - T``. The resumed bank is compared
with the uninterrupted run's, array by array. Writes ``results/<dataset>/<settings fingerprint>/kill_resume.{json,md}``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from recbole_uip.benchmarking import (
    benchmark_parser, configure, cpu_model, parse_known_with_overrides, publish_benchmark, run_record, settings_table,
)


def parse_args(argv=None):
    parser = benchmark_parser(__doc__)
    parser.add_argument("--kill_after", type=float, default=120.0, help="seconds before the SIGKILL")
    return parse_known_with_overrides(parser, argv)


def infer(flags: list[str], output_dir: Path, kill_after: float | None = None) -> tuple[float, int, str]:
    """One ``infer`` run: wall seconds, return code, its log (stderr)."""
    command = [sys.executable, "-m", "recbole_uip", "infer", *flags, f"--output_dir={output_dir}", "--show_progress=false"]
    env = {k: v for k, v in os.environ.items() if k != "RECBOLE_UIP_FAULT"}
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, text=True)
        try:
            process.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
        seconds = time.perf_counter() - start
        log.seek(0)
        return seconds, process.returncode, log.read()


def main(argv=None) -> int:
    from recbole_uip.bank import FeatureBank

    args, overrides = parse_args(argv)
    flags = [f"--dataset={args.dataset}"] + [f"--{k}={v}" for k, v in overrides.items()]
    work = Path(tempfile.mkdtemp(prefix="uip-kill-resume-"))
    try:
        whole, code, _ = infer(flags, work / "uninterrupted")
        assert code == 0, "the uninterrupted run failed"
        killed, code, _ = infer(flags, work / "killed", args.kill_after)
        assert code == -signal.SIGKILL, f"the run ended (code {code}) before {args.kill_after} s: raise --kill_after"
        resumed, code, log = infer(flags, work / "killed")
        assert code == 0, "the resumed run failed:\n" + log[-3000:]
        where = re.search(r"resuming from the checkpoint \S+ at (.*?)\.\n", log)
        banks = [FeatureBank.load(work / run / f"{args.dataset}-uip" / "bank") for run in ("uninterrupted", "killed")]
        identical = {name: bool(np.array_equal(getattr(banks[0], name), getattr(banks[1], name)))
                     for name in ("codes", "initial_codes", "offsets", "summaries")}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    config, settings, _ = configure("DeepFM", args.dataset, overrides)     # what the runs resolved, for the record
    data = {"dataset": args.dataset, "flags": flags, "kill_after": args.kill_after, "uninterrupted_seconds": round(whole, 1),
            "killed_seconds": round(killed, 1), "resumed_seconds": round(resumed, 1),
            "lost_seconds": round(killed + resumed - whole, 1), "resumed_from": where.group(1) if where else None,
            "identical": identical, "cpu": cpu_model(), "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
            "record": run_record(config, settings, ["benchmarks/kill_resume.py", *args.argv])}
    lines = [f"# Kill and resume of profile inference ({args.dataset})", "",
             f"`python -m recbole_uip infer {' '.join(flags)}`, killed with SIGKILL after {args.kill_after:.0f} s, then "
             f"run again. {data['cpu']}, {data['cpu_count']} cores, {data['date']}.", "",
             "| run | seconds |", "|---|---|",
             f"| uninterrupted | {whole:.0f} |", f"| killed | {killed:.0f} |", f"| the same command again (resumes) | {resumed:.0f} |",
             f"| **time lost** (killed + again - uninterrupted) | **{killed + resumed - whole:.0f}** |", "",
             f"- The rerun resumed from {data['resumed_from'] or 'no checkpoint (it started afresh)'}.",
             "- The resumed bank against the uninterrupted one: " + ", ".join(
                 f"{k} {'identical' if v else 'DIFFERENT'}" for k, v in identical.items()) + ".",
             "", "## Run", "", settings_table(data["record"])]
    publish_benchmark(args, "kill_resume", data, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
