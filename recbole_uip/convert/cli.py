"""``python -m recbole_uip convert FORMAT --input=... [--uip=true]``: raw public files to atomic files, then (optionally)
profile inference on the result in the same command."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

CONVERT_FLAGS = {"input", "meta", "users", "output_dir", "name", "k_core", "min_rating", "description_chars",
                 "progress", "uip", "model", "config_files"}


def usage() -> str:
    """``convert --help``: the formats with an example each, and the flags."""
    from recbole_uip.convert import FORMATS

    lines = ["usage: python -m recbole_uip convert FORMAT --input=PATH [--meta=FILE] [--users=FILE] [--output_dir=dataset]",
             "           [--name=NAME] [--k_core=N] [--min_rating=X] [--description_chars=N] [--progress=false]",
             "           [--uip=true [--model=DeepFM] [--config_files=...] [--key=value ...]]",
             "",
             "Writes <output_dir>/<name>/<name>.inter/.item[/.user] (RecBole atomic files with item text) in one atomic",
             "step, and <output_dir>/<name>.convert.json (lines read, malformed lines, missing values, filtered counts).",
             "",
             "formats:"]
    for name, cls in FORMATS.items():
        lines.append(f"  {name:<11} {cls.description}")
        lines.append(f"  {'':<11}   e.g. {cls.example}")
    lines += ["",
              "flags:",
              "  --input               the raw interactions: a file (Amazon), or the extracted folder (MovieLens, Yelp)",
              "  --meta                item metadata (Amazon meta_<Category>.json[l][.gz], Yelp business JSON);",
              "                        default: found beside --input",
              "  --users               Yelp user JSON (default: beside the reviews, if there)",
              "  --output_dir          folder receiving <name>/ (RecBole's data_path); default: dataset",
              "  --name                dataset name; default: the release (ml-1m), Amazon_<Category>, yelp",
              "  --k_core=N            keep users and items with >= N interactions, repeated until stable (default 0: off)",
              "  --min_rating=X        drop interactions rated below X",
              "  --description_chars=N Amazon: add description:token_seq cut to N characters (default 0: none)",
              "  --progress=false      no progress bars (they show only on a terminal anyway)",
              "  --uip=true            then infer profiles on the result (as 'python -m recbole_uip infer'), with the",
              "                        split of --model (default DeepFM) and any --key=value (uip_llm, uip_epochs, ...);",
              "                        writes <output_dir>/<name>-uip/",
              "",
              "Item text fields, field names against RecSysDatasets, and presets: docs/datasets.md."]
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    """Run the ``convert`` command; returns the exit status (2: a usage or input error, told in one line)."""
    from recbole_uip.cli_flags import UsageError, expected_errors, parse_flags, parse_value, split_flags
    from recbole_uip.convert import FORMATS, convert_dataset

    argv = list(argv)
    if not argv or any(a in ("-h", "--help", "help") for a in argv):
        print(usage())
        return 0
    try:
        if argv[0].startswith("--"):
            raise UsageError(f"convert needs a FORMAT first; formats: {', '.join(FORMATS)}")
        fmt, flags = argv[0], parse_flags(argv[1:])
        if fmt not in FORMATS:
            raise UsageError(f"unknown format {fmt!r}; formats: {', '.join(FORMATS)}")
        if "dataset" in flags or "data_path" in flags:
            raise UsageError("convert names its output with --name and --output_dir (not --dataset / --data_path)")
        own = {k: v for k, v in flags.items() if k in CONVERT_FLAGS}
        rest = {k: v for k, v in flags.items() if k not in CONVERT_FLAGS}
        if "input" not in own:
            raise UsageError(f"--input is required (convert {fmt}: {FORMATS[fmt].description})")
        uip = parse_value(own.get("uip", "false"))
        if uip not in (True, False):
            raise UsageError(f"--uip must be true or false, got {own['uip']!r}")
        config_dict: dict[str, Any] = {}
        if uip:
            _, config_dict = split_flags(rest)        # the same checks as 'infer' (unknown keys named)
        elif rest:
            raise UsageError(f"unknown flag(s) {', '.join('--' + k for k in rest)} for convert (RecBole and uip_* keys "
                             f"belong with --uip=true)")
        for key in ("model", "config_files"):
            if key in own and not uip:
                raise UsageError(f"--{key} belongs with --uip=true (it configures the profile inference)")
        options = {"output_dir": own.get("output_dir", "dataset"), "meta": own.get("meta"), "users": own.get("users"),
                   "name": own.get("name"), "k_core": _int(own, "k_core", 0),
                   "description_chars": _int(own, "description_chars", 0),
                   "min_rating": parse_value(own["min_rating"]) if "min_rating" in own else None,
                   "progress": parse_value(own.get("progress", "true")) is not False}
        result = convert_dataset(fmt, own["input"], **options)
        print(result.report.summary())
        print(f"dataset: {result.folder}")
        preset = _preset_flag(result)
        if result.folder.parent.resolve() != Path("dataset").resolve():
            preset += f" --uip_output_dir={result.folder.parent}"
        if not uip:
            print("next: python run_recbole_uip.py --model=DeepFM --dataset=" + result.name +
                  f" --data_path={result.folder.parent} --uip=true{preset}")
            return 0
        return _infer(result, own, config_dict, preset)
    except expected_errors() as error:     # ConversionError is a ValueError: told in one line
        print(f"error: {error}", file=sys.stderr)
        if isinstance(error, UsageError):
            print("(run 'python -m recbole_uip convert --help' for formats and flags)", file=sys.stderr)
        return 2


def _int(flags: dict, key: str, default: int) -> int:
    from recbole_uip.cli_flags import UsageError, parse_value

    value = parse_value(flags[key]) if key in flags else default
    if not isinstance(value, int) or isinstance(value, bool):
        raise UsageError(f"--{key} must be an integer, got {flags[key]!r}")
    return value


def _preset_flag(result) -> str:
    """`` --uip_preset=NAME`` where the dataset's name would not find the preset that fits its files, else ``''``."""
    from recbole_uip.config import choose_preset

    chosen = choose_preset(result.name, "auto", result.folder)
    found = chosen.path.stem if chosen.path is not None else (result.name if "dataset's name" in chosen.note else None)
    return "" if found == result.preset else f" --uip_preset={result.preset}"


def _infer(result, own: dict, config_dict: dict, preset: str) -> int:
    """Profile inference on the converted dataset (the ``infer`` command's step)."""
    from logging import getLogger

    from recbole.utils import init_logger

    from recbole_uip.quick_start import build_config, infer_profiles

    config_dict = dict(config_dict)
    config_dict.setdefault("data_path", str(result.folder.parent))
    config_dict.setdefault("uip_output_dir", str(result.folder.parent))
    if "--uip_preset=" in preset:
        config_dict.setdefault("uip_preset", result.preset)
    files = own.get("config_files", "").split() or None
    config = build_config(own.get("model", "DeepFM"), result.name, files, config_dict)
    init_logger(config)
    target = infer_profiles(config)
    getLogger().info(f"Augmented dataset: {target}")
    print(f"profiles: {target}")
    print("next: python run_recbole_uip.py --model=" + str(own.get("model", "DeepFM")) + f" --dataset={result.name} "
          f"--data_path={result.folder.parent} --uip=true{preset}   (reuses these profiles)")
    return 0
