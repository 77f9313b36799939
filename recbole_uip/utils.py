"""Small shared helpers: atomic file writes, content hashing, and the kill test's fault points."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[Any]:
    """Open a temporary file beside ``path``; on success fsync it and rename it over ``path``.

    A crash or exception leaves the old ``path`` (or none) in place and removes the temporary file, so a
    partial file never carries the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    with atomic_write(path) as handle:
        json.dump(data, handle, indent=2, sort_keys=True, default=str)
        handle.write("\n")


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_json(data: Any) -> str:
    """A stable hash of JSON-serialisable data (keys sorted)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode("utf-8")).hexdigest()


_passes: dict[str, int] = {}


def fault_point(name: str) -> None:
    """SIGKILL this process at ``name`` when ``RECBOLE_UIP_FAULT`` names it (``name`` or ``name:N``, its N-th pass;
    ``...@R``: only in the process of rank ``R`` under torchrun): the kill test's hook, as a crash or an OOM kill
    would stop the process. No effect otherwise."""
    wanted = os.environ.get("RECBOLE_UIP_FAULT")
    if not wanted:
        return
    wanted, _, rank = wanted.partition("@")
    if rank and rank != os.environ.get("RANK", "0"):
        return
    point, _, count = wanted.partition(":")
    if point != name:
        return
    _passes[name] = _passes.get(name, 0) + 1
    if _passes[name] >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
