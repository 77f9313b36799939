"""The augmented dataset copy: every atomic file under a new name, ``.user`` with one ``uip_<profile>`` column per
profile, and the RecBole ``Config`` that runs on it.

* :func:`augmented_dir`: ``<uip_output_dir>/<dataset>-uip``.
* :func:`write_augmented_dataset`: writes the copy from a feature bank, published atomically with a manifest.
* :func:`augmented_config`, :func:`augmented_config_args`: the copy's ``Config`` (the dataset's presets carried
  over to the new name, the profile columns loaded, RecBole's dataset caches off).
"""

from __future__ import annotations

from pathlib import Path

from recbole_uip.bank import FeatureBank
from recbole_uip.compat import resolve_model_class
from recbole_uip.config import UIPSettings
from recbole_uip.data.atomic import MANIFEST_NAME, manifest_fingerprint, publish_directory, read_atomic, write_user_file
from recbole_uip.recbole_config import build_config
from recbole_uip.utils import write_json_atomic

AUGMENTED_SUFFIX = "-uip"
# Keys whose value differs between a dataset and its renamed copy only because of the name.
_NAME_DEPENDENT_KEYS = {"dataset", "data_path"}


def augmented_dir(config, settings: UIPSettings) -> Path:
    """``<uip_output_dir>/<dataset>-uip``: where :func:`recbole_uip.quick_start.infer_profiles` publishes the copy."""
    name = config["dataset"] + AUGMENTED_SUFFIX
    return settings.output_dir / name


def write_augmented_dataset(config, settings: UIPSettings, files: dict[str, Path], bank: FeatureBank, target: Path) -> Path:
    """Copy every atomic file to ``target`` under the new name, adding the ``uip_*`` columns to ``.user`` (one token
    per user and profile, :meth:`FeatureBank.token`; a dataset without ``.user`` gets one listing its users), with the
    bank under ``target/bank`` and a manifest; published atomically. Returns ``target``."""
    import shutil

    new_name = target.name
    separator, encoding = config["field_separator"], config["encoding"]
    user_field = config["USER_ID_FIELD"]

    def build(folder: Path) -> None:
        for suffix, path in files.items():
            if suffix != "user":
                shutil.copyfile(path, folder / f"{new_name}.{suffix}")
        source = read_atomic(files["user"], separator, encoding) if "user" in files else None
        users = [] if source is not None else _inter_users(files["inter"], user_field, separator, encoding)
        columns = {field: (lambda user, p=profile: bank.token(user, p))
                   for field, profile in zip(settings.field_names, settings.profile_names)}
        write_user_file(folder / f"{new_name}.user", source, user_field, users, columns, separator, encoding)
        bank.save(folder / "bank")
        write_json_atomic(folder / MANIFEST_NAME, {
            "fingerprint": bank.fingerprint,
            "source_dataset": config["dataset"],
            "fields": settings.field_names,
            "no_history_token": settings.no_history_token,
        })

    return publish_directory(build, target)


def _inter_users(path: Path, user_field: str, separator: str, encoding: str) -> list[str]:
    """Distinct users of an ``.inter`` file in first-seen order (for datasets without ``.user``)."""
    from recbole_uip.data.atomic import iter_rows, read_header

    _, fields, _ = read_header(path, separator, encoding)
    index = fields.index(user_field)
    return list(dict.fromkeys(row[index] for row in iter_rows(path, len(fields), separator, encoding)))


def augmented_config(config, settings: UIPSettings, target: Path, config_file_list=None, config_dict=None):
    """The ``Config`` of the run on the augmented copy: identical to ``config`` except the dataset name, its
    folder, the ``uip_*`` columns added to ``load_col``, and RecBole's dataset caches switched off."""
    return build_config(*augmented_config_args(config, settings, target, config_file_list, config_dict))


def augmented_config_args(config, settings: UIPSettings, target: Path, config_file_list=None, config_dict=None):
    """``(model class, dataset name, config_file_list, config_dict)`` of :func:`augmented_config`, for a process
    that builds the config itself (RecBole's multi-process training).

    RecBole ties presets to the dataset *name* (for ml-100k: threshold, load_col, ...); a renamed copy would lose
    them. We build the copy's config once, compare it with the original's, and carry every difference over.
    """
    model_class = config["model"] if not isinstance(config["model"], str) else resolve_model_class(config["model"])
    name = target.name
    base_dict = dict(config_dict or {})
    base_dict["data_path"] = str(target.parent)
    renamed = build_config(model_class, name, config_file_list, base_dict)
    presets = {
        key: value for key, value in config.final_config_dict.items()
        if key not in _NAME_DEPENDENT_KEYS and renamed.final_config_dict.get(key) != value
    }
    load_col = presets.get("load_col", renamed["load_col"])
    if load_col is not None:
        load_col = {k: list(v) for k, v in load_col.items()}
        user_cols = load_col.setdefault("user", [config["USER_ID_FIELD"]])
        user_cols += [f for f in settings.field_names if f not in user_cols]
        presets["load_col"] = load_col
    # RecBole reuses <checkpoint_dir>/<dataset>-<Class>.pth whenever the config matches, without looking at the
    # files: point it at a path unique to this bank (never written, since saving is off) so it cannot go stale.
    presets.update(
        save_dataset=False, save_dataloaders=False, dataloaders_save_path=None,
        dataset_save_path=str(Path(config["checkpoint_dir"]) / f"{name}-{_manifest_fingerprint(target)[:12]}-never-saved.pth"),
    )
    final_dict = {**base_dict, **presets}
    return model_class, name, config_file_list, final_dict


def _manifest_fingerprint(target: Path) -> str:
    """The fingerprint of the published copy ``target``; raises when it has no readable manifest."""
    fingerprint = manifest_fingerprint(target)
    if fingerprint is None:
        raise FileNotFoundError(f"{target / MANIFEST_NAME}: no readable manifest; the augmented copy is incomplete.")
    return fingerprint
