"""RecBole's ``Config`` for a recbole-uip run, and the checks of a dataset's atomic files before any work.

* :func:`build_config`: RecBole's ``Config`` with the package's ``properties/`` defaults and the chosen dataset preset
  under the user's files, built outside the command line (RecBole's ``Config`` would parse ``sys.argv`` itself).
* :func:`check_dataset_files`: the dataset's atomic files, validated (headers, ids, one row per user / item).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Iterator

from recbole_uip.compat import resolve_model_class
from recbole_uip.config import check_uip_keys, choose_preset, default_config_files
from recbole_uip.data.atomic import (
    AtomicFileError, dataset_files, validate_atomic,
)


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's atomic files are not where RecBole will look for them."""


@contextlib.contextmanager
def _no_command_line() -> Iterator[None]:
    """RecBole's ``Config`` parses ``sys.argv`` itself; our entry points parse it first and pass values as
    ``config_dict``, so RecBole must not read (and warn about) the same flags again."""
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        yield
    finally:
        sys.argv = saved


def build_config(model, dataset: str, config_file_list=None, config_dict=None):
    """A RecBole ``Config`` with our ``properties/`` defaults under the user's files.

    The dataset preset beyond the exact-name one (``uip_preset``, :func:`~recbole_uip.config.choose_preset`) is
    chosen once the data folder is known; the config is then rebuilt with it under the user's files. The choice is
    kept as ``config.uip_preset_note`` (logged by :func:`infer_profiles`).

    Raises:
        ValueError: unknown model name or unknown ``uip_*`` key.
    """
    model_class = resolve_model_class(model) if isinstance(model, str) else model
    config_dict = dict(config_dict or {})
    check_uip_keys(config_dict)
    user_files = list(config_file_list or [])
    files = default_config_files(dataset) + user_files
    config = _make_config(model_class, dataset, files, config_dict, user_files)
    choice = choose_preset(dataset, config["uip_preset"], Path(config["data_path"]))
    if choice.path is not None:
        files = default_config_files(dataset) + [str(choice.path)] + user_files
        config = _make_config(model_class, dataset, files, config_dict, user_files)
    config.uip_preset_note = choice.note
    config.uip_config_files = files            # what a process that must build it once uses (train_rank)
    check_uip_keys(config.final_config_dict)
    return config


def _make_config(model_class, dataset: str, files: list[str], config_dict: dict, user_files: list[str]):
    """RecBole's ``Config`` from these files and keys, outside the command line."""
    from recbole.config import Config

    with _no_command_line():
        try:
            return Config(model=model_class, dataset=dataset, config_file_list=files, config_dict=config_dict)
        except ValueError as error:
            # RecBole's defaults contradict themselves for sequential models with the CE loss (SASRec, GRU4Rec,
            # ... by default): overall.yaml samples negatives, and Config then refuses the combination. When the
            # user set neither, use the only valid value; a value the user chose still gets RecBole's error.
            if "when the loss_type is CE" not in str(error) or _sets_key("train_neg_sample_args", user_files, config_dict):
                raise
            config_dict["train_neg_sample_args"] = None
            return Config(model=model_class, dataset=dataset, config_file_list=files, config_dict=config_dict)


def _sets_key(key: str, config_file_list, config_dict) -> bool:
    """Whether the user's own config dict or YAML files set ``key``."""
    import yaml

    if key in (config_dict or {}):
        return True
    for path in config_file_list or []:
        with open(path, encoding="utf-8") as handle:
            if key in (yaml.safe_load(handle) or {}):
                return True
    return False


def check_dataset_files(config) -> dict[str, Path]:
    """Validate the dataset's atomic files before any work; return them keyed by suffix."""
    data_dir = Path(config["data_path"])
    name = config["dataset"]
    files = dataset_files(data_dir, name)
    if "inter" not in files:
        raise DatasetNotFoundError(
            f"Dataset '{name}' not found: expected {data_dir / (name + '.inter')}. Set data_path to the folder that "
            f"holds <dataset>/<dataset>.inter (RecBole's download of public datasets needs network access; run "
            f"stock RecBole once to fetch them)."
        )
    separator, encoding = config["field_separator"], config["encoding"]
    interactions = validate_atomic(files["inter"], [config["USER_ID_FIELD"], config["ITEM_ID_FIELD"]], separator,
                                   encoding)
    for suffix, field in (("user", config["USER_ID_FIELD"]), ("item", config["ITEM_ID_FIELD"])):
        if suffix in files:
            validate_atomic(files[suffix], [field], separator, encoding, unique_field=field)
    if not interactions:
        raise AtomicFileError(f"{files['inter']}: no interactions (the file has a header and no data line).")
    return files
