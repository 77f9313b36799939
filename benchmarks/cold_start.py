"""Cold start: do profile IDs assigned from a new user's first few interactions help a CTR model that never saw
that user?

    python benchmarks/cold_start.py --dataset=ml-100k [--models=DeepFM,DCN,WideDeep,FM] [--seeds=3] [--ks=1,5,10]
                                    [--holdout=0.2] [--key=value ...]

Protocol (``recbole_uip.benchmarking.split_cold_start``, split seed 0):

* 20% of the users are held out entirely. The other users' interactions are the CTR training data (80%), the
  validation data for early stopping (10%) and their own test rows (10%); the feature bank is inferred from that
  training data only (RecBole's ``benchmark_filename``: the bank's training split is the training file), so no
  held-out user is in it.
* Each held-out user reveals their oldest ``max(ks)`` interactions as onboarding history. Every model is tested on
  the rest of their interactions, the same test rows for every k, so that a difference between k comes from the
  IDs alone. Their ``user_id`` is a model feature (a plain RecBole run) whose embedding was never trained.
* The test file holds both groups' test rows; every run is scored per group (``ctr_runs.group_metrics``): the
  held-out users' AUC and LogLoss, and the known users' on their own test rows, so that a gain for new users is
  seen next to what the known users get meanwhile.
* For k in ``--ks``, a held-out user's features come from their oldest k interactions alone:
  ``uip``: :meth:`FeatureBank.assign` (the bank's encoder and codebooks; items no training history had are embedded
  by the bank's LLM); ``shuffled``: the same IDs permuted among the held-out users; ``kmeans-genre``: a k-means of
  the training users' genre shares, the held-out user assigned to the nearest centre by the genre shares of their
  k items. ``demographics`` (age, gender, occupation) and ``none`` do not depend on k. Training users keep the
  bank's IDs (and their k-means cluster) in every run.

Every run appends one JSON line (resumable); ``results/<dataset>/<settings fingerprint>/cold_start.{jsonl,json,md,csv,png}``.
The report adds how far the IDs assigned from onboarding agree with those a full run including the held-out users
gives (code numbers matched; NMI).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from recbole_uip.benchmarking import (
    CTR_TRAINING, benchmark_parser, paired_test, parse_known_with_overrides, publish_result, read_records, results_dir, run_record,
    settings_table, split_cold_start,
)
from recbole_uip.ctr_runs import group_metrics
from recbole_uip.feature_sets import SHUFFLE_SEED
from recbole_uip.utils import atomic_write, sha256_json, write_json_atomic

TRAINING = CTR_TRAINING
DEMOGRAPHICS = ["age", "gender", "occupation"]
FEATURE_SETS = ["none", "demographics", "uip", "shuffled", "kmeans-genre", "uip+demographics"]
COMPARISONS = [("uip", "none"), ("uip", "shuffled"), ("uip", "kmeans-genre"), ("uip+demographics", "demographics"),
               ("demographics", "none"), ("kmeans-genre", "none")]


def parse_args(argv=None):
    parser = benchmark_parser(__doc__)
    parser.add_argument("--models", default="DeepFM,DCN,WideDeep,FM")
    parser.add_argument("--seeds", type=int, default=3, help="model seeds 2020, 2021, ...")
    parser.add_argument("--ks", default="1,5,10", help="onboarding interactions revealed")
    parser.add_argument("--holdout", type=float, default=0.2)
    parser.add_argument("--work_dir", default="dataset/cold_start", help="where the split dataset and bank are written")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each CTR run (inference: uip_num_threads)")
    parser.add_argument("--render", action="store_true", help="only render the report from the JSONL")
    args, overrides = parse_known_with_overrides(parser, argv)
    args.models = args.models.split(",")
    args.ks = sorted(int(k) for k in args.ks.split(","))
    return args, overrides


def columns(feature_set: str, k: int | None, profiles: list[str]) -> list[str]:
    """The .user columns a feature set loads (for its k)."""
    uip = [f"uip_{p}_k{k}" for p in profiles]
    return {"none": [], "demographics": DEMOGRAPHICS, "uip": uip, "shuffled": [f"shuffled_{p}_k{k}" for p in profiles],
            "kmeans-genre": [f"genre_{c}_k{k}" for c in range(len(profiles))],
            "uip+demographics": uip + DEMOGRAPHICS}[feature_set]


def genre_shares(items: list[list[str]], genres_of: dict[str, list[str]], vocabulary: list[str]) -> np.ndarray:
    """``(U, G)``: each user's share of genre mentions over their items."""
    index = {g: i for i, g in enumerate(vocabulary)}
    out = np.zeros((len(items), len(vocabulary)), dtype=np.float32)
    for u, history in enumerate(items):
        for item in history:
            for genre in genres_of.get(item, []):
                out[u, index[genre]] += 1
    return out / np.maximum(out.sum(1, keepdims=True), 1)


def kmeans_fit_predict(train: np.ndarray, new: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """k-means on ``train`` (standardised over it), and the nearest centre of each row of ``new``."""
    from recbole_uip.report import kmeans_ids

    mean, std = train.mean(0), np.maximum(train.std(0), 1e-6)
    x, y = (train - mean) / std, (new - mean) / std
    labels = kmeans_ids(x, k, seed=seed, standardise=False)
    centres = np.stack([x[labels == c].mean(0) if (labels == c).any() else np.full(x.shape[1], np.inf) for c in range(k)])
    return labels, ((y[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)


def prepare(args, overrides: dict, logger):
    """Write the split dataset, infer the bank on its training file, assign the held-out users; return what the runs
    need."""
    from recbole_uip.bank import FeatureBank
    from recbole_uip.config import UIPSettings
    from recbole_uip.data.atomic import MANIFEST_NAME, read_atomic
    from recbole_uip.quick_start import build_config, check_dataset_files, infer_profiles
    from recbole_uip.report import normalized_mutual_information
    from recbole_uip.serving import align_codes, embed_new_items

    base = build_config(args.models[0], args.dataset, None, {"uip": True, **overrides})
    settings = UIPSettings.from_config(base)
    files = check_dataset_files(base)
    separator, encoding = base["field_separator"], base["encoding"]
    inter = read_atomic(files["inter"], separator, encoding)
    user_field, item_field = base["USER_ID_FIELD"], base["ITEM_ID_FIELD"]
    users, items = inter.column(user_field), inter.column(item_field)
    times = [float(t) for t in inter.column(base["TIME_FIELD"])]
    ratings = [float(r) for r in inter.column(base["RATING_FIELD"])]
    onboarding = max(args.ks)
    split = split_cold_start(users, times, args.holdout, onboarding, valid_share=0.1, seed=0, test_share=0.1)

    name = f"{args.dataset}-cold"
    folder = Path(args.work_dir) / name
    folder.mkdir(parents=True, exist_ok=True)

    def write_inter(path: Path, rows) -> None:
        with atomic_write(path) as handle:
            handle.write(inter.header + "\n")
            handle.writelines(separator.join(inter.rows[r]) + "\n" for r in rows)

    # .inter holds every row (what recbole-uip's checks and fingerprint read); RecBole loads the three split files
    write_inter(folder / f"{name}.inter", range(len(users)))
    tested = np.sort(np.concatenate([split["test"], split["warm_test"]]))      # both groups, scored apart
    for part, rows in (("train", split["train"]), ("valid", split["valid"]), ("test", tested)):
        write_inter(folder / f"{name}.{part}.inter", rows)
    shutil.copyfile(files["item"], folder / f"{name}.item")
    write_json_atomic(folder / MANIFEST_NAME, {"fingerprint": sha256_json(
        {"split": {k: v.tolist() for k, v in split.items()}, "ks": args.ks})})

    benchmark = {"benchmark_filename": ["train", "valid", "test"]}
    user_table = read_atomic(files["user"], separator, encoding)
    shutil.copyfile(files["user"], folder / f"{name}.user")
    infer_config = build_config(args.models[0], name, None, {
        "uip": True, **overrides, **benchmark, "data_path": str(Path(args.work_dir)), "load_col": base["load_col"],
        "threshold": base["threshold"], "uip_output_dir": str(Path(args.work_dir) / "profiles")})
    bank = FeatureBank.load(infer_profiles(infer_config) / "bank")
    cold = split["cold"].tolist()
    leaked = set(cold) & set(bank.users)
    if leaked:
        raise AssertionError(f"held-out users in the bank: {sorted(leaked)[:5]}")
    logger.info(f"cold start: bank {bank.fingerprint[:12]} from {len(bank.users)} training users; {len(cold)} held out")

    revealed: dict[str, list[int]] = {u: [] for u in cold}
    for r in split["onboarding"]:
        revealed[users[r]].append(int(r))
    for user in cold:
        revealed[user].sort(key=lambda r: (times[r], r))
    embedded_before = set(bank.encoder.item_ids)
    new_items = sorted({items[r] for r in split["onboarding"]} - embedded_before)
    bank, embedded = embed_new_items(bank, new_items, folder / f"{name}.item", item_field, base, settings.llm_cache_dir)
    logger.info(f"cold start: {embedded} onboarding items outside every training history embedded by the LLM")

    item_table = read_atomic(files["item"], separator, encoding)
    genre_field = "class" if "class" in item_table.fields else None
    genres_of = {i: g.split(base["seq_separator"]) for i, g in zip(item_table.column(item_field), item_table.column(genre_field))}
    vocabulary = sorted({g for gs in genres_of.values() for g in gs})
    train_items: dict[str, list[str]] = {}
    for r in split["train"]:
        train_items.setdefault(users[r], []).append(items[r])
    warm = bank.users
    warm_shares = genre_shares([train_items.get(u, []) for u in warm], genres_of, vocabulary)

    # "a full run including them": the default bank of the whole dataset (its own 8:1:1 split), held-out users in it
    full = FeatureBank.load(infer_profiles(build_config(args.models[0], args.dataset, None, {
        "uip": True, **overrides, "uip_output_dir": str(Path(args.work_dir) / "full")})) / "bank")
    agreement = {}

    values: dict[str, dict[str, str]] = {u: {} for u in user_table.column(user_field)}
    sizes = [c.shape[0] for c in bank.codebooks]
    shuffle = np.random.default_rng(SHUFFLE_SEED).permutation(len(cold))
    coverage = {}
    for k in args.ks:
        histories = [[items[r] for r in revealed[u][:k]] for u in cold]
        known = set(bank.encoder.item_ids)
        kept = [[i for i, item in enumerate(h) if item in known] for h in histories]
        assigned = bank.assign([[h[i] for i in keep] for h, keep in zip(histories, kept)],
                               [[ratings[revealed[u][i]] for i in keep] for u, keep in zip(cold, kept)])
        coverage[k] = float(np.mean([all(item in embedded_before for item in h) for h in histories]))
        in_full = [u for u in cold if u in full.users]
        mine = FeatureBank(fingerprint="assigned", profiles=bank.profiles, users=in_full, no_history_token="none",
                           codes=assigned[[cold.index(u) for u in in_full]], codebooks=bank.codebooks)
        _, same = align_codes(mine, full)
        theirs = full.codes[[full.users.index(u) for u in in_full]]
        agreement[k] = {name: {"same_id_after_matching": same[name],
                               "nmi": normalized_mutual_information(mine.codes[:, p], theirs[:, p])}
                        for p, name in enumerate(bank.profiles)}
        cold_shares = genre_shares(histories, genres_of, vocabulary)
        for p, profile in enumerate(bank.profiles):
            for row, user in enumerate(warm):
                values[user][f"uip_{profile}_k{k}"] = values[user][f"shuffled_{profile}_k{k}"] = str(int(bank.codes[row, p]))
            for row, user in enumerate(cold):
                values[user][f"uip_{profile}_k{k}"] = str(int(assigned[row, p]))
                values[user][f"shuffled_{profile}_k{k}"] = str(int(assigned[shuffle[row], p]))
        for c, size in enumerate(sizes):
            warm_labels, cold_labels = kmeans_fit_predict(warm_shares, cold_shares, size, seed=c)
            for row, user in enumerate(warm):
                values[user][f"genre_{c}_k{k}"] = str(int(warm_labels[row]))
            for row, user in enumerate(cold):
                values[user][f"genre_{c}_k{k}"] = str(int(cold_labels[row]))
    new_fields = sorted({f for v in values.values() for f in v})
    with atomic_write(folder / f"{name}.user") as handle:
        handle.write(separator.join([user_table.header] + [f"{f}:token" for f in new_fields]) + "\n")
        for row, user in zip(user_table.rows, user_table.column(user_field)):
            handle.write(separator.join(row + [values[user].get(f, "none") for f in new_fields]) + "\n")
    return base, settings, bank, folder, benchmark, set(cold), {
        "bank": bank.fingerprint[:12], "training_users": len(warm), "held_out_users": len(cold),
        "rows": {k: int(len(v)) for k, v in split.items() if k != "cold"}, "items_embedded_for_onboarding": embedded,
        "onboarding_items_known_share": coverage, "agreement_with_full_run": agreement, "full_bank": full.fingerprint[:12]}


def run_config(base, settings, folder: Path, benchmark: dict, model: str, load_user: list[str], overrides: dict):
    """One run's config: the dataset copy under its own name, with the presets the original name carries."""
    from recbole_uip.quick_start import augmented_config, build_config

    # augmented_config carries every key in which the original's config differs over to the copy: the training keys
    # go into the original's config too; benchmark_filename (the copy's alone) is set on the result
    model_base = build_config(model, base["dataset"], None, {**overrides, **TRAINING, "uip": False})
    config = augmented_config(model_base, settings, folder, None, {**overrides, **TRAINING, "uip": False})
    load_col = {key: list(value) for key, value in config["load_col"].items()}
    load_col["user"] = [base["USER_ID_FIELD"], *load_user]
    config["load_col"] = load_col
    config["benchmark_filename"] = benchmark["benchmark_filename"]
    config["checkpoint_dir"] = str(Path("saved") / f"cold-start-{model}")
    for key, value in {**TRAINING, **benchmark}.items():
        if config[key] != value:
            raise AssertionError(f"cold start: {key} is {config[key]!r} in the run's config, expected {value!r}")
    return config


def summarise(records: list[dict], ks: list[int]) -> dict:
    """Per k: mean test AUC and LogLoss per feature set, and the paired comparisons over models and seeds."""
    def metric(name, feature_set, k):
        return {(r["model"], r["seed"]): r[name] for r in records
                if r["feature_set"] == feature_set and r["k"] in (k, None)}
    out = {}
    for k in ks:
        row = {"comparisons": {}, "logloss_comparisons": {}, "valid_comparisons": {}}
        row["warm_comparisons"] = {}
        for name, key in (("auc", "comparisons"), ("logloss", "logloss_comparisons"), ("valid_auc", "valid_comparisons"),
                          ("warm_auc", "warm_comparisons")):
            sets = {fs: metric(name, fs, k) for fs in FEATURE_SETS}
            row[f"mean_{name}"] = {fs: float(np.mean(list(v.values()))) for fs, v in sets.items() if v}
            if name == "warm_auc":
                row["mean_warm_logloss"] = {fs: float(np.mean(list(metric("warm_logloss", fs, k).values())))
                                            for fs in sets if sets[fs]}
            for a, b in COMPARISONS:
                keys = sorted(set(sets[a]) & set(sets[b]))
                if len(keys) >= 2:
                    mean, std, p = paired_test([sets[a][x] for x in keys], [sets[b][x] for x in keys])
                    wins = int(sum(sets[a][x] > sets[b][x] for x in keys))
                    row[key][f"{a} - {b}"] = {"mean": mean, "std": std, "p": p, "wins": wins, "n": len(keys)}
        out[str(k)] = row
    return out


def write_csv_and_plot(records: list[dict], summary: dict, folder: Path) -> None:
    """``cold_start.csv`` (one row per run) and ``cold_start.png`` (mean test AUC per feature set and k)."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with atomic_write(folder / "cold_start.csv") as handle:
        writer = csv.DictWriter(handle, fieldnames=["model", "seed", "feature_set", "k", "auc", "logloss", "warm_auc",
                                                    "warm_logloss", "valid_auc", "epochs", "seconds", "bank"])
        writer.writeheader()
        writer.writerows(records)
    ks = list(summary)
    figure, axis = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / len(FEATURE_SETS)
    for i, fs in enumerate(FEATURE_SETS):
        axis.bar(np.arange(len(ks)) + i * width, [summary[k]["mean_auc"].get(fs, np.nan) for k in ks], width, label=fs)
    axis.set_xticks(np.arange(len(ks)) + 0.4 - width / 2, [f"k={k}" for k in ks])
    values = [v for k in ks for v in summary[k]["mean_auc"].values()]
    axis.set_ylim(min(values) - 0.01, max(values) + 0.005)
    axis.set_ylabel("test AUC, held-out users")
    axis.legend(fontsize=7, ncol=3)
    figure.tight_layout()
    figure.savefig(folder / "cold_start.png", dpi=120)
    plt.close(figure)


def comparison_table(summary: dict, key: str, wins: bool) -> list[str]:
    """Markdown rows: one per comparison, one column per k, from ``summary[k][key]``."""
    ks = list(summary)
    lines = ["| comparison | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for a, b in COMPARISONS:
        cells = []
        for k in ks:
            c = summary[k][key].get(f"{a} - {b}")
            tail = f", {c['wins']}/{c['n']}" if c is not None and wins else ""
            cells.append("-" if c is None else f"{c['mean']:+.4f} (p {c['p']:.2g}{tail})")
        lines.append(f"| {a} - {b} | " + " | ".join(cells) + " |")
    return lines


def render(data: dict) -> str:
    ks = list(data["summary"])
    lines = [f"# Cold start ({data['record']['dataset']}): IDs from a new user's first k interactions", "",
             f"{data['prepared']['held_out_users']} users held out entirely ({data['prepared']['training_users']} "
             f"train the models and the bank {data['prepared']['bank']}); tested on their interactions after the first "
             f"{max(map(int, ks))} (the same rows for every k), with a user_id embedding that never trained. Models "
             f"{', '.join(data['models'])} x {data['seeds']} seeds, {data['threads_per_run']} torch thread per run; test "
             f"AUC.", "",
             "| feature set | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for fs in FEATURE_SETS:
        lines.append(f"| {fs} | " + " | ".join(f"{data['summary'][k]['mean_auc'].get(fs, float('nan')):.4f} (LogLoss "
                                              f"{data['summary'][k]['mean_logloss'].get(fs, float('nan')):.4f})"
                                              for k in ks) + " |")
    lines += ["", "Test AUC (LogLoss) means; paired AUC differences over models and seeds (mean, t-test p, runs where "
              "the first is higher):", ""] + comparison_table(data["summary"], "comparisons", wins=True)
    lines += ["", "The same comparisons on test LogLoss (lower is better):", ""] \
        + comparison_table(data["summary"], "logloss_comparisons", wins=False)
    lines += ["", "The known users meanwhile, on their own test rows (10% of their interactions, never trained on, "
              "not used for early stopping): test AUC (LogLoss) means", "",
              "| feature set | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for fs in FEATURE_SETS:
        lines.append(f"| {fs} | " + " | ".join(f"{data['summary'][k]['mean_warm_auc'].get(fs, float('nan')):.4f} (LogLoss "
                                              f"{data['summary'][k]['mean_warm_logloss'].get(fs, float('nan')):.4f})"
                                              for k in ks) + " |")
    lines += ["", "and the paired AUC differences on those rows:", ""] \
        + comparison_table(data["summary"], "warm_comparisons", wins=True)
    known = data["prepared"]["onboarding_items_known_share"]
    lines += ["", f"- Onboarding items outside every training history, embedded by the bank's LLM: "
              f"{data['prepared']['items_embedded_for_onboarding']}; share of held-out users whose first k items the "
              f"bank had embedded already: " + ", ".join(f"k={k}: {v:.0%}" for k, v in known.items()) + ".",
              f"- Rows: {data['prepared']['rows']}."]
    agreement = data["prepared"].get("agreement_with_full_run")
    if agreement:
        lines += [f"- Agreement of the held-out users' assigned IDs with those a full run including them gives (bank "
                  f"{data['prepared']['full_bank']}, the default split of the whole dataset; code numbers matched, "
                  f"chance is about 1/8): " + "; ".join(
                      f"k={k}: " + ", ".join(f"{name} {v['same_id_after_matching']:.0%} (NMI {v['nmi']:.2f})"
                                             for name, v in row.items()) for k, row in agreement.items()) + "."]
    lines += ["", "## Run", "", settings_table(data["record"])]
    return "\n".join(lines)


def main(argv=None) -> int:
    from recbole.utils import init_logger

    from recbole_uip.quick_start import build_config, run_recbole_with_config

    from recbole_uip.config import UIPSettings

    args, overrides = parse_args(argv)
    config = build_config(args.models[0], args.dataset, None, {"uip": True, **overrides})
    out = results_dir({"dataset": args.dataset, "settings": UIPSettings.from_config(config).fingerprint_dict()},
                      Path(args.results))
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "cold_start.jsonl"
    init_logger(config)
    logger = logging.getLogger()
    base, settings, bank, folder, benchmark, cold, prepared = prepare(args, overrides, logger)
    done = {(r["model"], r["seed"], r["feature_set"], r["k"]) for r in read_records(jsonl) if r["bank"] == prepared["bank"]}
    plan = [(model, 2020 + s, fs, None if fs in ("none", "demographics") else k)
            for model in args.models for s in range(args.seeds) for fs in FEATURE_SETS for k in args.ks]
    plan = list(dict.fromkeys(plan))
    todo = [p for p in plan if p not in done]
    logger.info(f"cold start: {len(todo)} runs to do, {len(plan) - len(todo)} done")
    import torch

    torch.set_num_threads(args.threads)
    for n, (model, seed, fs, k) in enumerate(todo if not args.render else [], 1):
        config = run_config(base, settings, folder, benchmark, model, columns(fs, k, bank.profiles), overrides)
        start = time.perf_counter()
        result = run_recbole_with_config(config, saved=True, model_seed=seed, after_test=lambda trained, data: (
            group_metrics(trained, data, lambda user: "cold" if user in cold else "warm")))
        groups = result["after_test"]
        record = {"model": model, "seed": seed, "feature_set": fs, "k": k, "bank": prepared["bank"],
                  "auc": groups["cold"]["auc"], "logloss": groups["cold"]["logloss"],
                  "warm_auc": groups["warm"]["auc"], "warm_logloss": groups["warm"]["logloss"],
                  "valid_auc": float(result["best_valid_result"]["auc"]), "epochs": result["epochs_trained"],
                  "seconds": round(time.perf_counter() - start, 1)}
        with open(jsonl, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        logger.info(f"cold start [{n}/{len(todo)}] {model} {fs} k={k} seed {seed}: AUC {record['auc']:.4f}")
    records = [r for r in read_records(jsonl) if r["bank"] == prepared["bank"]]
    data = {"models": args.models, "seeds": args.seeds, "ks": args.ks, "threads_per_run": args.threads, "prepared": prepared,
            "summary": summarise(records, args.ks), "runs": len(records),
            "record": run_record(base, settings, ["benchmarks/cold_start.py", *args.argv])}
    write_csv_and_plot(records, data["summary"], out)
    publish_result(out, "cold_start", data, render(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
