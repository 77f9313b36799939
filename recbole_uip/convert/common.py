"""What every converter shares: reading raw files, cleaning text, compact interaction arrays, filters, the report, and
writing the atomic files.

Memory stays bounded by the number of *interactions and distinct ids*, never by the size of the text: a review line is
parsed, its ids are interned to integers and its rating and time kept as numbers, and the line (with its review text)
is dropped. Per interaction that is 20 bytes (user and item int32, rating float32, time float64); per distinct user or
item one dictionary entry. Metadata files are streamed after the filters and only surviving items' fields are written,
one line at a time.
"""

from __future__ import annotations

import array
import bz2
import dataclasses
import gzip
import html
import io
import json
import math
import os
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from recbole_uip.data.atomic import publish_directory
from recbole_uip.locking import output_lock


class ConversionError(ValueError):
    """The raw input cannot be converted (missing file, unknown format, nothing left after the filters)."""


# ------------------------------------------------------------------------------------------------ reading
def open_text(path: str | os.PathLike, encoding: str = "utf-8") -> io.TextIOBase:
    """Open a raw file as text, plain, gzipped (``.gz``) or bzip2-compressed (``.bz2``), by its magic bytes.

    Undecodable bytes are replaced (U+FFFD), never fatal: one bad byte must not stop a 50 GB conversion.

    Raises:
        ConversionError: the file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: file not found.")
    with open(path, "rb") as handle:
        magic = handle.read(3)
    if magic[:2] == b"\x1f\x8b":
        return gzip.open(path, "rt", encoding=encoding, errors="replace", newline="")
    if magic == b"BZh":
        return bz2.open(path, "rt", encoding=encoding, errors="replace", newline="")
    return open(path, encoding=encoding, errors="replace", newline="")


def file_size(path: str | os.PathLike) -> int:
    """Bytes on disk (of the compressed file where it is compressed): the progress bar's total."""
    return Path(path).stat().st_size


class Progress:
    """A tqdm bar over the bytes read from a file (compressed bytes for ``.gz``), or nothing.

    Shown only when ``enabled`` and stderr is a terminal: logs and CI output stay clean.
    """

    def __init__(self, path: Path, label: str, enabled: bool):
        self._bar = None
        self._raw = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=file_size(path), unit="B", unit_scale=True, desc=label, leave=False)

    def attach(self, handle) -> None:
        """Follow the position of the underlying binary file of ``handle``."""
        raw = getattr(handle, "buffer", None)
        raw = getattr(raw, "fileobj", None) or getattr(raw, "_fp", None) or raw
        self._raw = getattr(raw, "raw", raw)

    def update(self) -> None:
        if self._bar is not None and self._raw is not None:
            try:
                position = self._raw.tell()
            except (OSError, ValueError):
                return
            self._bar.update(position - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def iter_lines(path: Path, report: "ConversionReport", label: str, encoding: str = "utf-8",
               progress: bool = True) -> Iterator[tuple[int, str]]:
    """``(line number, line without newline)`` of a text file, counting each read line in ``report.lines[label]``;
    blank lines are skipped (not counted as malformed)."""
    bar = Progress(path, label, progress)
    with open_text(path, encoding) as handle:
        bar.attach(handle)
        for number, line in enumerate(handle, start=1):
            report.lines[label] += 1
            if number % 65536 == 0:
                bar.update()
            line = line.rstrip("\r\n")
            if line.strip():
                yield number, line
    bar.close()


def iter_json_lines(path: Path, report: "ConversionReport", label: str, progress: bool = True) -> Iterator[dict]:
    """Each JSON object of a JSON-lines file. A line that is not a JSON object is counted in
    ``report.malformed[label]`` (its first line number kept for the report) and skipped."""
    loads = json.loads
    for number, line in iter_lines(path, report, label, progress=progress):
        try:
            record = loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            report.malformed_line(label, number)
            continue
        yield record


def iter_delimited(path: Path, report: "ConversionReport", label: str, separator: str, n_fields: int,
                   encoding: str = "utf-8", progress: bool = True) -> Iterator[list[str]]:
    """Rows of a delimited text file (``separator`` a plain string such as ``'|'``, ``'::'``, ``'\\t'``) with exactly
    ``n_fields`` values; other lines are counted as malformed and skipped."""
    for number, line in iter_lines(path, report, label, encoding, progress):
        values = line.split(separator)
        if len(values) != n_fields:
            report.malformed_line(label, number)
            continue
        yield values


def iter_csv(path: Path, report: "ConversionReport", label: str, columns: Sequence[str],
             progress: bool = True) -> Iterator[dict[str, str]]:
    """Rows of a CSV file with a header (quoted fields, as MovieLens' ``movies.csv``), as dicts of ``columns``.

    Raises:
        ConversionError: the header lacks one of ``columns``.
    """
    import csv

    lines = (line for _, line in iter_lines(path, report, label, progress=progress))
    reader = csv.reader(lines)
    header = next(reader, None)
    if header is None:
        raise ConversionError(f"{path}: empty file (expected a header with {', '.join(columns)}).")
    missing = [c for c in columns if c not in header]
    if missing:
        raise ConversionError(f"{path}: the header has no {', '.join(missing)} (header: {', '.join(header)}).")
    index = [header.index(c) for c in columns]
    for number, row in enumerate(reader, start=2):
        if len(row) != len(header):
            report.malformed_line(label, number)
            continue
        yield {c: row[i] for c, i in zip(columns, index)}


# ------------------------------------------------------------------------------------------------ values
_TAG = re.compile(r"<[^>]{0,200}>")
_SPACE = re.compile(r"\s+")


def clean_text(value, max_chars: int | None = None) -> str:
    """A raw text value as one atomic-file field: HTML entities unescaped (twice: ``&amp;amp;`` occurs), tags
    removed, tabs/newlines/runs of spaces collapsed to one space (RecBole splits on tabs and spaces), then cut to
    ``max_chars`` at a word boundary. ``None`` and non-strings other than numbers give ``''``."""
    if value is None:
        return ""
    if not isinstance(value, str):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        else:
            return ""
    if "&" in value:
        value = html.unescape(html.unescape(value))
    if "<" in value:
        value = _TAG.sub(" ", value)
    value = _SPACE.sub(" ", value).strip()
    if max_chars is not None and len(value) > max_chars:
        value = value[:max_chars].rsplit(" ", 1)[0].rstrip() if " " in value[:max_chars] else value[:max_chars]
    return value


def clean_list(values) -> str:
    """A list of phrases (categories) as one ``token_seq`` text: each cleaned, duplicates and empties dropped, order
    kept, joined by spaces. A plain string is split on commas (Yelp writes ``"Pizza, Italian"``)."""
    if values is None:
        return ""
    if isinstance(values, str):
        values = values.split(",")
    if not isinstance(values, (list, tuple)):
        return ""
    seen: dict[str, None] = {}
    for value in values:
        if isinstance(value, (list, tuple)):            # 2014-style nested category paths
            for inner in value:
                text = clean_text(inner)
                if text:
                    seen.setdefault(text, None)
            continue
        text = clean_text(value)
        if text:
            seen.setdefault(text, None)
    return " ".join(seen)


def as_float(value) -> float | None:
    """A finite float from a number or numeric string, else None."""
    if value is None or isinstance(value, bool):
        return None
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None


def format_number(value: float) -> str:
    """A float as the shortest text that reads back equal: ``3`` for 3.0, ``4.5``, ``1588687728.923``."""
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


# ------------------------------------------------------------------------------------------------ the report
@dataclasses.dataclass
class ConversionReport:
    """Counts of one conversion, printed at its end and written as ``<name>.convert.json`` beside the dataset folder.

    Attributes:
        lines: lines read per input (label -> count).
        malformed: lines that could not be parsed per input (bad JSON, wrong number of columns).
        first_malformed: the first malformed line number per input (to look at).
        missing: records lacking a value, per ``input.field`` (the record is dropped when the field is required:
            ids, and rating/time where the dataset has them).
        filtered_rating: interactions below ``min_rating``.
        filtered_kcore: interactions removed by the k-core filter; ``kcore_rounds``: its passes until stable.
        interactions, users, items: what was written.
        items_without_metadata: written items with no metadata record (their text fields are empty).
        notes: anything else worth a line (a column left out because no record has it, ...).
    """

    format: str
    name: str
    lines: Counter = dataclasses.field(default_factory=Counter)
    malformed: Counter = dataclasses.field(default_factory=Counter)
    first_malformed: dict = dataclasses.field(default_factory=dict)
    missing: Counter = dataclasses.field(default_factory=Counter)
    filtered_rating: int = 0
    filtered_kcore: int = 0
    kcore_rounds: int = 0
    interactions: int = 0
    users: int = 0
    items: int = 0
    items_without_metadata: int = 0
    seconds: float = 0.0
    notes: list = dataclasses.field(default_factory=list)

    def malformed_line(self, label: str, number: int) -> None:
        self.malformed[label] += 1
        self.first_malformed.setdefault(label, number)

    def as_dict(self) -> dict:
        data = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        for key in ("lines", "malformed", "missing", "first_malformed"):
            data[key] = dict(data[key])
        data["notes"] = list(self.notes)
        return data

    def summary(self) -> str:
        """A few lines for the terminal."""
        out = [f"converted {self.format} -> {self.name}: {self.interactions} interactions, {self.users} users, "
               f"{self.items} items ({self.seconds:.1f} s)"]
        for label, count in self.lines.items():
            bad = self.malformed.get(label, 0)
            out.append(f"  {label}: {count} lines read" + (
                f", {bad} malformed skipped (first: line {self.first_malformed[label]})" if bad else ""))
        if self.missing:
            out.append("  missing values: " + ", ".join(f"{k} {v}" for k, v in sorted(self.missing.items())))
        if self.filtered_rating:
            out.append(f"  below min_rating: {self.filtered_rating} interactions removed")
        if self.kcore_rounds:
            out.append(f"  k-core: {self.filtered_kcore} interactions removed in {self.kcore_rounds} passes")
        if self.items_without_metadata:
            out.append(f"  items without metadata (empty text fields): {self.items_without_metadata}")
        out += [f"  note: {note}" for note in self.notes]
        return "\n".join(out)


# ------------------------------------------------------------------------------------------------ interactions
class IdMap:
    """Raw string ids interned to consecutive ints (first-seen order)."""

    def __init__(self):
        self.index: dict[str, int] = {}
        self.tokens: list[str] = []

    def __call__(self, token: str) -> int:
        number = self.index.get(token)
        if number is None:
            number = self.index[token] = len(self.tokens)
            self.tokens.append(token)
        return number

    def __len__(self) -> int:
        return len(self.tokens)

    def get(self, token: str) -> int | None:
        return self.index.get(token)


class Interactions:
    """Compact, growing per-interaction columns: user and item ints, optional rating, time and extra floats.

    Args:
        extras: names of extra float columns (Yelp's vote counts), written after the time.
    """

    def __init__(self, extras: Sequence[str] = ()):
        self.users, self.items = IdMap(), IdMap()
        self.user = array.array("i")
        self.item = array.array("i")
        self.rating = array.array("f")
        self.time = array.array("d")
        self.extras = {name: array.array("d") for name in extras}

    def add(self, user: str, item: str, rating: float | None, time: float | None, extras: Sequence[float] = ()) -> None:
        """Append one interaction. ``rating``/``time`` None are stored as NaN (see :meth:`column`)."""
        self.user.append(self.users(user))
        self.item.append(self.items(item))
        self.rating.append(math.nan if rating is None else rating)
        self.time.append(math.nan if time is None else time)
        for column, value in zip(self.extras.values(), extras):
            column.append(math.nan if value is None else value)

    def __len__(self) -> int:
        return len(self.user)

    def arrays(self) -> dict[str, np.ndarray]:
        """Zero-copy numpy views of every column."""
        out = {"user": np.frombuffer(self.user, dtype=np.int32) if len(self) else np.zeros(0, np.int32),
               "item": np.frombuffer(self.item, dtype=np.int32) if len(self) else np.zeros(0, np.int32),
               "rating": np.frombuffer(self.rating, dtype=np.float32) if len(self) else np.zeros(0, np.float32),
               "time": np.frombuffer(self.time, dtype=np.float64) if len(self) else np.zeros(0)}
        for name, column in self.extras.items():
            out[name] = np.frombuffer(column, dtype=np.float64) if len(self) else np.zeros(0)
        return out


def add_interaction(inter: Interactions, report: "ConversionReport", label: str, user, item, rating: float | None,
                    time: float | None, extras: Sequence[float | None] = (), user_key: str = "user",
                    item_key: str = "item") -> bool:
    """Append one record's interaction unless its user or item id is missing or empty (then counted in
    ``report.missing['<label>.<key>']``). Ids are stripped and may not contain tabs."""
    ids = []
    for value, key in ((user, user_key), (item, item_key)):
        text = value.strip() if isinstance(value, str) else (str(value) if isinstance(value, int) and
                                                             not isinstance(value, bool) else "")
        if not text:
            report.missing[f"{label}.{key}"] += 1
            return False
        ids.append(text if "\t" not in text and "\n" not in text else clean_text(text))
    inter.add(ids[0], ids[1], rating, time, extras)
    return True


def kept_id(record: dict, key: str, kept: "IdMap", report: "ConversionReport", label: str) -> str | None:
    """The stripped id ``record[key]`` of a side record (item metadata, a business, a user) if it is one of the
    ``kept`` ids (those that survived the filters), else None. A missing or non-string id is counted in
    ``report.missing['<label>.<key>']``; a kept-out id is not (the filters dropped it)."""
    value = record.get(key)
    if not isinstance(value, str):
        report.missing[f"{label}.{key}"] += 1
        return None
    value = value.strip()
    return value if kept.get(value) is not None else None


def count_empty(report: "ConversionReport", label: str, values: Iterable[tuple[str, str]]) -> None:
    """Count each ``(field, value)`` whose value is empty in ``report.missing['<label>.<field>']``."""
    for field, value in values:
        if not value:
            report.missing[f"{label}.{field}"] += 1


def kcore_mask(user: np.ndarray, item: np.ndarray, k: int, keep: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Rows of the k-core: repeatedly drop interactions of users or items with fewer than ``k`` (kept) interactions
    until none is left to drop. Returns ``(mask, passes)``. Duplicated (user, item) rows count separately, as in
    RecBole's ``user_inter_num_interval``."""
    mask = np.ones(len(user), dtype=bool) if keep is None else keep.copy()
    if k <= 1:
        return mask, 0
    n_users, n_items = int(user.max(initial=-1)) + 1, int(item.max(initial=-1)) + 1
    passes = 0
    while True:
        passes += 1
        user_count = np.bincount(user[mask], minlength=n_users)
        item_count = np.bincount(item[mask], minlength=n_items)
        new = mask & (user_count[user] >= k) & (item_count[item] >= k)
        if np.array_equal(new, mask):
            return mask, passes
        mask = new


@dataclasses.dataclass
class Column:
    """One column of a written ``.item`` / ``.user`` file: its name and atomic type."""

    name: str
    type: str

    @property
    def header(self) -> str:
        return f"{self.name}:{self.type}"


@dataclasses.dataclass
class InterFields:
    """The ``.inter`` header of a format: user and item id names, rating and time names (None: the format has none),
    extra float columns."""

    user: str = "user_id"
    item: str = "item_id"
    rating: str | None = "rating"
    time: str | None = "timestamp"
    extras: tuple[str, ...] = ()


def apply_filters(inter: Interactions, fields: InterFields, report: ConversionReport, min_rating: float | None,
                  k_core: int, source: Path) -> tuple[np.ndarray, InterFields]:
    """The rows to write, and the ``.inter`` fields they have.

    A rating or time column that *no* interaction has is left out (the dataset has no ratings / no timestamps; a
    note says so); where only *some* interactions lack it, those are dropped and counted in ``report.missing``. Then
    ``min_rating`` and the k-core filter.

    Raises:
        ConversionError: no interaction is left, naming ``source`` and what removed them.
    """
    columns = inter.arrays()
    keep = np.ones(len(inter), dtype=bool)
    for role in ("rating", "time"):
        name = getattr(fields, role)
        if name is None:
            continue
        present = ~np.isnan(columns[role])
        if len(present) and not present.any():
            report.notes.append(f"no record has a {role} ({name}): the .inter file has no {name} column")
            fields = dataclasses.replace(fields, **{role: None})
        elif not present.all():
            report.missing[f"{role} ({name})"] += int((~present).sum())
            keep &= present
    if min_rating is not None:
        if fields.rating is None:
            raise ConversionError(f"{source}: --min_rating={min_rating:g} needs ratings, and no record has one.")
        below = keep & (columns["rating"] < min_rating)
        report.filtered_rating = int(below.sum())
        keep &= ~below
    before = int(keep.sum())
    keep, report.kcore_rounds = kcore_mask(columns["user"], columns["item"], k_core, keep)
    report.filtered_kcore = before - int(keep.sum())
    if not keep.any():
        why = (f"{len(inter)} interactions read" + (f", {report.filtered_rating} below min_rating" if min_rating else "")
               + (f", {report.filtered_kcore} removed by the {k_core}-core filter" if k_core > 1 else ""))
        raise ConversionError(f"{source}: no interaction left to write ({why}). Lower --k_core / --min_rating, or "
                              f"check the file.")
    return keep, fields


# ------------------------------------------------------------------------------------------------ writing
def write_inter(path: Path, inter: Interactions, fields: InterFields, keep: np.ndarray) -> None:
    """The ``.inter`` file of the kept rows, in input order."""
    columns = inter.arrays()
    headers = [f"{fields.user}:token", f"{fields.item}:token"]
    numeric = []
    for role in ("rating", "time"):
        if getattr(fields, role):
            headers.append(f"{getattr(fields, role)}:float")
            numeric.append(columns[role])
    for name in fields.extras:
        headers.append(f"{name}:float")
        numeric.append(columns[name])
    users, items = inter.users.tokens, inter.items.tokens
    rows = np.flatnonzero(keep)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        handle.write("\t".join(headers) + "\n")
        for start in range(0, len(rows), 65536):
            chunk = rows[start:start + 65536]
            u, i = columns["user"][chunk].tolist(), columns["item"][chunk].tolist()
            values = [[("" if math.isnan(v) else format_number(v)) for v in column[chunk].tolist()] for column in numeric]
            lines = []
            for j in range(len(chunk)):
                lines.append("\t".join([users[u[j]], items[i[j]]] + [column[j] for column in values]))
            handle.write("\n".join(lines) + "\n")


class TableWriter:
    """Writes one ``.item`` / ``.user`` file row by row, once per id, for the ids of the kept interactions.

    Args:
        ids: the :class:`IdMap` of that side; ``wanted``: bool per interned id, whether it is in the output.
        columns: the header after the id column.
    """

    def __init__(self, path: Path, id_header: str, columns: Sequence[Column], ids: IdMap, wanted: np.ndarray):
        self.path, self.ids, self.columns = path, ids, list(columns)
        self.wanted = wanted
        self.written = np.zeros(len(wanted), dtype=bool)
        self.handle = open(path, "w", encoding="utf-8", newline="")
        self.handle.write("\t".join([id_header] + [c.header for c in self.columns]) + "\n")

    def write(self, token: str, values: Sequence[str]) -> bool:
        """Write ``token``'s row if it is wanted and not yet written; returns whether it was written."""
        number = self.ids.get(token)
        if number is None or not self.wanted[number] or self.written[number]:
            return False
        self.written[number] = True
        self.handle.write("\t".join([token] + [v.replace("\t", " ") for v in values]) + "\n")
        return True

    def finish(self, fill_missing: bool) -> int:
        """Close the file; with ``fill_missing``, first write an empty row for each wanted id without one (so RecBole
        keeps its interactions). Returns how many ids had no row."""
        missing = np.flatnonzero(self.wanted & ~self.written)
        if fill_missing:
            empty = [""] * len(self.columns)
            for number in missing.tolist():
                self.handle.write("\t".join([self.ids.tokens[number]] + empty) + "\n")
        self.handle.close()
        return len(missing)


def used_ids(inter: Interactions, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bool per interned user and per interned item: whether it has a kept interaction."""
    columns = inter.arrays()
    users = np.zeros(len(inter.users), dtype=bool)
    items = np.zeros(len(inter.items), dtype=bool)
    users[columns["user"][keep]] = True
    items[columns["item"][keep]] = True
    return users, items


def publish_dataset(output_dir: str | os.PathLike, name: str, build: Callable[[Path], None]) -> Path:
    """Build ``<output_dir>/<name>/`` in a temporary folder and publish it in one rename (under the folder's lock),
    so a killed conversion never leaves a folder that looks complete.

    ``build(folder)`` writes ``<name>.inter`` (and ``.item`` / ``.user``) into ``folder``.
    """
    output_dir = Path(output_dir)
    target = output_dir / name
    def build_readable(folder: Path) -> None:       # a temporary folder is private (0700); a dataset is not
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(folder, 0o777 & ~umask)
        build(folder)

    with output_lock(output_dir, name):
        publish_directory(build_readable, target)
    return target


def check_name(name: str) -> str:
    """A dataset name RecBole can use as a folder and file prefix.

    Raises:
        ConversionError: a name with a path separator, a dot, whitespace, or empty.
    """
    if not name or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", name):
        raise ConversionError(f"--name={name!r}: use letters, digits, '_' and '-' only (it names the folder and "
                              f"the files <name>.inter, ...).")
    return name


def require_file(path: str | os.PathLike | None, what: str) -> Path:
    """``path`` as a Path that exists.

    Raises:
        ConversionError: naming the flag's role and the path.
    """
    if path is None:
        raise ConversionError(f"{what}: no file given.")
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConversionError(f"{path}: file not found ({what}).")
    return path


def first_existing(folder: Path, names: Iterable[str]) -> Path | None:
    """The first of ``names`` that exists in ``folder`` (plain or ``.gz``)."""
    for name in names:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None
