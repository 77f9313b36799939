"""Controlled CTR runs: one training configuration, datasets built once and checked, models trained on them.

A benchmark that compares user feature sets on context-aware (CTR) models needs every run to see the same
interactions, each interaction its own user's features, and the model exactly the intended user-side fields;
and it trains many (model, seed) pairs on one dataset. This module holds those pieces:

* :data:`TRAINING_DEFAULTS`, :func:`training_keys`, :func:`model_dict`, :data:`CTR_TRAINING`: the RecBole keys of a
  run (the zoo's measured choice, below), and per-model replacements (:data:`MODEL_KEYS_DEFAULT`).
* :func:`run_config`: the ``Config`` of one (user columns, setting) on a dataset copy; ``standard`` embeds user_id,
  ``id_free`` loads the user columns from ``.inter`` and drops user_id after the split.
* :func:`build_loaders`, :func:`split_view`, :func:`assert_same_split`, :func:`assert_user_features`,
  :func:`check_fields`: build the dataloaders once and check them against the plain run's split.
* :func:`train_and_test`: one model seed on prebuilt dataloaders; :func:`run_signature`: what makes two runs
  comparable; :func:`prepare_profiles`: infer or reuse the bank a grid runs on.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from recbole_uip.augmented import augmented_config
from recbole_uip.bank import FeatureBank
from recbole_uip.config import UIPSettings
from recbole_uip.data.atomic import MANIFEST_NAME, read_atomic
from recbole_uip.utils import sha256_json

FIRST_MODEL_SEED = 2020          # model seeds are 2020, 2021, ...; the split seed stays config['seed']
# Training configuration, chosen from measured single runs on ml-100k at 1 thread (uip+own, standard): RecBole's
# defaults (batch 2048, lr 0.001, patience 10, 300 epochs) need 30-50 epochs per run, far beyond a 384-run grid.
# Batch 4096 with lr 0.01 and patience 2 stopped every model after 6-21 epochs; against lr 0.005 / patience 3 (8-26
# epochs) test AUC was lower only for DeepFM (0.7891 vs 0.7914) and equal or higher for the other models; lr 0.02
# cost DeepFM 0.7 AUC points. The epoch cap is never hit (checked per run: cap_hit in the JSONL).
TRAINING_DEFAULTS = {"train_batch_size": 4096, "learning_rate": 0.01, "stopping_step": 2, "epochs": 100,
                     "eval_batch_size": 16384}
# What every CTR run evaluates and reports with (besides the training keys).
EVALUATION_KEYS = {"valid_metric": "AUC", "show_progress": False, "metric_decimal_place": 6}
# The RecBole keys of a CTR run at the defaults (the cold-start and rebuild benchmarks use them as they are).
CTR_TRAINING = {**TRAINING_DEFAULTS, **EVALUATION_KEYS}
# Per-model RecBole keys that replace RecBole's model defaults (a benchmark's --model_keys replaces this mapping).
# With its default CIN [100, 100, 100] one xDeepFM epoch took 16 s at 1 thread (the other seven models together:
# 12 s), and DCNV2's default [768, 768] MLP 5 s: a grid would not fit in hours. These two are scaled down.
MODEL_KEYS_DEFAULT: dict[str, dict] = {"xDeepFM": {"cin_layer_size": [50, 50]}, "DCNV2": {"mlp_hidden_size": [256, 256]}}


def training_keys(args) -> dict:
    """The RecBole keys of every run: each :data:`TRAINING_DEFAULTS` key as ``args`` holds it (an attribute of the
    same name, e.g. a benchmark's parsed flags), and :data:`EVALUATION_KEYS`."""
    return {key: getattr(args, key) for key in TRAINING_DEFAULTS} | EVALUATION_KEYS


def model_dict(args, model: str, overrides: dict) -> dict:
    """The config_dict of one model's runs: ``overrides``, :func:`training_keys` and ``args.model_keys[model]``."""
    return {**overrides, **training_keys(args), **args.model_keys.get(model, {})}


def run_signature(args, overrides: dict, bank: FeatureBank, format_version: int = 1) -> str:
    """16 hex digits naming what makes two runs of the same (model, feature set, setting, seed) comparable: the
    bank, the training keys, the thread count (it changes float reductions), the model keys, the other overrides
    (not the output folders and thread keys) and ``format_version`` (the benchmark's; bump it when a run's meaning
    changes). ``args`` has ``dataset``, ``threads``, ``model_keys`` and the training keys."""
    kept = {k: v for k, v in overrides.items() if k not in ("checkpoint_dir", "uip_num_threads", "uip_output_dir")}
    return sha256_json({"format": format_version, "dataset": args.dataset, "bank": bank.fingerprint,
                        "threads": args.threads, "training": training_keys(args), "model_keys": args.model_keys,
                        "overrides": kept})[:16]


def prepare_profiles(args, overrides: dict, logger):
    """Infer or reuse the profiles of ``args.dataset`` (the first of ``args.models``, the training keys, ``uip`` on).

    Returns ``(config, settings, files, target, bank)``: the base ``Config``, its resolved settings, the dataset's
    atomic files, the augmented copy's folder and its feature bank.
    """
    from recbole_uip.quick_start import build_config, check_dataset_files, infer_profiles

    config = build_config(args.models[0], args.dataset, None, {**overrides, **training_keys(args), "uip": True})
    settings = UIPSettings.from_config(config)
    files = check_dataset_files(config)
    start = time.perf_counter()
    target = infer_profiles(config, settings)
    logger.info(f"UIP profiles ready in {time.perf_counter() - start:.1f}s ({target})")
    return config, settings, files, target, FeatureBank.load(target / "bank")


def run_config(base_config, settings: UIPSettings, folder: Path, columns: list[str], setting: str, overrides: dict):
    """The ``Config`` of one (feature set, setting) for the model of ``base_config``.

    Built by :func:`recbole_uip.augmented.augmented_config` (which carries the dataset's presets over to the copy and switches
    RecBole's dataset cache off); then ``load_col`` is narrowed to the feature set's user columns. In ``id_free``,
    the columns come from ``.inter`` and user_id is loaded for the split only (``unused_col``).
    """
    config = augmented_config(base_config, settings, folder, None, overrides)
    user_field = base_config["USER_ID_FIELD"]
    load_col = {key: list(value) for key, value in config["load_col"].items()}
    if setting == "standard":
        load_col["user"] = [user_field] + columns
    else:
        load_col.pop("user", None)
        load_col["inter"] = [f for f in load_col["inter"] if f not in columns] + columns
        config["unused_col"] = {"inter": [user_field]}
    config["load_col"] = load_col
    return config


def build_loaders(config):
    """RecBole's dataset and (train, valid, test) dataloaders, seeded as ``run_recbole_with_config`` seeds them."""
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import init_seed

    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    return dataset, data_preparation(config, dataset)


@dataclasses.dataclass
class SplitView:
    """One dataset's split, in raw values, for checking that every run sees the same interactions."""

    items: list[np.ndarray]          # per split: raw item tokens, in order
    labels: list[np.ndarray]
    timestamps: list[np.ndarray]
    users: list[np.ndarray] | None   # raw user tokens (None when user_id was dropped)


def split_view(dataset, loaders) -> SplitView:
    """The raw (item, label, timestamp[, user]) sequences of train, valid and test."""
    views = SplitView([], [], [], [] if dataset.uid_field in loaders[0]._dataset.inter_feat else None)
    for loader in loaders:
        inter = loader._dataset.inter_feat
        views.items.append(np.asarray(dataset.id2token(dataset.iid_field, inter[dataset.iid_field].numpy())))
        views.labels.append(inter[dataset.label_field].numpy().copy())
        views.timestamps.append(inter[dataset.time_field].numpy().copy() if dataset.time_field in inter
                                else np.zeros(len(inter)))
        if views.users is not None:
            views.users.append(np.asarray(dataset.id2token(dataset.uid_field, inter[dataset.uid_field].numpy())))
    return views


def feature_tokens(dataset, loaders, field: str, setting: str) -> list[np.ndarray]:
    """Per split, the raw value of user feature ``field`` each interaction is given (joined from ``.user`` in
    ``standard``, read from ``.inter`` in ``id_free``)."""
    out = []
    for loader in loaders:
        inter = loader._dataset.inter_feat
        if setting == "standard":
            ids = dataset.user_feat[field][inter[dataset.uid_field]].numpy()
        else:
            ids = inter[field].numpy()
        out.append(np.asarray(dataset.id2token(field, ids)))
    return out


def assert_same_split(reference: SplitView, view: SplitView, label: str) -> None:
    """Raise if ``view`` is not interaction-for-interaction the reference split (no leakage between settings)."""
    for part, name in enumerate(("train", "valid", "test")):
        same = (np.array_equal(reference.items[part], view.items[part])
                and np.array_equal(reference.labels[part], view.labels[part])
                and np.array_equal(reference.timestamps[part], view.timestamps[part]))
        if not same:
            raise AssertionError(f"{label}: the {name} split differs from the plain run's split (item, label, "
                                 "timestamp); the profiles were learned on the plain run's training part.")
        if view.users is not None and not np.array_equal(reference.users[part], view.users[part]):
            raise AssertionError(f"{label}: the {name} split has other users than the plain run's split.")


def assert_user_features(reference: SplitView, dataset, loaders, folder: Path, columns: list[str], setting: str,
                         config, label: str) -> None:
    """Raise unless every interaction carries exactly its own user's values of ``columns`` (from the copy's
    ``.user`` file, or for the id_free variant the ``.user`` of the copy it was joined from)."""
    source = folder if setting == "standard" else Path(json.loads((folder / MANIFEST_NAME).read_text())["source"])
    table = read_atomic(source / f"{source.name}.user", config["field_separator"], config["encoding"])
    user_index = table.fields.index(config["USER_ID_FIELD"])
    for field in columns:
        index = table.fields.index(field)
        value_of = {row[user_index]: row[index] for row in table.rows}
        for part, actual in enumerate(feature_tokens(dataset, loaders, field, setting)):
            expected = np.asarray([value_of[u] for u in reference.users[part]])
            if not np.array_equal(expected, actual):
                raise AssertionError(f"{label}: interactions do not carry their user's '{field}' values.")


class _NullWriter:
    """Stands in for RecBole's per-trainer TensorBoard writer: 384 runs would leave 384 event folders and
    background threads behind. Only logging is affected, never training."""

    def add_scalar(self, *args, **kwargs):
        pass

    def add_hparams(self, *args, **kwargs):
        pass

    def close(self):
        pass


def train_and_test(config, loaders, model_seed: int) -> dict:
    """Train ``config['model']`` on prebuilt dataloaders and test its best checkpoint.

    The body of :func:`recbole_uip.quick_start.run_recbole_with_config` after ``data_preparation``: the model seed
    seeds initialisation and dropout; the dataloaders' generators are reset to ``config['seed']`` first, as a
    freshly built dataloader is, so a run does not depend on which runs came before it. The checkpoint is deleted
    after the test.

    Returns:
        ``auc``, ``logloss`` (test, best-validation checkpoint), ``valid_auc``, ``valid_logloss``, ``best_epoch``
        (1-based), ``epochs_run``, ``epochs_cap``, ``cap_hit`` and ``seconds`` (wall clock, build to test).
    """
    import recbole.trainer.trainer as recbole_trainer
    import torch
    from recbole.utils import get_trainer, init_seed

    from recbole_uip.compat import patch_recbole_checkpoint_loading
    from recbole_uip.model.fusion import model_class_for_run

    patch_recbole_checkpoint_loading()
    train_data, valid_data, test_data = loaders
    for loader in loaders:
        loader.generator.manual_seed(config["seed"])
    init_seed(model_seed + config["local_rank"], config["reproducibility"])
    start = time.perf_counter()
    model = model_class_for_run(config)(config, train_data._dataset).to(config["device"])
    saved_get_tensorboard = recbole_trainer.get_tensorboard
    recbole_trainer.get_tensorboard = lambda logger: _NullWriter()
    try:
        trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    finally:
        recbole_trainer.get_tensorboard = saved_get_tensorboard
    _, best_valid = trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    test_result = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
    seconds = time.perf_counter() - start
    checkpoint = Path(trainer.saved_model_file)
    best_epoch = int(torch.load(checkpoint, map_location="cpu", weights_only=False)["epoch"]) + 1
    checkpoint.unlink(missing_ok=True)
    epochs_run = len(trainer.train_loss_dict)
    return {"auc": float(test_result["auc"]), "logloss": float(test_result["logloss"]),
            "valid_auc": float(best_valid["auc"]), "valid_logloss": float(best_valid["logloss"]),
            "best_epoch": best_epoch, "epochs_run": epochs_run, "epochs_cap": int(config["epochs"]),
            "cap_hit": epochs_run >= int(config["epochs"]), "seconds": round(seconds, 2)}


def group_metrics(model, eval_data, group_of) -> dict[str, dict]:
    """AUC and LogLoss of a trained CTR ``model`` on a labeled RecBole eval loader, per group of users.

    ``group_of(raw user token) -> str`` names each user's group (e.g. ``cold``/``warm``). The definitions are
    RecBole's: AUC by ranks with ties averaged (sklearn's ``roc_auc_score``), LogLoss with predictions clipped to
    ``[1e-15, 1 - 1e-15]``. A group with one label only gets AUC NaN.

    Returns:
        ``{group: {"auc": float, "logloss": float, "rows": int}}``.
    """
    import torch
    from sklearn.metrics import roc_auc_score

    dataset = eval_data._dataset
    uid_field, label_field = dataset.uid_field, dataset.label_field
    tokens = dataset.field2id_token[uid_field]
    groups = {}
    scores, labels, users = [], [], []
    model.eval()
    with torch.no_grad():
        for batch in eval_data:
            interaction = batch[0].to(next(model.parameters()).device)
            scores.append(model.predict(interaction).float().cpu().numpy())
            labels.append(interaction[label_field].float().cpu().numpy())
            users.append(interaction[uid_field].cpu().numpy())
    scores, labels, users = (np.concatenate(x) if x else np.zeros(0) for x in (scores, labels, users))
    names = np.array([group_of(str(tokens[u])) for u in users.astype(np.int64)], dtype=object)
    for group in sorted(set(names.tolist())):
        rows = names == group
        y, p = labels[rows], np.clip(scores[rows].astype(np.float64), 1e-15, 1 - 1e-15)
        auc = float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")
        groups[group] = {"auc": auc, "logloss": float(np.mean(-y * np.log(p) - (1 - y) * np.log(1 - p))),
                         "rows": int(rows.sum())}
    return groups


def check_fields(config, dataset, columns: list[str], setting: str) -> None:
    """Raise unless the model will embed exactly user_id (standard only), the item fields and ``columns``."""
    from recbole.utils import FeatureSource

    user_sources = [FeatureSource.USER, FeatureSource.USER_ID, FeatureSource.INTERACTION]
    user_side = set(dataset.fields(source=user_sources)) - {config["LABEL_FIELD"], config["ITEM_ID_FIELD"],
                                                           config["TIME_FIELD"], config["RATING_FIELD"]}
    expected = set(columns) | ({config["USER_ID_FIELD"]} if setting == "standard" else set())
    if setting == "id_free":
        user_side -= {config["USER_ID_FIELD"]}      # loaded for the split only; unused_col drops it before training
        if config["USER_ID_FIELD"] not in (config["unused_col"] or {}).get("inter", []):
            raise AssertionError("id_free run would embed user_id")
    if user_side != expected:
        raise AssertionError(f"{setting}: user-side fields {sorted(user_side)} != expected {sorted(expected)}")


