"""Two runs never write the same output folder at once; a dead run's lock is taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import uip_config_dict, write_dataset


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_live_run_holds_the_folder_and_a_second_gets_one_clear_error(tmp_path):
    from recbole_uip.locking import OutputLockedError, output_lock

    with output_lock(tmp_path, "toy-uip") as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
        with pytest.raises(OutputLockedError, match=f"pid {os.getpid()}.*uip_lock_timeout"):
            with output_lock(tmp_path, "toy-uip"):
                pass
        start = time.monotonic()
        with pytest.raises(OutputLockedError):                  # waits up to the timeout, then gives up
            with output_lock(tmp_path, "toy-uip", timeout=0.3, poll=0.05):
                pass
        assert time.monotonic() - start >= 0.3
        with output_lock(tmp_path, "other-uip"):                # another folder is another lock
            pass
    assert not path.exists()                                    # released
    with output_lock(tmp_path, "toy-uip"):                      # and free again
        pass


def test_a_waiting_run_proceeds_when_the_owner_finishes(tmp_path):
    from recbole_uip.locking import output_lock

    lock = tmp_path / ".toy-uip.lock"
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.6)"])
    lock.write_text(json.dumps({"pid": owner.pid, "host": socket.gethostname(), "started": time.time()}))
    try:
        start = time.monotonic()
        with output_lock(tmp_path, "toy-uip", timeout=30, poll=0.05):   # the owner dies: its lock is taken over
            assert json.loads(lock.read_text())["pid"] == os.getpid()
        assert time.monotonic() - start < 30
    finally:
        owner.kill()


def test_infer_takes_over_a_dead_runs_lock_and_refuses_a_live_one(tmp_path, tiny_llm_dir, caplog):
    from recbole_uip.locking import OutputLockedError
    from recbole_uip.quick_start import build_config, infer_profiles

    write_dataset(tmp_path / "data", n_users=8, n_items=10, per_user=5)
    config = build_config("DeepFM", "toy", None, uip_config_dict(tmp_path, tiny_llm_dir, uip_epochs=0))
    lock = tmp_path / "out" / ".toy-uip.lock"
    lock.parent.mkdir(parents=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"pid": live.pid, "host": socket.gethostname(), "started": time.time()}))
        with pytest.raises(OutputLockedError, match=f"pid {live.pid}"):
            infer_profiles(config)
        assert not (tmp_path / "out" / "toy-uip").exists()      # refused before any work
    finally:
        live.kill()
    lock.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "started": time.time()}))
    with caplog.at_level("WARNING"):
        target = infer_profiles(config)
    assert (target / "uip_manifest.json").is_file() and not lock.exists()
    assert "taking over the lock" in caplog.text
