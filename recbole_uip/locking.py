"""One run at a time per augmented dataset folder: a lock file beside it, taken over when its owner has died.

Two runs that write the same ``<uip_output_dir>/<dataset>-uip/`` would each publish their own folder and bank (the
publication itself is atomic, so neither leaves a partial folder, but the second silently replaces the first, and
both spend the inference). :func:`output_lock` holds ``<uip_output_dir>/.<dataset>-uip.lock`` for the whole step.
A second run gets :class:`OutputLockedError` naming the owner, or waits up to ``uip_lock_timeout`` seconds. A lock
whose process no longer runs on this host (killed, crashed) is taken over, and the log says so.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from logging import getLogger
from pathlib import Path
from typing import Iterator


class OutputLockedError(RuntimeError):
    """Another live run holds the lock of the same output folder."""


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (exited, not yet reaped by its parent)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:       # exists, owned by someone else
        pass
    with contextlib.suppress(OSError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] != "Z"
    return True


def _owner(path: Path) -> dict | None:
    """The lock's owner record, or None when the file is gone or unreadable (being written: treated as live)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _stale(owner: dict, path: Path) -> bool:
    """A lock of this host whose process is gone, or a lock left empty for a minute (its owner died between
    creating and writing it). A lock of another host is never judged stale."""
    if not owner:
        with contextlib.suppress(OSError):
            return time.time() - path.stat().st_mtime > 60
        return False
    return owner.get("host") == socket.gethostname() and not _alive(int(owner.get("pid", -1)))


@contextlib.contextmanager
def output_lock(folder: Path, name: str, timeout: float = 0.0, poll: float = 1.0) -> Iterator[Path]:
    """Hold ``<folder>/.<name>.lock`` while the block runs.

    Args:
        timeout: seconds to wait for a live owner to finish; 0 fails at once.

    Raises:
        OutputLockedError: a live run holds the lock (after ``timeout``), with its pid, host and start time.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f".{name}.lock"
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
    deadline = time.monotonic() + timeout
    while True:
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _owner(path)
            if owner is None:
                continue                                  # released between our two calls: try again
            if _stale(owner, path):
                getLogger().warning(f"UIP: taking over the lock {path} of process {owner.get('pid')}, which is no "
                                    f"longer running (killed or crashed).")
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                continue
            if time.monotonic() >= deadline:
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0))) if owner else "?"
                raise OutputLockedError(
                    f"Another run (pid {owner.get('pid', '?')} on {owner.get('host', '?')}, since {since}) is writing "
                    f"{folder / name}. Wait for it, give this run another uip_output_dir, or set uip_lock_timeout "
                    f"(seconds) to wait. If no such run exists, delete {path}.")
            time.sleep(poll)
            continue
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(record)
        break
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            if _owner(path) == json.loads(record):
                os.unlink(path)
