"""Does a second run of the zoo grid reproduce the first? Compares two ``zoo_<dataset>*.jsonl`` files run by run.

    python benchmarks/zoo.py --dataset=ml-100k --models=... --seeds=3 --tag=rerun      # the same grid again
    python benchmarks/compare_zoo_runs.py results/zoo_ml-100k.jsonl results/zoo_ml-100k_rerun.jsonl \\
        --output=results/zoo_ml-100k_reproduction.md

Runs are matched by (model, feature set, setting, seed); each file contributes the runs of its latest signature
(see ``zoo.py``). For every matched pair it compares test AUC and LogLoss, the best epoch and the epochs run, and
writes a Markdown summary: how many runs matched, how many are identical, the largest differences.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

COMPARED = ("auc", "logloss", "valid_auc", "best_epoch", "epochs_run")


def latest_runs(path: Path) -> dict[tuple, dict]:
    """The records of the file's latest signature, keyed by (model, feature set, setting, seed)."""
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not records:
        raise SystemExit(f"{path}: no runs.")
    signature = records[-1]["signature"]
    return {(r["model"], r["feature_set"], r["setting"], r["seed"]): r for r in records if r["signature"] == signature}


def compare(first: dict[tuple, dict], second: dict[tuple, dict]) -> dict:
    """Per compared field: how many matched runs agree exactly, and the largest absolute difference."""
    matched = sorted(set(first) & set(second))
    fields = {}
    for field in COMPARED:
        diffs = [abs(float(first[k][field]) - float(second[k][field])) for k in matched]
        fields[field] = {"identical": sum(d == 0 for d in diffs), "max_abs_diff": max(diffs, default=0.0)}
    worst = max(matched, key=lambda k: abs(first[k]["auc"] - second[k]["auc"]), default=None)
    return {"first_only": len(set(first) - set(second)), "second_only": len(set(second) - set(first)),
            "matched": len(matched), "fields": fields, "worst_auc": worst,
            "signatures": sorted({next(iter(first.values()))["signature"], next(iter(second.values()))["signature"]})}


def render(result: dict, first: Path, second: Path) -> str:
    lines = [f"# Reproduction of the zoo grid: `{first.name}` against `{second.name}`", "",
             f"Runs matched by (model, feature set, setting, seed): {result['matched']}; only in the first file: "
             f"{result['first_only']}; only in the second: {result['second_only']}. Run signatures: "
             f"{', '.join(result['signatures'])}.", "",
             "| field | identical in | largest absolute difference |", "|---|---|---|"]
    for field, stats in result["fields"].items():
        lines.append(f"| {field} | {stats['identical']} of {result['matched']} | {stats['max_abs_diff']:.6g} |")
    if result["worst_auc"] is not None and result["fields"]["auc"]["max_abs_diff"] > 0:
        lines += ["", f"Largest AUC difference: {result['worst_auc']}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("--output", type=Path, help="write the Markdown summary here (default: print only)")
    args = parser.parse_args(argv)
    result = compare(latest_runs(args.first), latest_runs(args.second))
    text = render(result, args.first, args.second)
    if args.output:
        args.output.write_text(text, encoding="utf-8")
    print(text)
    identical = all(s["identical"] == result["matched"] for s in result["fields"].values())
    return 0 if identical and not result["first_only"] and not result["second_only"] else 1


if __name__ == "__main__":
    sys.exit(main())
