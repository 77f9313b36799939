"""The command line's flags: ``--key=value`` parsing, the split into our flags and config keys, and which errors
are the user's (one line) rather than bugs (a traceback). Shared by every subcommand (``__main__``, ``convert``)."""

from __future__ import annotations

import difflib
import glob
import os
from typing import Any, Sequence

import yaml

_OWN_FLAGS = {"model", "dataset", "config_files", "output_dir", "bank", "refresh"}
_RECBOLE_RUNTIME_KEYS = {"local_rank", "nproc", "world_size", "ip", "port", "group_offset", "offset", "benchmark_filename",
                         "encoding", "additional_feat_suffix", "dataset_save_path", "dataloaders_save_path"}


class UsageError(ValueError):
    """Bad command line; the message says what is wrong."""


def known_recbole_keys() -> set[str]:
    """Every key that appears in RecBole's own property files or argument lists."""
    import recbole
    from recbole.utils import argument_list

    root = os.path.join(os.path.dirname(recbole.__file__), "properties")
    keys: set[str] = set(_RECBOLE_RUNTIME_KEYS)
    for path in glob.glob(os.path.join(root, "**", "*.yaml"), recursive=True):
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle) or {}
        if isinstance(data, dict):
            keys.update(map(str, data))
    for name in dir(argument_list):
        value = getattr(argument_list, name)
        if name.endswith("_arguments") and isinstance(value, list):
            keys.update(value)
    return keys


def parse_value(text: str) -> Any:
    """A flag value as YAML (``true``, ``3``, ``[a, b]``), with ``1e-3`` read as a float and ``None`` as null
    (RecBole's own command line evaluates values as Python, so its users write ``--train_neg_sample_args=None``)."""
    if text.strip() == "None":
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        for cast in (int, float):
            try:
                return cast(value)
            except ValueError:
                pass
    return value


def parse_flags(argv: Sequence[str]) -> dict[str, Any]:
    """``--key=value`` / ``--key value`` pairs to a dict; anything else is a :class:`UsageError`."""
    flags: dict[str, Any] = {}
    items = list(argv)
    while items:
        arg = items.pop(0)
        if not arg.startswith("--") or len(arg) == 2:
            raise UsageError(f"unexpected argument {arg!r}: flags are --key=value")
        key, sep, value = arg[2:].partition("=")
        if not sep:
            if not items or items[0].startswith("--"):
                raise UsageError(f"flag --{key} needs a value: --{key}=VALUE")
            value = items.pop(0)
        if key in flags:
            raise UsageError(f"flag --{key} given twice")
        flags[key] = value
    return flags


def split_flags(flags: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Separate our own flags from config keys; reject keys neither RecBole nor recbole-uip knows."""
    from recbole_uip.config import check_uip_keys, default_values

    own = {k: v for k, v in flags.items() if k in _OWN_FLAGS}
    config = {k: parse_value(v) for k, v in flags.items() if k not in _OWN_FLAGS}
    check_uip_keys(config)
    known = known_recbole_keys() | set(default_values())
    for key in config:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known | _OWN_FLAGS), n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join('--' + c for c in close)}?" if close else ""
            raise UsageError(
                f"unknown flag --{key}: neither RecBole nor recbole-uip has a key of that name.{hint} "
                f"(Keys only your own model reads belong in a --config_files YAML.)"
            )
    return own, config


def expected_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's input or environment, told in one line. Anything else (a torch crash, a bug)
    keeps its traceback."""
    from recbole_uip.data.atomic import OutputWriteError
    from recbole_uip.inference.llm import LLMLoadError
    from recbole_uip.inference.distributed import DistributedInferenceError
    from recbole_uip.inference.trainer import InferenceDivergedError
    from recbole_uip.locking import OutputLockedError

    # ValueError covers our input errors (UIPConfigError, AtomicFileError, BehaviourTextError, BankError, ...)
    # and RecBole's own configuration errors
    return (UsageError, ValueError, FileNotFoundError, OutputWriteError, LLMLoadError, OutputLockedError,
            InferenceDivergedError, DistributedInferenceError)
