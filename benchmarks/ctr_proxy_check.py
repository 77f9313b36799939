"""Does the CTR criterion's cheap score rank ID sets as the CTR models do? The held-out AUC of
``recbole_uip.inference.ctr_proxy`` beside a model-zoo grid's test AUC, for every ID set the grid trained on.

    python benchmarks/ctr_proxy_check.py --dataset=ml-100k --zoo=8c14c412a561 [--zoo=...] [--draws=5]

For each ``--zoo`` (a ``results/<dataset>/<fingerprint>/`` folder written by ``benchmarks/zoo.py``), the ID sets are
read back from the grid's datasets (``<data_root>/zoo-<fingerprint>/<dataset>-uip*/*.user``: the IDs as the grid
used them, from whole training histories), and the training split is remade with the grid's model, ``eval_args``
and seed. Per ID set: the proxy's held-out AUC (mean and spread over ``--draws`` draws of the held-out fifth of each
user's training interactions, labels from RecBole's ``threshold`` on the rating field) and the grid's test AUC
(mean over its models and seeds, setting ``id_free``), with the Spearman correlation of the two orders. No LLM.

Writes ``results/<dataset>/<fingerprint>/ctr_proxy_check.{json,md}`` beside each grid.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from recbole_uip.benchmarking import (
    benchmark_parser, configure, latest_records, parse_known_with_overrides, publish_result, read_records,
)
from recbole_uip.data.behaviour import collect_training_histories, resolve_text_fields
from recbole_uip.inference.ctr_proxy import HELD_OUT_SHARE, PRIOR, HeldOutLabels
from recbole_uip.quick_start import check_dataset_files


def parse_args(argv=None):
    parser = benchmark_parser(__doc__)
    parser.add_argument("--zoo", action="append", required=True, help="a grid's results folder name (repeatable)")
    parser.add_argument("--draws", type=int, default=5, help="draws of the held-out interactions")
    parser.add_argument("--data_root", default="dataset", help="where the grids' datasets lie (zoo-<fingerprint>/)")
    return parse_known_with_overrides(parser, argv)


def id_sets(folder: Path, dataset: str, users: list[str], names: list[str]) -> dict[str, np.ndarray]:
    """``{feature set: int (U, P) codes}`` aligned with ``users``, from each set's ``.user`` file (``uip_*``
    columns); sets without a ``.user`` file (``none``, ``own``, ...) are left out."""
    found = {}
    for name in names:
        stem = f"{dataset}-uip" if name == "uip" else f"{dataset}-uipzoo-{name}"
        path = folder / stem / f"{stem}.user"
        if not path.is_file():
            continue
        table = pd.read_csv(path, sep="\t", dtype=str)
        table.columns = [c.split(":")[0] for c in table.columns]
        table = table.set_index("user_id").loc[users]
        columns = [c for c in table.columns if c.startswith("uip_")]
        found[name] = np.stack([pd.factorize(table[c])[0] for c in columns], axis=1)
    return found


def check(args, overrides: dict, fingerprint: str) -> tuple[dict, str]:
    folder = Path(args.results) / args.dataset / fingerprint
    runs = [r for r in latest_records(read_records(folder / "zoo.jsonl")) if r["setting"] == "id_free"]
    if not runs:
        sys.exit(f"{folder / 'zoo.jsonl'} holds no id_free runs of a grid.")
    record = json.loads((folder / "zoo.meta.json").read_text(encoding="utf-8"))["record"]
    split = record["split"]
    # the criterion's own settings resolve the label threshold (RecBole's on the rating field, or
    # --uip_ctr_label_threshold), and refuse a run without one with the fix
    config, settings, _ = configure(split["model"], args.dataset, {
        "seed": split["seed"], "eval_args": split["eval_args"], "show_progress": False,
        "uip_line_search_criterion": "ctr", **overrides})
    threshold = settings.ctr_label_threshold
    histories = collect_training_histories(config, settings, resolve_text_fields(config, settings,
                                                                                 check_dataset_files(config)))
    grid = pd.DataFrame(runs).groupby("feature_set")["auc"].mean()
    sets = id_sets(Path(args.data_root) / f"zoo-{fingerprint}", args.dataset, histories.users, list(grid.index))
    draws = [HeldOutLabels.split(histories, threshold, seed) for seed in range(args.draws)]
    rows = {name: {"proxy_auc": [d.auc(codes) for d in draws], "grid_auc": float(grid[name])}
            for name, codes in sets.items()}
    names = sorted(rows, key=lambda n: -np.mean(rows[n]["proxy_auc"]))
    rho = spearmanr([np.mean(rows[n]["proxy_auc"]) for n in names], [rows[n]["grid_auc"] for n in names]).statistic
    data = {"record": {**record, "command": ["benchmarks/ctr_proxy_check.py"] + args.argv,
                       "date": dt.date.today().isoformat()},
            "grid": fingerprint, "threshold": float(threshold), "held_out_share": HELD_OUT_SHARE, "prior": PRIOR,
            "draws": args.draws, "rows": rows, "spearman": float(rho), "grid_runs": len(runs)}
    lines = [f"# The CTR criterion's score against the grid ({args.dataset}, grid `{fingerprint}`)", "",
             f"Produced by `python benchmarks/ctr_proxy_check.py {' '.join(args.argv)}`. The ID sets of "
             f"[zoo.md](zoo.md) as the grid used them; the training split of {split['model']} (seed {split['seed']}); "
             f"labels rating >= {float(threshold):g}; {args.draws} draws of the held-out {HELD_OUT_SHARE:.0%} of each "
             f"user's training interactions (`recbole_uip/inference/ctr_proxy.py`, prior {PRIOR:g}). Grid: mean test "
             f"AUC over its id_free runs ({len(runs)} runs: models x seeds).", "",
             "| ID set | proxy held-out AUC (min-max over draws) | grid test AUC |", "|---|---|---|"]
    for n in names:
        proxy = rows[n]["proxy_auc"]
        lines.append(f"| {n} | {np.mean(proxy):.4f} ({min(proxy):.4f}-{max(proxy):.4f}) | {rows[n]['grid_auc']:.4f} |")
    lines += ["", f"Spearman correlation of the two orders over {len(names)} ID sets: {rho:.2f}."]
    return data, "\n".join(lines)


def main(argv=None):
    args, overrides = parse_args(argv)
    for fingerprint in args.zoo:
        data, markdown = check(args, overrides, fingerprint)
        publish_result(Path(args.results) / args.dataset / fingerprint, "ctr_proxy_check", data, markdown)


if __name__ == "__main__":
    main()
