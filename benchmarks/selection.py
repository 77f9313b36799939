"""Render how a default was chosen: zoo grids of variants of a setting side by side.

    python benchmarks/selection.py results/ml-100k/<fingerprint A> results/ml-100k/<fingerprint B> ... \
        --output=results/ml-100k/selection.md

Each folder holds a ``benchmarks/zoo.py`` grid (``zoo.jsonl``, and its command in ``zoo.meta.json``). Per variant
(folder) and feature set: mean validation AUC (what a choice may look at) and test AUC over every model and seed,
and the paired test difference to ``none``. Writes the table to ``--output``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from recbole_uip.benchmarking import paired_test
from recbole_uip.utils import atomic_write


def summarise(folder: Path) -> dict:
    records = [json.loads(line) for line in (folder / "zoo.jsonl").read_text().splitlines() if line.strip()]
    meta = json.loads((folder / "zoo.meta.json").read_text())
    command = meta["record"]["command"] if "record" in meta else meta["command"].split()[1:]
    by_set: dict[str, dict] = {}
    for record in records:
        by_set.setdefault(record["feature_set"], {})[(record["model"], record["seed"], record["setting"])] = record
    rows = {}
    for name, runs in by_set.items():
        keys = sorted(runs)
        base = by_set.get("none", {})
        paired = [k for k in keys if k in base]
        diff = paired_test([runs[k]["auc"] for k in paired], [base[k]["auc"] for k in paired]) if name != "none" else None
        rows[name] = {"valid_auc": float(np.mean([runs[k]["valid_auc"] for k in keys])),
                      "test_auc": float(np.mean([runs[k]["auc"] for k in keys])), "runs": len(keys),
                      "models": sorted({k[0] for k in keys}), "minus_none": diff}
    return {"command": "python " + " ".join(command), "bank": meta.get("bank"), "rows": rows}


def render(dataset: str, variants: dict[str, dict]) -> str:
    lines = [f"# How the defaults were chosen ({dataset})", "",
             "Each variant is a `benchmarks/zoo.py` grid in its own folder (`zoo.md` has every run). Mean over models "
             "and model seeds; the choice looks at the validation AUC only, the test AUC is reported beside it. "
             "ΔAUC: test AUC minus `none`, paired by model and seed, with its t-test p-value.", "",
             "| variant | feature set | validation AUC | test AUC | test ΔAUC vs none (p) | runs | command |",
             "|---|---|---|---|---|---|---|"]
    for name, data in sorted(variants.items(), key=lambda kv: -kv[1]["rows"].get("uip", {"valid_auc": 0})["valid_auc"]):
        for feature_set, row in sorted(data["rows"].items(), key=lambda kv: -kv[1]["valid_auc"]):
            diff = f"{row['minus_none'][0]:+.4f} ({row['minus_none'][2]:.1e})" if row["minus_none"] else "-"
            lines.append(f"| {name} | {feature_set} | {row['valid_auc']:.4f} | {row['test_auc']:.4f} | {diff} | "
                         f"{row['runs']} | `{data['command']}` |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", help="zoo grid folders, one per variant")
    parser.add_argument("--dataset", default="ml-100k", help="named in the title")
    parser.add_argument("--output", required=True, help="the Markdown file to write")
    args = parser.parse_args(argv)
    missing = [f for f in args.folders if not (Path(f) / "zoo.jsonl").is_file()]
    if missing:
        parser.error(f"no zoo.jsonl in {', '.join(missing)}")
    variants = {Path(folder).name: summarise(Path(folder)) for folder in args.folders}
    with atomic_write(Path(args.output)) as handle:
        handle.write(render(args.dataset, variants))
    print(render(args.dataset, variants))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
