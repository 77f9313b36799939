"""Reading, validating and writing RecBole atomic files, and the augmented ``<name>-uip`` dataset copy.

Atomic files are tab-separated with a ``name:type`` header (types ``token``, ``token_seq``, ``float``,
``float_seq``). We read them as text and write every original byte back unchanged: only the ``.user`` file
gains one ``uip_<profile>:token`` column per profile.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Mapping

from recbole_uip.utils import fault_point

ATOMIC_TYPES = ("token", "token_seq", "float", "float_seq")
MANIFEST_NAME = "uip_manifest.json"


class AtomicFileError(ValueError):
    """An atomic file is missing or malformed; the message names the file and line."""


@dataclasses.dataclass
class AtomicTable:
    """One atomic file held as text.

    Attributes:
        path: where it was read from.
        header: the raw header line (without newline), written back unchanged.
        fields: field names in column order, e.g. ``["user_id", "age"]``.
        types: their atomic types, e.g. ``["token", "token"]``.
        rows: one list of raw string values per data line, ``len(row) == len(fields)``.
    """

    path: Path
    header: str
    fields: list[str]
    types: list[str]
    rows: list[list[str]]

    def column(self, field: str) -> list[str]:
        if field not in self.fields:
            raise AtomicFileError(f"{self.path}: no field '{field}' (fields: {', '.join(self.fields)}).")
        index = self.fields.index(field)
        return [row[index] for row in self.rows]

    def field_type(self, field: str) -> str:
        return self.types[self.fields.index(field)]


def parse_header(line: str, path: Path, separator: str = "\t") -> tuple[list[str], list[str]]:
    """Split an atomic header into field names and types, rejecting anything RecBole would misread."""
    fields, types = [], []
    columns = line.rstrip("\r\n").split(separator)
    if len(columns) == 1 and line.count(":") > 1:
        for other in ("\t", ",", ";", "|", " "):
            if other != separator and len(line.split(other)) > 1 and all(":" in c for c in line.strip().split(other)):
                raise AtomicFileError(
                    f"{path}:1: the header looks separated by {other!r}, but field_separator is {separator!r}. "
                    f"Write the file with {separator!r} between fields, or set field_separator.")
    for column in columns:
        name, sep, ftype = column.rpartition(":")
        if not sep or not name:
            raise AtomicFileError(f"{path}:1: header column {column!r} is not of the form 'name:type'.")
        if ftype not in ATOMIC_TYPES:
            raise AtomicFileError(
                f"{path}:1: field '{name}' has type '{ftype}'; atomic types are {', '.join(ATOMIC_TYPES)}."
            )
        if name in fields:
            raise AtomicFileError(f"{path}:1: field '{name}' appears twice in the header.")
        fields.append(name)
        types.append(ftype)
    return fields, types


def iter_rows(path: Path, n_fields: int, separator: str = "\t", encoding: str = "utf-8") -> Iterable[list[str]]:
    """Yield each data line of an atomic file as a list of raw values, checking the column count."""
    for _, values in iter_numbered_rows(path, n_fields, separator, encoding):
        yield values


def iter_numbered_rows(path: Path, n_fields: int, separator: str = "\t",
                       encoding: str = "utf-8") -> Iterable[tuple[int, list[str]]]:
    """Yield ``(line number, values)`` for each non-empty data line (the header is line 1). CRLF line ends are
    read like LF (RecBole's pandas reader does the same).

    Raises:
        AtomicFileError: a line that is not valid ``encoding`` text, or with the wrong number of values (named by
            file and line; a last line without newline is flagged as possibly cut off).
    """
    encoding = encoding or "utf-8"
    with open(path, "rb") as handle:
        handle.readline()
        for line_number, raw in enumerate(handle, start=2):
            try:
                line = raw.decode(encoding).rstrip("\r\n")
            except UnicodeDecodeError as error:
                raise AtomicFileError(
                    f"{path}:{line_number}: not valid {encoding} text (byte {raw[error.start:error.start + 1]!r} at "
                    f"column {error.start + 1}). Re-encode the file as {encoding}, or set RecBole's encoding key."
                ) from error
            if not line:
                continue
            values = line.split(separator)
            if len(values) != n_fields:
                cut = "" if raw.endswith(b"\n") else " It is the last line and has no newline: was the file cut off?"
                raise AtomicFileError(
                    f"{path}:{line_number}: expected {n_fields} values separated by {separator!r}, found "
                    f"{len(values)}.{cut}"
                )
            yield line_number, values


def read_header(path: Path, separator: str = "\t", encoding: str = "utf-8") -> tuple[str, list[str], list[str]]:
    path = Path(path)
    if not path.is_file():
        raise AtomicFileError(f"{path}: file not found.")
    encoding = encoding or "utf-8"
    with open(path, "rb") as handle:
        raw = handle.readline()
    try:
        header = raw.decode(encoding).rstrip("\r\n")
    except UnicodeDecodeError as error:
        raise AtomicFileError(f"{path}:1: not valid {encoding} text (byte {raw[error.start:error.start + 1]!r} at column "
                              f"{error.start + 1}). Re-encode the file as {encoding}, or set RecBole's encoding key.") from error
    if not header:
        raise AtomicFileError(f"{path}: empty file (an atomic file starts with a 'name:type' header).")
    fields, types = parse_header(header, path, separator)
    return header, fields, types


def read_atomic(path: str | os.PathLike, separator: str = "\t", encoding: str = "utf-8") -> AtomicTable:
    """Read and validate a whole atomic file."""
    path = Path(path)
    header, fields, types = read_header(path, separator, encoding)
    rows = list(iter_rows(path, len(fields), separator, encoding))
    return AtomicTable(path=path, header=header, fields=fields, types=types, rows=rows)


def validate_atomic(path: Path, required_fields: Iterable[str] = (), separator: str = "\t", encoding: str = "utf-8",
                    unique_field: str | None = None) -> int:
    """Check a file's header, required fields and every row's column count in one pass, without keeping it in
    memory; with ``unique_field``, also that each value of that field is on one line only (RecBole would keep one
    row of a ``.user``/``.item`` id silently). Returns the number of data rows."""
    _, fields, _ = read_header(path, separator, encoding)
    missing = [f for f in required_fields if f not in fields]
    if missing:
        raise AtomicFileError(f"{path}: missing field(s) {', '.join(missing)} (fields: {', '.join(fields)}).")
    index = None if unique_field is None else fields.index(unique_field)
    seen: dict[str, int] = {}
    rows = 0
    for line, values in iter_numbered_rows(path, len(fields), separator, encoding):
        rows += 1
        if index is not None:
            first = seen.setdefault(values[index], line)
            if first != line:
                raise AtomicFileError(f"{path}:{line}: {unique_field} '{values[index]}' appears again (first on line "
                                      f"{first}). Keep one row per {unique_field}.")
    return rows


def dataset_files(data_dir: str | os.PathLike, name: str) -> dict[str, Path]:
    """The atomic files of dataset ``name`` in ``data_dir``, keyed by suffix (``inter``, ``user``, ...)."""
    data_dir = Path(data_dir)
    prefix = f"{name}."
    files = {}
    if data_dir.is_dir():
        for path in sorted(data_dir.iterdir()):
            if path.is_file() and path.name.startswith(prefix) and "." not in path.name[len(prefix):]:
                files[path.name[len(prefix):]] = path
    return files


def write_user_file(
    path: Path,
    source: AtomicTable | None,
    user_field: str,
    users: Iterable[str],
    new_columns: Mapping[str, Callable[[str], str]],
    separator: str = "\t",
    encoding: str = "utf-8",
) -> None:
    """Write a ``.user`` file: every original column and row, plus one ``name:token`` column per entry.

    Args:
        source: the original ``.user`` file, or ``None`` when the dataset has none; then one row is written
            per user in ``users`` (every user of ``.inter``), so no interaction is filtered out.
        new_columns: field name -> function from a raw user token to the value to write.
    """
    if source is not None:
        if user_field not in source.fields:
            raise AtomicFileError(f"{source.path}: no user id field '{user_field}' (fields: {', '.join(source.fields)}).")
        clash = [name for name in new_columns if name in source.fields]
        if clash:
            raise AtomicFileError(f"{source.path}: already has field(s) {', '.join(clash)}; rename them or the profiles.")
        header = source.header
        user_index = source.fields.index(user_field)
        rows = source.rows
    else:
        header = f"{user_field}:token"
        user_index = 0
        rows = [[user] for user in users]
    with open(path, "w", encoding=encoding, newline="") as handle:
        handle.write(separator.join([header] + [f"{name}:token" for name in new_columns]) + "\n")
        for row in rows:
            extra = [make(row[user_index]) for make in new_columns.values()]
            handle.write(separator.join(row + extra) + "\n")


class OutputWriteError(OSError):
    """Writing the output folder failed (disk full, not writable); nothing was published."""


def check_writable(folder: Path, key: str = "uip_output_dir") -> None:
    """``folder`` can be created and written (a file is made and removed), or one clear error naming ``key``."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".uip-write-check."):
            pass
    except OSError as error:
        raise OutputWriteError(error.errno, f"{key}: cannot write to {folder} ({error.strerror or error}). "
                                            f"Choose a writable folder with --{key}=DIR.") from error


def publish_directory(build: Callable[[Path], None], target: str | os.PathLike) -> Path:
    """Build a directory in a temporary sibling, then move it to ``target`` in one rename.

    ``build(tmp_dir)`` writes everything, including the manifest that marks the folder complete. If it
    fails, the previous ``target`` (if any) is untouched and the temporary folder removed; what a killed earlier
    publication left beside ``target`` is removed first.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # what a killed earlier publication left (the caller holds the folder's lock: no other run is writing them)
    for stale in list(target.parent.glob(f".{target.name}.*.partial")) + list(target.parent.glob(f".{target.name}.*.old")):
        shutil.rmtree(stale, ignore_errors=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        build(tmp_dir)
        fault_point("publish")
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old / target.name)
            try:
                os.replace(tmp_dir, target)
            except BaseException:
                os.replace(old / target.name, target)  # put the previous complete folder back
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp_dir, target)
    except BaseException as error:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if isinstance(error, OSError) and not isinstance(error, OutputWriteError):
            raise OutputWriteError(error.errno, f"Writing {target} failed ({error.strerror or error}); nothing was "
                                                f"published: the previous complete folder, if any, is unchanged. "
                                                f"Free some space or choose another uip_output_dir.") from error
        raise
    return target


def manifest_fingerprint(folder: str | os.PathLike) -> str | None:
    """The ``fingerprint`` in ``folder``'s manifest (:data:`MANIFEST_NAME`), written last when a dataset copy is
    published; ``None`` when there is no readable manifest (no copy, or one never completed)."""
    try:
        value = json.loads((Path(folder) / MANIFEST_NAME).read_text(encoding="utf-8")).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None
