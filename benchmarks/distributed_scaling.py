"""Profile inference over processes x threads: the time of the set-up and of one EM round, and the parallel efficiency.

    python benchmarks/distributed_scaling.py [--dataset=ml-100k] [--users=300] [--layouts=1x1,1x2,2x1] [--repeats=2]
        [--gpu] [--key=value ...]

Each layout ``PxT`` runs the command a user would, ``python -m recbole_uip infer`` (through ``torchrun
--standalone --nproc_per_node=P`` for P > 1, gloo on CPU, nccl with ``--gpu``), with ``T`` torch threads per
process, one EM round (``uip_epochs: 1``) and no reuse, in a fresh output folder; the layouts run interleaved,
``--repeats`` times, so that the machine's noise falls on all of them alike. From the bank's round log: the set-up
(item embeddings, feature map, first E-step) and the round (M-step, line search, E-step), and the wall time of the
command (process start and LLM load included). Speed-up is against ``1x1``; efficiency = speed-up / (P x T).

``--users=N`` takes the first N users (by id) of the dataset's ``.inter`` into a copy (default 300; 0: all), so
a round fits a few minutes on 2 cores. The layouts default to 1x1, 1xC and every P x (C / P) for the visible
cores C. With ``--gpu`` the layouts are ranks x 1 over the visible GPUs (benchmarks/device_check.sh).

Writes ``results/<dataset>/<settings fingerprint>/distributed_scaling.{json,md}``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from recbole_uip.benchmarking import (
    benchmark_parser, parse_known_with_overrides, publish_benchmark, run_record, settings_table,
)
from recbole_uip.config import PROPERTIES_DIR


def default_layouts(cores: int, gpus: int = 0) -> list[tuple[int, int]]:
    """``(processes, threads)`` pairs: 1x1, 1xC, and P x (C / P) for each P dividing C (ranks x 1 on GPUs)."""
    if gpus:
        return [(p, 1) for p in range(1, gpus + 1)]
    layouts = [(1, 1)] + [(p, cores // p) for p in range(1, cores + 1) if cores % p == 0]
    return list(dict.fromkeys(layouts))


def subset_dataset(source: Path, name: str, users: int, target: Path) -> Path:
    """Copy the atomic files of ``source/name`` to ``target/<name>-first<users>/``, keeping in ``.inter`` only the
    first ``users`` user ids (in order of first appearance). Returns the new dataset's name."""
    new_name = f"{name}-first{users}"
    folder = target / new_name
    folder.mkdir(parents=True, exist_ok=True)
    for suffix in ("item", "user"):
        if (source / f"{name}.{suffix}").is_file():
            (folder / f"{new_name}.{suffix}").write_bytes((source / f"{name}.{suffix}").read_bytes())
    kept: set[str] = set()
    with open(source / f"{name}.inter", encoding="utf-8") as src, open(folder / f"{new_name}.inter", "w", encoding="utf-8") as out:
        header = src.readline()
        out.write(header)
        user_column = [field.split(":")[0] for field in header.rstrip("\n").split("\t")].index("user_id")
        for line in src:
            user = line.split("\t")[user_column]
            if user not in kept and len(kept) < users:
                kept.add(user)
            if user in kept:
                out.write(line)
    return new_name


def run_layout(processes: int, threads: int, data_path: Path, dataset: str, flags: list[str], out: Path,
               gpu: bool) -> dict:
    """One inference with ``processes`` ranks of ``threads`` threads; its timings from the bank's round log."""
    from recbole_uip.bank import FeatureBank

    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] \
        if processes > 1 else [sys.executable]
    command = [*launcher, "-m", "recbole_uip", "infer", f"--dataset={dataset}", f"--data_path={data_path}",
               f"--output_dir={out}", f"--checkpoint_dir={out / 'saved'}", f"--uip_num_threads={threads}",
               f"--use_gpu={'true' if gpu else 'false'}", "--uip_reuse=false", "--show_progress=false", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"layout {processes}x{threads} failed:\n{done.stderr[-3000:]}")
    bank = FeatureBank.load(out / f"{dataset}-uip" / "bank")
    history = bank.metadata["history"]
    return {"processes": processes, "threads": threads, "setup_seconds": history[0]["seconds"],
            "round_seconds": round(history[-1]["seconds"] - history[0]["seconds"], 1), "wall_seconds": round(wall, 1),
            "users": len(bank.users), "fingerprint": bank.fingerprint[:12]}


def summarise(runs: list[dict]) -> list[dict]:
    """Median per layout over the repeats, with speed-up and efficiency against the first layout."""
    layouts = list(dict.fromkeys((r["processes"], r["threads"]) for r in runs))
    rows = []
    for processes, threads in layouts:
        mine = [r for r in runs if (r["processes"], r["threads"]) == (processes, threads)]
        rows.append({"processes": processes, "threads": threads, "repeats": len(mine),
                     **{key: statistics.median(r[key] for r in mine) for key in ("setup_seconds", "round_seconds",
                                                                                 "wall_seconds")}})
    base = rows[0]
    for row in rows:
        for key in ("setup", "round"):
            speedup = base[f"{key}_seconds"] / max(row[f"{key}_seconds"], 1e-9)
            row[f"{key}_speedup"] = round(speedup, 2)
            row[f"{key}_efficiency"] = round(speedup / (row["processes"] * row["threads"]), 2)
    return rows


def render(data: dict) -> str:
    record = data["record"]
    lines = [f"# Profile inference over processes x threads ({data['users']} users of {data['source_dataset']})", "",
             f"`python -m recbole_uip infer` with one EM round, each layout {data['repeats']} times, interleaved; "
             f"medians. Speed-up against {data['rows'][0]['processes']}x{data['rows'][0]['threads']}; efficiency = "
             f"speed-up / (processes x threads). {record['cpu_count']} cores visible"
             + (f", GPUs: {data['gpus']}" if data.get("gpus") else "") + ".", "",
             "| processes x threads | set-up (s) | set-up speed-up | set-up efficiency | round (s) | round speed-up | "
             "round efficiency | wall (s) |", "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['processes']}x{r['threads']} | {r['setup_seconds']:.1f} | {r['setup_speedup']:.2f} | "
                     f"{r['setup_efficiency']:.2f} | {r['round_seconds']:.1f} | {r['round_speedup']:.2f} | "
                     f"{r['round_efficiency']:.2f} | {r['wall_seconds']:.0f} |")
    lines += ["", "Set-up: item embeddings (sharded over the ranks), feature map, first E-step. Round: M-step pass, "
              "line search, E-step. Wall: the whole command, process start and LLM load included.", "",
              "## Run", "", settings_table(record)]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--users", type=int, default=300, help="the first N users of .inter (0: all)")
    parser.add_argument("--layouts", default="", help="PxT,... (default: from the visible cores or GPUs)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--gpu", action="store_true", help="ranks on the visible CUDA GPUs (nccl)")
    args, overrides = parse_known_with_overrides(parser, argv)
    import torch

    from recbole_uip.config import UIPSettings
    from recbole_uip.quick_start import build_config

    gpus = torch.cuda.device_count() if args.gpu else 0
    if args.gpu and not gpus:
        parser.error("--gpu: no CUDA GPU is visible")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    layouts = ([tuple(map(int, item.split("x"))) for item in args.layouts.split(",")] if args.layouts
               else default_layouts(cores, gpus))
    overrides = {"uip_epochs": 1, **overrides}
    flags = [f"--{key}={json.dumps(value) if not isinstance(value, str) else value}" for key, value in overrides.items()]
    source_config = build_config("DeepFM", args.dataset, None, {"uip": True})
    preset = PROPERTIES_DIR / "dataset" / f"{args.dataset}.yaml"
    runs = []
    with tempfile.TemporaryDirectory(prefix="uip-scaling-") as tmp:
        tmp = Path(tmp)
        dataset, data_path = args.dataset, Path(source_config["data_path"]).parent
        if args.users:
            dataset = subset_dataset(Path(source_config["data_path"]), args.dataset, args.users, tmp / "data")
            data_path = tmp / "data"
            if preset.is_file():   # the copy has another name: its presets come along explicitly
                flags.append(f"--config_files={preset}")
        config = build_config("DeepFM", dataset, [str(preset)] if args.users and preset.is_file() else None,
                              {"uip": True, "data_path": str(data_path), **overrides})
        for repeat in range(args.repeats):
            for processes, threads in layouts:
                out = tmp / f"out-{processes}x{threads}-{repeat}"
                runs.append(run_layout(processes, threads, data_path, dataset, flags, out, bool(gpus)))
                print(f"{processes}x{threads} (repeat {repeat + 1}): set-up {runs[-1]['setup_seconds']} s, round "
                      f"{runs[-1]['round_seconds']} s, wall {runs[-1]['wall_seconds']} s", flush=True)
    record = run_record(config, UIPSettings.from_config(config), ["benchmarks/distributed_scaling.py", *args.argv])
    record["threads"] = "per layout"
    data = {"source_dataset": args.dataset, "users": runs[0]["users"], "repeats": args.repeats,
            "gpus": [torch.cuda.get_device_name(i) for i in range(gpus)], "runs": runs, "rows": summarise(runs),
            "record": record}
    publish_benchmark(args, "distributed_scaling", data, render(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
