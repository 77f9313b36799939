"""What every benchmark under ``benchmarks/`` shares: the command line, statistics, and how results are recorded.

* :func:`parse_known_with_overrides`: a benchmark's own flags, and every other ``--key=value`` as a RecBole or
  ``uip_*`` override (values read as YAML, like ``run_recbole_uip.py``).
* :func:`mean_ci`, :func:`paired_test`, :func:`interval_summary`: the statistics the reports quote;
  :func:`finite_or_none`: a per-user score column as the JSON keeps it.
* :func:`run_record`: the facts every figure is recorded with (threads, CPU, model, dataset, resolved settings),
  with no machine paths.
* :func:`settings_fingerprint`, :func:`results_dir`, :func:`write_result`, :func:`publish_result`,
  :func:`publish_benchmark`:
  ``results/<dataset>/<settings fingerprint>/<name>.{json,md}``, one folder per dataset and setting, named by the
  hash of the resolved ``uip_*`` settings (so a name never depends on what the defaults were when it was made),
  written atomically (and, by the latter, printed and summed up in the folder's ``settings.json``).
* :func:`write_settings_json`: a results folder's ``settings.json``, from the run records its results hold.
* :func:`read_records`, :func:`append_record`, :func:`latest_records`: a benchmark's JSONL of finished runs (a
  restart skips what is done).
* :func:`fmt_p`: a p-value as the reports print it; :func:`progress_logging`: RecBole's logger, quiet on stdout.
* :func:`held_out_positions`: the held-out protocol of the generalisation and in-context benchmarks;
  :func:`matched_contexts`: a user's and another user's newest history of the same length, read in context
  (:func:`context_positions`: or their oldest; :func:`common_length`: any two contexts cut alike);
  :func:`without_held_out`: the histories inference may see;
  :class:`HeldOutInference`: that protocol set up for inference (the generalisation and token-probe benchmarks);
  :func:`goal_verdict`: their sentence on the generalisation goal.
* :func:`load_held_out_text`: what those benchmarks start from (histories, LLM, tokenised text, held-out positions).
* :func:`benchmark_parser`: the flags every benchmark has; :func:`comma_separated`: a flag's list; :func:`configure`: a benchmark's RecBole config (profiles on), RecBole's logger and the resolved settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import os
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np

from recbole_uip.ctr_runs import CTR_TRAINING  # noqa: F401  (the cold-start and rebuild benchmarks' RecBole keys)
from recbole_uip.utils import atomic_write, sha256_json, write_json_atomic

RESULTS = Path(__file__).resolve().parent.parent / "results"
SETTINGS_NAME = "settings.json"


def parse_known_with_overrides(parser: argparse.ArgumentParser, argv=None) -> tuple[argparse.Namespace, dict]:
    """``(args, overrides)``: the parser's own flags, and every other ``--key=value`` as a RecBole / ``uip_*``
    override (values read as YAML). ``args.argv`` keeps the command line (for the report), without ``--render``."""
    from recbole_uip.cli_flags import parse_value

    args, rest = parser.parse_known_args(argv)
    args.argv = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--render")]
    overrides = {}
    for item in rest:
        if not item.startswith("--") or "=" not in item:
            parser.error(f"unrecognised argument {item!r}: extra keys are given as --key=value")
        key, _, value = item[2:].partition("=")
        overrides[key] = parse_value(value)
    return args, overrides


def benchmark_parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark's parser with the flags every benchmark has: ``--dataset`` and ``--results`` (the results root;
    the folder under it is :func:`results_dir`'s). ``doc``: the script's docstring (its first paragraph is the
    description)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--results", default=str(RESULTS),
                        help="the results root (default: the repository's); each result goes to "
                             "<root>/<dataset>/<settings fingerprint>/")
    parser.add_argument("--variant", default="", help="a second measurement of the same setting (e.g. gpu, on other "
                        "hardware) is written as <name>_<variant>.{json,md} beside the first")
    return parser


def comma_separated(parser: argparse.ArgumentParser, flag: str, value: str, cast=str) -> list:
    """A flag's comma-separated ``value`` as a list of ``cast`` values (blank items left out); a value ``cast``
    refuses ends the run through ``parser.error``, naming ``flag``."""
    try:
        return [cast(item.strip()) for item in value.split(",") if item.strip()]
    except ValueError:
        parser.error(f"{flag} takes comma-separated {getattr(cast, '__name__', 'value')} values, got {value!r}")


def result_name(name: str, args: argparse.Namespace) -> str:
    """A result's file name: ``name``, or ``<name>_<variant>`` for a ``--variant`` (:func:`benchmark_parser`)."""
    variant = getattr(args, "variant", "")
    return f"{name}_{variant}" if variant else name


def configure(model: str, dataset: str, overrides: dict):
    """``(config, settings, logger)`` of a benchmark's run: RecBole's ``Config`` with ``uip`` on and the overrides,
    RecBole's logger initialised, and the resolved ``uip_*`` settings."""
    import logging

    from recbole.utils import init_logger

    from recbole_uip.config import UIPSettings
    from recbole_uip.recbole_config import build_config

    config = build_config(model, dataset, None, {"uip": True, **overrides})
    init_logger(config)
    return config, UIPSettings.from_config(config), logging.getLogger()


def mean_ci(values, confidence: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean and its Student-t confidence interval (nan bounds for fewer than 2 values)."""
    from scipy import stats

    values = np.asarray(values, dtype=float)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)))
    return mean, mean - half, mean + half


def interval_summary(values: dict[str, np.ndarray], pairs) -> tuple[dict, dict]:
    """``(means, differences)`` over users: per condition, ``{"mean", "ci"}`` (the mean and its 95% interval); per
    pair ``(a, b)``, the key ``"<a>_minus_<b>"`` with the paired difference ``a - b``: ``{"mean", "ci",
    "share_below_zero"}``. ``values``: ``{condition: (U,)}`` aligned by user; a nan (a user without that value) is
    left out, pairwise for the differences."""
    means = {}
    for name, v in values.items():
        mean, low, high = mean_ci(v[np.isfinite(v)])
        means[name] = {"mean": mean, "ci": [low, high]}
    differences = {f"{a}_minus_{b}": difference_summary(values[a] - values[b]) for a, b in pairs}
    return means, differences


def difference_summary(diff: np.ndarray) -> dict:
    """A paired difference over users ``(U,)`` as :func:`interval_summary` reports it: ``{"mean", "ci",
    "share_below_zero"}`` over the users with a value (a nan is left out)."""
    diff = diff[np.isfinite(diff)]
    mean, low, high = mean_ci(diff)
    return {"mean": mean, "ci": [low, high], "share_below_zero": float((diff < 0).mean())}


def finite_or_none(values) -> list:
    """A per-user score column ``(U,)`` as JSON keeps it: floats, ``None`` where a user has no value (nan)."""
    return [float(v) if np.isfinite(v) else None for v in values]


def paired_test(a, b) -> tuple[float, float, float]:
    """Mean and std of the paired difference ``a - b`` and its paired t-test p-value (nan if undefined)."""
    from scipy import stats

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = a - b
    std = float(diff.std(ddof=1)) if len(diff) > 1 else float("nan")
    p = float(stats.ttest_rel(a, b).pvalue) if len(diff) > 1 and np.ptp(diff) > 0 else float("nan")
    return float(diff.mean()), std, p


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_record(config, settings, argv: list[str] | None = None) -> dict[str, Any]:
    """The facts a figure is recorded with: the command (``argv``), date, CPU, torch threads and version, the LLM
    and its dtype, the dataset and split, and every resolved ``uip_*`` setting. No machine paths."""
    import torch

    from recbole_uip.inference.llm import runtime_numerics

    numerics = runtime_numerics(settings.llm_dtype, config["device"], settings.num_threads)
    return {
        "command": [_without_machine_path(arg) for arg in argv or []],
        "date": dt.date.today().isoformat(),
        "cpu": cpu_model(),
        "cpu_count": _cpu_count(),
        "threads": numerics["threads"],
        "torch": torch.__version__,
        "device": numerics["device"],
        "llm": settings.llm if not Path(settings.llm).is_absolute() else Path(settings.llm).name,
        "llm_dtype": numerics["dtype"],
        "dataset": config["dataset"],
        "split": {"model": config["model"], "eval_args": config["eval_args"], "seed": config["seed"]},
        "settings": settings.fingerprint_dict(),
    }


def _without_machine_path(arg: str) -> str:
    """``--key=/abs/path/name`` as ``--key=.../name``: a record names what was used, not where it lay."""
    key, sep, value = arg.partition("=")
    if sep and (value.startswith("/") or value.startswith("~")):
        return f"{key}=.../{Path(value).name}"
    return arg


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def settings_fingerprint(settings: dict[str, Any]) -> str:
    """12 hex digits naming a setting: the hash of the resolved ``uip_*`` settings that change the IDs
    (``UIPSettings.fingerprint_dict()``, as a run record's ``settings`` holds them). It is the settings part of a
    bank's fingerprint, which adds the data, the numerics and the code's bank format."""
    return sha256_json(settings)[:12]


def results_dir(record: dict[str, Any], root: Path = RESULTS) -> Path:
    """``<root>/<dataset>/<settings fingerprint>/``, the folder of a result with this :func:`run_record`: one folder
    per dataset and setting. ``results/README.md`` says which setting each folder holds."""
    return Path(root) / record["dataset"] / settings_fingerprint(record["settings"])


def write_result(folder: Path, name: str, data: dict, markdown: str) -> tuple[Path, Path]:
    """Write ``<folder>/<name>.json`` and ``<name>.md`` atomically; returns both paths."""
    json_path, md_path = folder / f"{name}.json", folder / f"{name}.md"
    write_json_atomic(json_path, data)
    with atomic_write(md_path) as handle:
        handle.write(markdown.rstrip() + "\n")
    return json_path, md_path


def publish_result(folder: Path, name: str, data: dict, markdown: str) -> tuple[Path, Path]:
    """:func:`write_result` and the folder's :func:`write_settings_json`, then print the report and where it went
    (what every benchmark does at its end)."""
    json_path, md_path = write_result(folder, name, data, markdown)
    write_settings_json(folder)
    print(markdown)
    print(f"\nwritten: {json_path}, {md_path}")
    return json_path, md_path


def publish_benchmark(args: argparse.Namespace, name: str, data: dict, markdown: str) -> tuple[Path, Path]:
    """:func:`publish_result` of a benchmark parsed by :func:`benchmark_parser`: into ``results_dir(data["record"],
    args.results)``, named :func:`result_name` (``name``, or ``<name>_<variant>``)."""
    return publish_result(results_dir(data["record"], Path(args.results)), result_name(name, args), data, markdown)


def folder_records(folder: Path) -> dict[str, dict]:
    """``{name: run record}`` of the results in ``folder``: the ``record`` (:func:`run_record`) of every
    ``<name>.json`` (``<name>.meta.json`` counts as ``<name>``), or of each of its ``runs`` (named ``<name>.runs[i]``).
    ``settings.json`` and files that are not JSON objects are passed over."""
    records: dict[str, dict] = {}
    for path in sorted(Path(folder).glob("*.json")):
        if path.name == SETTINGS_NAME:
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        name = path.name[: -len(".meta.json")] if path.name.endswith(".meta.json") else path.stem
        if isinstance(data.get("record"), dict):
            records[name] = data["record"]
        elif isinstance(data.get("runs"), list):
            for i, run in enumerate(data["runs"]):
                if isinstance(run, dict) and isinstance(run.get("record"), dict):
                    records[f"{name}.runs[{i}]"] = run["record"]
    return records


def write_settings_json(folder: Path, records: dict[str, dict] | None = None) -> Path | None:
    """Write ``<folder>/settings.json`` from the run records of its results (default: :func:`folder_records`).

    What every record agrees on (the resolved ``uip_*`` ``settings``, the LLM, the dataset and split, ...) stands
    at the top level, so a folder of one result gets its record unchanged; where the folder's results differ
    (their commands, dates, ...), ``results`` holds each result's own values: ``{name: {key: value}}``. Commands
    are portable: an absolute path in a ``--key=value`` keeps only its last part. Nothing is added that no record
    holds. Returns the path, or ``None`` (and writes nothing) when the folder holds no record.
    """
    records = folder_records(folder) if records is None else records
    if not records:
        return None
    records = {name: {**record, "command": [_without_machine_path(str(a)) for a in record["command"]]}
               if isinstance(record.get("command"), list) else record for name, record in records.items()}
    first, *others = records.values()
    common = {key: value for key, value in first.items() if all(key in r and r[key] == value for r in others)}
    merged = dict(common)
    if others:
        merged["results"] = {name: {k: v for k, v in record.items() if k not in common}
                             for name, record in sorted(records.items())}
    path = Path(folder) / SETTINGS_NAME
    write_json_atomic(path, merged)
    return path


def read_records(path: Path) -> list[dict]:
    """Every run in a JSONL file, in order (``[]`` without the file; a torn last line, from a kill mid-write, and
    blank lines are passed over)."""
    if not Path(path).is_file():
        return []
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def latest_records(records: list[dict]) -> list[dict]:
    """The records whose ``signature`` is the last record's (a grid's current runs; older runs are other grids)."""
    return [r for r in records if r["signature"] == records[-1]["signature"]] if records else []


def append_record(path: Path, record: dict) -> None:
    """Append one run to a JSONL file (keys sorted) and flush it to disk before the next run starts."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def fmt_p(p: float) -> str:
    """A p-value as the reports print it: ``n/a`` for nan, 3 decimals, or 2 significant digits below 0.001."""
    return "n/a" if p != p else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def progress_logging(config, prefixes: tuple[str, ...] = ("zoo", "UIP")) -> logging.Logger:
    """RecBole's logger for ``config`` (its file under ``log/`` keeps every epoch); on stdout only warnings and the
    info lines that start with one of ``prefixes`` (a benchmark's progress lines)."""
    from recbole.utils import init_logger

    init_logger(config)
    logger = logging.getLogger()
    for handler in logger.handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
    progress = logging.StreamHandler(sys.stdout)
    progress.setLevel(logging.INFO)
    progress.addFilter(lambda record: record.getMessage().startswith(prefixes))
    progress.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger.addHandler(progress)
    return logger


def settings_table(record: dict) -> str:
    """A Markdown list of a run record (for the end of a report)."""
    lines = [f"- command: `python {' '.join(record['command'])}`" if record.get("command") else None,
             f"- date {record['date']}; CPU {record['cpu']} ({record['cpu_count']} cores visible), {record['threads']} "
             f"torch threads, torch {record['torch']}, {record['device']}",
             f"- LLM {record['llm']} in {record['llm_dtype']}; dataset {record['dataset']}, split of "
             f"{record['split']['model']} with eval_args {record['split']['eval_args']}, seed {record['split']['seed']}",
             "- resolved settings: " + ", ".join(f"`{k}={v}`" for k, v in sorted(record["settings"].items())
                                                 if k not in ("profiles",))]
    return "\n".join(line for line in lines if line)


def held_out_positions(text, holdout_tokens: int) -> list[np.ndarray]:
    """Per user, the positions (in ``text.user_pieces[user]``) held out of profile inference: the newest items whose
    text fits ``holdout_tokens`` (at least one), never all of a user's items; none for a user with one item.
    ``text``: a :class:`~recbole_uip.data.behaviour_text.BehaviourText` of the training histories."""
    held = []
    for user in range(len(text)):
        n = len(text.user_pieces[user])
        positions = text.newest_target(user, holdout_tokens) if n >= 2 else np.zeros(0, dtype=np.int64)
        held.append(positions[1:] if len(positions) == n else positions)
    return held


def newest_tokens(text, user: int, positions: np.ndarray, budget: int) -> list[int]:
    """The last ``budget`` tokens of ``user``'s items at ``positions`` (oldest first): their newest text (it may
    start inside an item)."""
    if len(positions) == 0 or budget <= 0:
        return []
    ids, _ = text.tokens(user, positions)
    return ids[-budget:]


def oldest_positions(text, user: int, positions: np.ndarray, budget: int) -> np.ndarray:
    """The oldest of ``positions`` (``user``'s item positions in ``text``, ascending) that hold at least ``budget``
    tokens (all of them where they hold fewer): :func:`newest_tokens` of these reads the oldest end of the history,
    ``budget`` tokens ending inside or at the end of the item that crosses the budget."""
    positions = np.asarray(positions)
    lengths = text.piece_lengths[np.asarray(text.user_pieces[user])[positions]] if len(positions) else []
    return positions[:min(len(positions), int(np.searchsorted(np.cumsum(lengths), budget)) + 1)]


CONTEXT_ENDS = ("newest", "oldest")


def context_positions(text, users, positions: dict, budget: int, end: str) -> dict:
    """``positions`` (user -> item positions) as they are (``end="newest"``: :func:`matched_contexts` reads their
    newest ``budget`` tokens), or cut to their :func:`oldest_positions` (``"oldest"``: it reads the oldest end)."""
    if end not in CONTEXT_ENDS:
        raise ValueError(f"context end must be one of {CONTEXT_ENDS}, got {end!r}")
    if end == "newest":
        return positions
    return {u: oldest_positions(text, u, positions[u], budget) for u in users}


def matched_contexts(text, users, others, positions, budget: int) -> tuple[list[list[int]], list[list[int]]]:
    """For each pair ``(user, other)``, the newest ``L`` tokens of ``user``'s items at ``positions[user]`` and of
    ``other``'s at ``positions[other]``, with ``L = min(budget, what each one has)``: the user's own recent history
    and a history of the same length that is not theirs (the in-context conditions ``own`` and ``other``).
    ``text``: a :class:`~recbole_uip.data.behaviour_text.BehaviourText`; ``positions``: user -> item positions."""
    own, theirs = [], []
    for user, other in zip(users, others):
        mine, foreign = common_length(newest_tokens(text, user, positions[user], budget),
                                      newest_tokens(text, other, positions[other], budget))
        own.append(mine)
        theirs.append(foreign)
    return own, theirs


def common_length(mine: list[int], foreign: list[int]) -> tuple[list[int], list[int]]:
    """Two contexts (token ids) cut to their last ``L`` tokens, ``L`` the shorter one's length: the end that meets
    the scored text is kept."""
    length = min(len(mine), len(foreign))
    return mine[len(mine) - length:], foreign[len(foreign) - length:]


def load_held_out_text(config, settings, logger, holdout_tokens: int):
    """``(histories, llm, text, held)``, what every held-out benchmark starts from: the dataset's text fields checked,
    the training histories read (``TrainingHistories``), the frozen LLM loaded, the histories tokenised
    (``BehaviourText``) and each user's newest ``holdout_tokens`` tokens of items held out (:func:`held_out_positions`)."""
    from recbole_uip.data.behaviour import check_text_values, collect_training_histories, resolve_text_fields
    from recbole_uip.data.behaviour_text import BehaviourText
    from recbole_uip.inference.llm import load_frozen_llm
    from recbole_uip.quick_start import check_dataset_files

    files = check_dataset_files(config)
    fields = resolve_text_fields(config, settings, files)
    check_text_values(files, fields, config["field_separator"], config["encoding"])
    histories = collect_training_histories(config, settings, fields, logger)
    llm = load_frozen_llm(settings.llm, config["device"], settings.llm_dtype, settings.llm_cache_dir, logger)
    text = BehaviourText(histories, settings, llm.tokenizer, logger)
    return histories, llm, text, held_out_positions(text, holdout_tokens)


def without_held_out(histories, held: list[np.ndarray]):
    """The ``TrainingHistories`` cut before each user's held-out positions ``held[u]`` (their newest items): all that
    inference, and every model a held-out benchmark fits, may see."""
    return histories.truncated([len(items) - len(h) for items, h in zip(histories.items, held)])


GENERALISATION_GOAL = 0.05   # nats/token below the mean token (issue "Profile inference that learns")


def goal_verdict(own_minus_mean: dict, label: str = "Goal", own_minus_other: dict | None = None,
                 reference: tuple[str, str] = ("the mean token", "mean")) -> str:
    """The reports' sentence on the generalisation goal: met when ``own - mean`` (``{"mean", "ci"}``, nats/token on
    held-out text) is at least :data:`GENERALISATION_GOAL` below zero and its 95% interval excludes zero.

    With ``own_minus_other`` (own - another user's tokens, the same form), the sentence also says whether the gap
    is the user's: the mean of fitted tokens can be a worse token than any one of them, so own - mean can be met
    while another user's tokens do as well as the user's own (``token_probe_draws4_distil_shift8.md``), and own can
    beat another user's while losing to the mean (something of the user, outweighed by the noise of a per-user fit:
    ``token_probe_distil_shift8_profiles8.md``). ``reference``: what ``own_minus_mean`` is measured against, as the
    sentence names it in full and in the difference (group tokens are judged against a random group's token)."""
    mean, (low, high) = own_minus_mean["mean"], own_minus_mean["ci"]
    met = mean <= -GENERALISATION_GOAL and high < 0
    sentence = (f"**{label} ({GENERALISATION_GOAL} nats/token below {reference[0]}, interval excluding zero): "
                f"{'met' if met else 'not met'}** (own - {reference[1]} {mean:+.4f}, interval [{low:+.4f}, {high:+.4f}])")
    if own_minus_other is not None:
        other, (other_low, other_high) = own_minus_other["mean"], own_minus_other["ci"]
        users = ("not shown to be the user's: another user's tokens do as well as their own" if other_high >= 0 else
                 "the gap is the user's" if high < 0 else
                 "the tokens carry something of the user (they beat another user's), yet do not beat the mean token")
        sentence += f"; own - another user's {other:+.4f}, interval [{other_low:+.4f}, {other_high:+.4f}]: {users}"
    return sentence + "."


@dataclasses.dataclass
class HeldOutInference:
    """The held-out protocol of the generalisation and token-probe benchmarks, set up for inference.

    Attributes:
        llm: the frozen LLM.
        full_text: ``BehaviourText`` of the whole training histories (what the held-out texts are written from).
        held: per user, the held-out positions (:func:`held_out_positions`).
        remaining: the histories without them: all that inference and every statistic may see.
        trainer: a ``ProfileInferenceTrainer`` over ``remaining`` (not set up, not fitted).
    """

    llm: Any
    full_text: Any
    held: list[np.ndarray]
    remaining: Any
    trainer: Any

    @classmethod
    def build(cls, config, settings, logger, holdout_tokens: int) -> "HeldOutInference":
        """:func:`load_held_out_text`, and a trainer over the histories without the held-out items."""
        from recbole_uip.data.behaviour_text import BehaviourText
        from recbole_uip.inference.trainer import ProfileInferenceTrainer

        histories, llm, full_text, held = load_held_out_text(config, settings, logger, holdout_tokens)
        remaining = without_held_out(histories, held)
        trainer = ProfileInferenceTrainer(config, settings, llm, remaining,
                                          BehaviourText(remaining, settings, llm.tokenizer, logger), logger)
        return cls(llm, full_text, held, remaining, trainer)

    def users(self) -> np.ndarray:
        """The users with a held-out text (int64, ascending)."""
        return np.array([u for u, h in enumerate(self.held) if len(h)], dtype=np.int64)

    def held_out_targets(self, users: np.ndarray):
        """``Targets``: each user's held-out text, their encoder reading every remaining item."""
        from recbole_uip.inference.trainer import Targets

        texts, flags = zip(*(self.full_text.tokens(u, self.held[u]) for u in users))
        return Targets(np.asarray(users), list(texts), None if self.full_text.rating_flags is None else list(flags),
                       [np.arange(len(self.remaining.items[u])) for u in users])


def split_cold_start(users: list[str], times: list[float], holdout: float, onboarding: int, valid_share: float,
                     seed: int = 0, test_share: float = 0.0) -> dict[str, np.ndarray]:
    """The cold-start protocol's split of interaction rows (``users[r]``, ``times[r]`` for row ``r``).

    A share ``holdout`` of the users (drawn with ``seed``) is held out entirely. Each held-out user's interactions,
    oldest first, give their first ``onboarding`` rows (``onboarding``: revealed as onboarding history, never in
    training) and the rest (``test``). Every other user's rows go to ``train``, or, a random ``valid_share`` of them,
    to ``valid`` (early stopping), or, a random ``test_share``, to ``warm_test`` (the known users' own test rows,
    never in training nor in early stopping). Held-out users with at most ``onboarding`` rows have no test rows.

    Returns int64 row indices: ``train``, ``valid``, ``warm_test``, ``onboarding``, ``test``, and the held-out users
    ``cold`` (sorted) as an object array.
    """
    rng = np.random.default_rng(seed)
    distinct = sorted(set(users))
    cold = set(rng.permutation(distinct)[: int(round(holdout * len(distinct)))].tolist())
    rows = np.arange(len(users))
    is_cold = np.array([u in cold for u in users], dtype=bool)
    warm_rows = rows[~is_cold]
    draw = rng.random(len(warm_rows))
    to_valid = draw < valid_share
    to_test = (draw >= valid_share) & (draw < valid_share + test_share)
    onboarding_rows, test_rows = [], []
    by_user: dict[str, list[int]] = {}
    for r in rows[is_cold]:
        by_user.setdefault(users[r], []).append(int(r))
    for user in sorted(by_user):
        ordered = sorted(by_user[user], key=lambda r: (times[r], r))
        onboarding_rows += ordered[:onboarding]
        test_rows += ordered[onboarding:]
    return {"train": warm_rows[~to_valid & ~to_test], "valid": warm_rows[to_valid], "warm_test": warm_rows[to_test],
            "onboarding": np.array(sorted(onboarding_rows), dtype=np.int64),
            "test": np.array(sorted(test_rows), dtype=np.int64), "cold": np.array(sorted(cold), dtype=object)}
