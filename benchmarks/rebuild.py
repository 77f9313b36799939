"""IDs that stay put: how many users keep their profile ID when the bank is rebuilt, with and without
``uip_align_to``.

    python benchmarks/rebuild.py --dataset=ml-100k [--more=0.1] [--key=value ...]

Two rebuilds of the default bank:

* **another seed**: the same data with ``seed`` 2021 instead of 2020 (another training split, another k-means start);
* **more data**: the bank of the dataset without its newest ``--more`` share of interactions (by timestamp), then the
  bank of the whole dataset, as a feature bank refreshed after new interactions arrive.

For each, the share of users (held by both banks) whose ID is the same, per profile: as k-means numbers them, and
after the rebuild's codes are matched to the previous bank's (``uip_align_to``); the NMI of the two groupings
(independent of the numbering).

**What a model trained on the previous bank loses when served the rebuilt one**: DeepFM (``--seeds`` model seeds,
the zoo's training keys, user_id embedded as in a plain RecBole run) trains on the previous bank's IDs; its test
interactions are then scored with the IDs of each rebuilt bank put in place of the previous ones (a user the
rebuild does not hold gets ``none``). Writes ``results/<dataset>/<settings fingerprint>/rebuild.{json,md}``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from recbole_uip.benchmarking import (
    CTR_TRAINING, benchmark_parser, configure, parse_known_with_overrides, publish_benchmark, run_record, settings_table,
)


def parse_args(argv=None):
    parser = benchmark_parser(__doc__)
    parser.add_argument("--more", type=float, default=0.1, help="share of newest interactions the earlier bank lacks")
    parser.add_argument("--seeds", type=int, default=3, help="DeepFM model seeds for the served-bank test")
    return parse_known_with_overrides(parser, argv)


def shuffled(bank):
    """The bank's IDs with whole rows permuted across users (seed 12345, as the zoo's control)."""
    import dataclasses

    return dataclasses.replace(bank, codes=bank.codes[np.random.default_rng(12345).permutation(len(bank.users))])


def compare(previous, rebuilt_plain, rebuilt_aligned) -> dict:
    """Per profile: users shared, the share keeping their ID without and with matching, and the groupings' NMI."""
    from recbole_uip.report import normalized_mutual_information

    shared = [u for u in rebuilt_plain.users if u in set(previous.users)]
    old = previous.codes[[previous.users.index(u) for u in shared]]
    plain = rebuilt_plain.codes[[rebuilt_plain.users.index(u) for u in shared]]
    aligned = rebuilt_aligned.codes[[rebuilt_aligned.users.index(u) for u in shared]]
    return {"users_shared": len(shared), "profiles": {
        name: {"kept_unmatched": float((plain[:, p] == old[:, p]).mean()),
               "kept_matched": float((aligned[:, p] == old[:, p]).mean()),
               "nmi": normalized_mutual_information(plain[:, p], old[:, p])}
        for p, name in enumerate(previous.profiles)}}


def served_auc(config, served: dict, seeds: int) -> dict:
    """Test AUC of DeepFM trained on ``config``'s dataset (the previous bank's IDs), then scored with each bank of
    ``served`` (name -> bank, ``None``: the IDs it trained on) in place of them. Mean over ``seeds`` model seeds."""
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_trainer, init_seed

    from recbole_uip.compat import patch_recbole_checkpoint_loading
    from recbole_uip.model.fusion import model_class_for_run

    patch_recbole_checkpoint_loading()          # RecBole 1.2.1 loads its checkpoints with torch's old default
    config["checkpoint_dir"] = tempfile.mkdtemp(prefix="uip-rebuild-ckpt-")
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train, valid, test = data_preparation(config, dataset)
    users = test._dataset.field2id_token[test._dataset.uid_field]
    fields = {name: f"uip_{name}" for name in next(b for b in served.values() if b is not None).profiles}
    original = {field: test._dataset.user_feat[field].clone() for field in fields.values()}
    auc: dict[str, list[float]] = {name: [] for name in served}
    for seed in range(2020, 2020 + seeds):
        init_seed(seed, config["reproducibility"])
        model = model_class_for_run(config)(config, train._dataset).to(config["device"])
        trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
        trainer.fit(train, valid, saved=True, show_progress=False)
        trainer.evaluate(test, load_best_model=True, show_progress=False)      # the best weights, loaded once
        for name, bank in served.items():
            for profile, field in fields.items():
                column = original[field].clone()
                if bank is not None:
                    index = test._dataset.field2token_id[field]
                    for row in range(1, len(users)):
                        column[row] = index.get(bank.token(str(users[row]), profile), 0)
                test._dataset.user_feat[field] = column
            auc[name].append(float(trainer.evaluate(test, load_best_model=False, show_progress=False)["auc"]))
        for field, column in original.items():
            test._dataset.user_feat[field] = column
    shutil.rmtree(config["checkpoint_dir"], ignore_errors=True)
    return {name: {"auc": float(np.mean(values)), "runs": values} for name, values in auc.items()}


def main(argv=None) -> int:
    from recbole_uip.bank import FeatureBank
    from recbole_uip.data.atomic import read_atomic
    from recbole_uip.quick_start import augmented_config, build_config, check_dataset_files, infer_profiles

    args, overrides = parse_args(argv)
    config, settings, logger = configure("DeepFM", args.dataset, overrides)
    work = Path(tempfile.mkdtemp(prefix="uip-rebuild-"))

    def bank(name: str, dataset: str = args.dataset, **extra) -> FeatureBank:
        run = build_config("DeepFM", dataset, None, {"uip": True, **overrides, "uip_output_dir": str(work / name), **extra})
        return FeatureBank.load(infer_profiles(run) / "bank")

    try:
        rows = {}
        previous = bank("previous")
        previous_dir = work / "previous" / f"{args.dataset}-uip" / "bank"
        rows["another seed"] = compare(previous, bank("seed", seed=2021),
                                       bank("seed_aligned", seed=2021, uip_align_to=str(previous_dir)))
        # the earlier dataset: every file as it is, the .inter without its newest interactions
        files = check_dataset_files(config)
        earlier = f"{args.dataset}-earlier"
        folder = work / "data" / earlier
        folder.mkdir(parents=True)
        for suffix, path in files.items():
            if suffix != "inter":
                shutil.copyfile(path, folder / f"{earlier}.{suffix}")
        inter = read_atomic(files["inter"], config["field_separator"], config["encoding"])
        times = np.array([float(t) for t in inter.column(config["TIME_FIELD"])])
        cut = np.quantile(times, 1 - args.more)
        with open(folder / f"{earlier}.inter", "w", encoding="utf-8") as handle:
            handle.write(inter.header + "\n")
            handle.writelines("\t".join(row) + "\n" for row, t in zip(inter.rows, times) if t <= cut)
        presets = {key: config[key] for key in ("load_col", "threshold") if config[key] is not None}
        earlier_bank = bank("earlier", earlier, data_path=str(work / "data"), **presets)
        earlier_dir = work / "earlier" / f"{earlier}-uip" / "bank"
        more_plain, more_aligned = bank("more"), bank("more_aligned", uip_align_to=str(earlier_dir))
        rows[f"{args.more:.0%} more interactions"] = compare(earlier_bank, more_plain, more_aligned)

        # a model trained on the previous bank, served the rebuilt ones (another seed: same users, same split)
        previous_folder = work / "previous" / f"{args.dataset}-uip"
        run = augmented_config(build_config("DeepFM", args.dataset, None, {**overrides, **CTR_TRAINING, "uip": True}),
                               settings, previous_folder, None, {**overrides, **CTR_TRAINING})
        served = served_auc(run, {"the previous bank (trained on)": None,
                                  "another seed, unmatched": bank("seed", seed=2021),
                                  "another seed, matched": bank("seed_aligned", seed=2021, uip_align_to=str(previous_dir)),
                                  "the same IDs shuffled across users": shuffled(previous)}, args.seeds)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    data = {"rebuilds": rows, "more": args.more, "served": served, "seeds": args.seeds, "record": run_record(config, settings, ["benchmarks/rebuild.py", *args.argv])}
    lines = [f"# Rebuilding the bank: how many users keep their ID ({args.dataset})", "",
             "Share of the users held by both banks whose profile ID is the same: as k-means numbers the codes, and "
             "after matching the rebuild's codes to the previous bank's (`uip_align_to`). NMI: how alike the two "
             "groupings are, whatever their numbers (1: the same grouping). Chance agreement is about 1/8.", "",
             "| rebuild | users shared | profile | same ID, unmatched | same ID, matched | NMI |", "|---|---|---|---|---|---|"]
    for name, row in rows.items():
        for profile, v in row["profiles"].items():
            lines.append(f"| {name} | {row['users_shared']} | {profile} | {v['kept_unmatched']:.1%} | "
                         f"{v['kept_matched']:.1%} | {v['nmi']:.2f} |")
    reference = served["the previous bank (trained on)"]["auc"]
    lines += ["", f"DeepFM trained on the previous bank (user_id embedded; {args.seeds} model seeds), its test interactions "
              "scored with each bank's IDs:", "", "| IDs served | test AUC | vs the IDs it trained on |", "|---|---|---|"]
    for name, value in served.items():
        lines.append(f"| {name} | {value['auc']:.4f} | {value['auc'] - reference:+.4f} |")
    lines += ["", "## Run", "", settings_table(data["record"])]
    publish_benchmark(args, "rebuild", data, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
