"""Do the inferred profiles carry information? Measured on the leak-free training split.

    python benchmarks/informativeness.py --dataset=ml-100k --seeds=3 [--key=value ...]

1. Profile inference through the same entry point users run (the bank is reused when inputs match).
2. Code usage and perplexity per profile.
3. History similarity: do users sharing an ID have more similar training histories (items; item-attribute
   histograms) than random groups of the same sizes? Permutation test, 1000 regroupings.
4. The same measures for cheap baselines with the same number of IDs: k-means over each user's item-attribute
   histogram (no LLM), and k-means over the LLM's pooled hidden states of the same text (no prompt tuning).
   How much history a grouping sees matters: the same attribute k-means is also measured over only the items
   written in the behaviour text (what the M-step's LLM reads), and over each user's N most recent items.
5. NMI of the IDs with the dataset's own user attributes (when it has them), and how much of the users' mean
   training rating each grouping explains (a ridge probe measures it on the continuous summaries and offsets).
6. DeepFM (early stopping, labeled CTR split): no profiles vs UIP IDs vs the same IDs shuffled across users,
   over several model seeds with the split fixed; AUC and LogLoss on the test set, paired differences.

Writes results/informativeness_<dataset>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from logging import getLogger
from pathlib import Path

import numpy as np
import torch

from recbole_uip.cli_flags import parse_value
from recbole_uip.bank import FeatureBank
from recbole_uip.config import UIPSettings
from recbole_uip.data.behaviour import build_training_split
from recbole_uip.quick_start import (
    augmented_config, build_config, check_dataset_files, infer_profiles, run_recbole_with_config, write_augmented_dataset,
)
from recbole_uip.report import (
    attribute_histogram, attribute_shares, cosine_matrix, explained_variance, group_similarity_test, item_attribute_field,
    kmeans_ids, normalized_mutual_information, training_sequences,
)

RESULTS = Path(__file__).resolve().parent.parent / "results"


def paired_summary(a: list[float], b: list[float]) -> dict:
    """Mean and std of a, b and of the paired difference a - b, with a paired t-test p-value."""
    from scipy import stats

    a, b = np.asarray(a), np.asarray(b)
    diff = a - b
    p = float(stats.ttest_rel(a, b).pvalue) if len(a) > 1 and diff.std() > 0 else float("nan")
    return {"mean_a": a.mean(), "std_a": a.std(ddof=1) if len(a) > 1 else 0.0, "mean_b": b.mean(),
            "std_b": b.std(ddof=1) if len(b) > 1 else 0.0, "mean_diff": diff.mean(), "p_paired_t": p}


def incidence_of(item_lists: list[list[int]], num_items: int) -> np.ndarray:
    """``(U, I)`` 0/1 incidence of per-user item id lists."""
    incidence = np.zeros((len(item_lists), num_items), dtype=np.float32)
    for row, item_ids in enumerate(item_lists):
        incidence[row, item_ids] = 1.0
    return incidence


def behaviour_text_items(config, settings, users: list[str]) -> list[list[str]]:
    """Per user (rows in ``users`` order), the raw item tokens of their newest training items within
    ``uip_max_behaviour_tokens`` (the text the paper's setting scores, and the diagnostics' held-out text)."""
    from transformers import AutoTokenizer

    from recbole_uip.data.behaviour import collect_training_histories, resolve_text_fields
    from recbole_uip.data.behaviour_text import BehaviourText
    from recbole_uip.inference.llm import BUNDLED_LLM, convert_bundled_model
    from recbole_uip.quick_start import check_dataset_files

    folder = convert_bundled_model(settings.llm_cache_dir) if settings.llm == BUNDLED_LLM else settings.llm
    histories = collect_training_histories(config, settings, resolve_text_fields(config, settings, check_dataset_files(config)))
    text = BehaviourText(histories, settings, AutoTokenizer.from_pretrained(str(folder)))
    items_of = {user: [histories.item_ids[i] for i in histories.items[u][text.newest_target(u, settings.max_behaviour_tokens)]]
                for u, user in enumerate(histories.users)}
    return [items_of.get(u, []) for u in users]


def ridge_heldout_r2(vectors: np.ndarray, target: np.ndarray, alpha: float = 100.0, seed: int = 0) -> float:
    """Held-out R^2 of a ridge regression from standardised ``vectors (U, ...)`` to ``target (U,)``: trained on
    a random 75% of the users (seed 0), scored on the rest."""
    x = vectors.reshape(len(vectors), -1).astype(np.float64)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    order = np.random.default_rng(seed).permutation(len(x))
    train, test = order[: int(0.75 * len(x))], order[int(0.75 * len(x)):]
    offset = target[train].mean()
    weights = np.linalg.solve(x[train].T @ x[train] + alpha * np.eye(x.shape[1]), x[train].T @ (target[train] - offset))
    residual = target[test] - (x[test] @ weights + offset)
    return float(1 - (residual ** 2).sum() / ((target[test] - target[test].mean()) ** 2).sum())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--model", default="DeepFM")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip_downstream", action="store_true")
    parser.add_argument("--tag", default="", help="suffix of the result files, for variants of the defaults")
    args, rest = parser.parse_known_args(argv)
    overrides = {}
    for item in rest:
        key, _, value = item.lstrip("-").partition("=")
        overrides[key] = parse_value(value)
    torch.set_num_threads(args.threads)
    overrides.setdefault("uip_num_threads", args.threads)
    overrides.setdefault("show_progress", False)

    from recbole.utils import init_logger

    config = build_config(args.model, args.dataset, None, {**overrides, "uip": True})
    init_logger(config)
    logger = getLogger()
    settings = UIPSettings.from_config(config)
    files = check_dataset_files(config)
    start = time.perf_counter()
    target = infer_profiles(config, settings)
    infer_seconds = time.perf_counter() - start
    bank = FeatureBank.load(target / "bank")
    report: dict = {
        "dataset": args.dataset, "threads": args.threads, "llm": settings.llm, "profiles": settings.profiles,
        "codebook_sizes": settings.codebook_sizes, "uip_epochs": settings.epochs,
        "inference_seconds_this_run": round(infer_seconds, 1),
        "inference_seconds_when_computed": bank.metadata.get("seconds"), "users": len(bank.users),
    }

    # --- history similarity ------------------------------------------------------------------------------
    dataset, train = build_training_split(config)   # built once: sequences, incidence and mean ratings share it
    sequences, mean_rating = training_sequences(dataset, train, bank.users)
    incidence = incidence_of(sequences, dataset.item_num)
    item_sim = cosine_matrix(incidence)
    attr_field = item_attribute_field(dataset, settings.item_text_fields)
    attr_hist = attribute_histogram(incidence, dataset, attr_field) if attr_field else None
    attr_sim = cosine_matrix(attribute_shares(attr_hist)) if attr_hist is not None else None

    groupings = {f"UIP {name}": bank.codes[:, p] for p, name in enumerate(bank.profiles)}
    k = max(settings.codebook_sizes.values())
    recent_items: dict[str, np.ndarray] = {}
    if attr_hist is not None:
        groupings[f"k-means over {attr_field} histogram (no LLM)"] = kmeans_ids(attribute_shares(attr_hist), k)
        # The same baseline restricted to what the LLM reads in the M-step, then to the N most recent items.
        written = behaviour_text_items(config, settings, bank.users)
        report["behaviour_text_items_per_user"] = float(np.mean([len(w) for w in written]))
        report["training_items_per_user"] = float(incidence.sum(1).mean())
        window = incidence_of([list(dataset.token2id(dataset.iid_field, tokens)) for tokens in written], dataset.item_num)
        assert np.all(window <= incidence), "the behaviour text wrote an item outside the user's training history"
        groupings[f"k-means over {attr_field} histogram of the behaviour-text items only (no LLM)"] = kmeans_ids(
            attribute_shares(attribute_histogram(window, dataset, attr_field)), k)
        for n in (10, 20, 40, 80):
            recent = incidence_of([items[-n:] for items in sequences], dataset.item_num)
            recent_items[str(n)] = kmeans_ids(attribute_shares(attribute_histogram(recent, dataset, attr_field)), k)
    if bank.summaries is not None:
        groupings["k-means over pooled LLM hidden states (no prompt tuning)"] = kmeans_ids(bank.summaries, k)
    rows = []
    for name, ids in groupings.items():
        counts = np.bincount(ids, minlength=k)
        entry = {"grouping": name, "usage": counts.tolist(),
                 "perplexity": float(np.exp(-(p := counts[counts > 0] / counts.sum()) @ np.log(p)))}
        item_test = group_similarity_test(item_sim, ids)
        entry["items"] = item_test.__dict__ | {"z": item_test.z_score}
        if attr_sim is not None:
            attr_test = group_similarity_test(attr_sim, ids)
            entry[attr_field] = attr_test.__dict__ | {"z": attr_test.z_score}
        rows.append(entry)
        logger.info(f"{name}: items z={item_test.z_score:.1f} p={item_test.p_value:.4f}")
    report["similarity"] = rows
    report["history_length"] = [
        {"recent_items": int(n), "items": group_similarity_test(item_sim, ids).z_score} for n, ids in recent_items.items()]
    report["nmi_between_profiles"] = (normalized_mutual_information(bank.codes[:, 0], bank.codes[:, 1])
                                      if len(bank.profiles) > 1 else None)

    # --- rating behaviour: does a grouping / a representation know how the user rates? -----------------------
    if mean_rating is not None:
        report["rating"] = {
            "explained_by_grouping": {name: explained_variance(mean_rating, ids) for name, ids in groupings.items()},
            "explained_by_random_groups": float(np.mean([explained_variance(
                mean_rating, np.random.default_rng(seed).permutation(bank.codes[:, 0])) for seed in range(20)])),
            "ridge_r2": {name: ridge_heldout_r2(vectors, mean_rating) for name, vectors in
                         {"LLM summaries z": bank.summaries, "soft-token offsets": bank.offsets}.items()
                         if vectors is not None},
        }

    # --- NMI with the dataset's own user attributes ---------------------------------------------------------
    if "user" in files:
        from recbole_uip.data.atomic import read_atomic

        table = read_atomic(files["user"], config["field_separator"], config["encoding"])
        row_of = {u: r for r, u in enumerate(table.column(config["USER_ID_FIELD"]))}
        nmi = {}
        rng = np.random.default_rng(0)
        for field in table.fields:
            if field == config["USER_ID_FIELD"] or table.field_type(field) != "token":
                continue
            values = [table.rows[row_of[u]][table.fields.index(field)] if u in row_of else "" for u in bank.users]
            if len(set(values)) > 50:
                continue
            nmi[field] = {name: {"nmi": normalized_mutual_information(ids, values),
                                 "nmi_shuffled": normalized_mutual_information(rng.permutation(ids), values)}
                          for name, ids in groupings.items()}
        report["nmi_with_user_attributes"] = nmi

    # --- downstream: none vs UIP vs shuffled UIP -----------------------------------------------------------
    if not args.skip_downstream:
        rng = np.random.default_rng(12345)
        shuffled = FeatureBank(
            fingerprint=bank.fingerprint + "-shuffled", profiles=bank.profiles, users=bank.users,
            codes=bank.codes[rng.permutation(len(bank.users))], codebooks=bank.codebooks,
            no_history_token=bank.no_history_token, metadata={"note": "codes permuted across users"},
        )
        shuffled_target = write_augmented_dataset(config, settings, files, shuffled, target.parent / f"{args.dataset}-uipshuf")
        variants = {
            "no profiles": config,
            "UIP IDs": augmented_config(config, settings, target, None, {**overrides, "uip": True}),
            "UIP IDs shuffled across users": augmented_config(config, settings, shuffled_target, None, {**overrides, "uip": True}),
        }
        downstream = {name: [] for name in variants}
        for seed in range(args.seeds):
            for name, run_config in variants.items():
                t0 = time.perf_counter()
                result = run_recbole_with_config(run_config, saved=True, model_seed=2020 + seed)
                downstream[name].append({"seed": 2020 + seed, **{k: float(v) for k, v in result["test_result"].items()},
                                         "valid": {k: float(v) for k, v in result["best_valid_result"].items()},
                                         "seconds": round(time.perf_counter() - t0, 1)})
                logger.info(f"{name} seed {seed}: {dict(result['test_result'])}")
        report["downstream"] = downstream
        comparisons = {}
        for metric in ("auc", "logloss"):
            get = lambda name: [r[metric] for r in downstream[name]]  # noqa: E731
            comparisons[metric] = {
                "UIP vs shuffled": paired_summary(get("UIP IDs"), get("UIP IDs shuffled across users")),
                "UIP vs none": paired_summary(get("UIP IDs"), get("no profiles")),
            }
        report["comparisons"] = comparisons
    RESULTS.mkdir(exist_ok=True)
    report["overrides"] = {k: v for k, v in overrides.items() if k.startswith("uip_") and k != "uip_num_threads"}
    stem = f"informativeness_{args.dataset}{'_' + args.tag if args.tag else ''}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    (RESULTS / f"{stem}.md").write_text(render_markdown(report))
    print((RESULTS / f"{stem}.md").read_text())
    return 0


def render_markdown(report: dict) -> str:
    lines = [f"# Are the profiles informative? ({report['dataset']})", "",
             f"LLM `{report['llm']}`, profiles {list(report['profiles'])}, codebook sizes "
             f"{report['codebook_sizes']}, {report['uip_epochs']} EM rounds, {report['threads']} threads, "
             f"{report['users']} users with training history. Inference took "
             f"{report['inference_seconds_when_computed']} s when the bank was computed. Leak-free: every measure "
             "uses the training split only." + (f" Settings changed from the defaults: {report['overrides']}."
                                                 if report.get("overrides") else ""), "",
             "## Users sharing an ID vs random groups of the same sizes", "",
             "Mean cosine similarity of a user's training history to the other users with the same ID; `random` is "
             "the mean (std) over 1000 random regroupings with the same group sizes; p: share of regroupings at least "
             "as similar.", ""]
    keys = [k for k in report["similarity"][0] if k not in ("grouping", "usage", "perplexity")]
    header = "| grouping | usage | perplexity | " + " | ".join(f"{k}: observed / random (std) / z / p" for k in keys) + " |"
    lines += [header, "|" + "---|" * (3 + len(keys))]
    for row in report["similarity"]:
        cells = [f"{row[k]['observed']:.4f} / {row[k]['random_mean']:.4f} ({row[k]['random_std']:.4f}) / "
                 f"{row[k]['z']:.1f} / {row[k]['p_value']:.4f}" for k in keys]
        lines.append(f"| {row['grouping']} | {row['usage']} | {row['perplexity']:.2f} | " + " | ".join(cells) + " |")
    if report.get("history_length"):
        lines += ["", f"How much history the attribute k-means needs: the LLM's behaviour text holds "
                  f"{report['behaviour_text_items_per_user']:.1f} items per user on average, of "
                  f"{report['training_items_per_user']:.1f} training items. Item-history z of the k-means over the "
                  f"attribute histogram of each user's N most recent training items:", "",
                  "| N most recent items | " + " | ".join(str(r["recent_items"]) for r in report["history_length"]) + " |",
                  "|---|" + "---|" * len(report["history_length"]),
                  "| items z | " + " | ".join(f"{r['items']:.1f}" for r in report["history_length"]) + " |"]
    if report.get("rating"):
        rating = report["rating"]
        lines += ["", "## Does it know how the user rates?", "",
                  "Share of the variance of the users' mean training rating explained by each grouping (eta squared; "
                  f"random groups with the first profile's sizes: {rating['explained_by_random_groups']:.3f}, mean "
                  "of 20), and the held-out R^2 of a ridge regression (alpha 100, 75% of users to fit) from the "
                  "continuous representations.", "",
                  "| grouping | variance of mean rating explained |", "|---|---|"]
        lines += [f"| {name} | {value:.3f} |" for name, value in rating["explained_by_grouping"].items()]
        lines += ["", "| representation | ridge held-out R^2 |", "|---|---|"]
        lines += [f"| {name} | {value:.3f} |" for name, value in rating["ridge_r2"].items()]
    if report.get("nmi_between_profiles") is not None:
        lines += ["", f"NMI between the two profiles' IDs: {report['nmi_between_profiles']:.3f}."]
    if report.get("nmi_with_user_attributes"):
        lines += ["", "## NMI with the dataset's own user attributes (shuffled IDs in parentheses)", "",
                  "| grouping | " + " | ".join(report["nmi_with_user_attributes"]) + " |",
                  "|---|" + "---|" * len(report["nmi_with_user_attributes"])]
        for name in report["nmi_with_user_attributes"][next(iter(report["nmi_with_user_attributes"]))]:
            cells = [f"{v[name]['nmi']:.4f} ({v[name]['nmi_shuffled']:.4f})" for v in report["nmi_with_user_attributes"].values()]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "downstream" in report:
        lines += ["", "## DeepFM on the test set (split fixed, model seeds vary; early stopping)", "",
                  "| features | AUC mean (std) | LogLoss mean (std) | runs |", "|---|---|---|---|"]
        for name, runs in report["downstream"].items():
            auc = np.array([r["auc"] for r in runs])
            ll = np.array([r["logloss"] for r in runs])
            lines.append(f"| {name} | {auc.mean():.4f} ({auc.std(ddof=1) if len(auc) > 1 else 0:.4f}) | "
                         f"{ll.mean():.4f} ({ll.std(ddof=1) if len(ll) > 1 else 0:.4f}) | {len(runs)} |")
        lines += ["", "| comparison | metric | mean paired difference | paired t-test p |", "|---|---|---|---|"]
        for metric, comps in report["comparisons"].items():
            for name, c in comps.items():
                lines.append(f"| {name} | {metric} | {c['mean_diff']:+.4f} | {c['p_paired_t']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
