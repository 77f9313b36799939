"""A killed inference resumes where it stopped and ends with the same bank as an uninterrupted run.

Each case runs ``python -m recbole_uip infer`` in a real subprocess on the toy dataset and the tiny LLM (2 EM
rounds after 2 batches of the shift's warm-up, a checkpoint every 2 M-step batches), kills it with SIGKILL at one
point (``RECBOLE_UIP_FAULT``, see ``recbole_uip.utils.fault_point``), reruns the same command, and compares the bank
with an uninterrupted run's: every array bit for bit.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import write_dataset

ARRAYS = ("codes", "initial_codes", "offsets", "summaries")


def _command(tmp_path: Path, tiny_llm_dir: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "recbole_uip", "infer", "--dataset=toy", f"--data_path={tmp_path / 'data'}",
            f"--uip_llm={tiny_llm_dir}", "--uip_llm_dtype=float32", "--uip_codebook_size=3", "--uip_epochs=2",
            "--uip_batch_size=4", "--uip_line_search_users=3", "--uip_checkpoint_every=2", "--uip_free_tokens=true",
            "--uip_shift_warmup_batches=2", "--uip_kmeans_iters=5", "--uip_max_behaviour_tokens=48",
            "--uip_num_threads=1", f"--output_dir={out}",
            "--show_progress=false", f"--checkpoint_dir={tmp_path / 'saved'}", "--seed=2020"]


def _run(command: list[str], cwd: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("RECBOLE_UIP_FAULT", None)
    if fault:
        env["RECBOLE_UIP_FAULT"] = fault
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _bank(out: Path):
    from recbole_uip.bank import FeatureBank

    return FeatureBank.load(out / "toy-uip" / "bank")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llm_dir):
    """An uninterrupted run's bank (and the folder its dataset lives in)."""
    root = tmp_path_factory.mktemp("resume")
    write_dataset(root / "data", n_users=14, n_items=12, per_user=6)
    done = _run(_command(root, tiny_llm_dir, root / "reference"), root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list((root / "reference").rglob("*.pt")), "the checkpoint is removed once the bank is saved"
    return root, _bank(root / "reference")


@pytest.mark.parametrize("fault", [
    "item_embeddings",        # in the summary pass, before the first checkpoint
    "m_step_batch:1",         # in the shift's warm-up, before its first checkpoint
    "m_step_batch:3",         # round 1's first batch after the warm-up (the warm-up ends with a checkpoint)
    "m_step_batch:7",         # the second round, right after its mid-round checkpoint
    "checkpoint_write:2",     # while a checkpoint is being written (its file complete, not yet renamed)
    "bank_write",             # while the bank is being written
    "publish",                # while the augmented folder is being published
])
def test_a_killed_run_resumes_and_ends_with_the_uninterrupted_runs_bank(fault, reference, tiny_llm_dir):
    root, expected = reference
    out = root / f"killed-{fault.replace(':', '-')}"
    shutil.rmtree(out, ignore_errors=True)
    command = _command(root, tiny_llm_dir, out)
    killed = _run(command, root, fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (out / "toy-uip" / "uip_manifest.json").exists()          # nothing looks complete
    again = _run(command, root)
    assert again.returncode == 0, again.stderr[-3000:]
    if fault.startswith(("m_step_batch", "checkpoint_write")):
        assert "resuming from the checkpoint" in again.stderr + again.stdout
    bank = _bank(out)
    assert bank.fingerprint == expected.fingerprint and bank.users == expected.users
    for name in ARRAYS:
        np.testing.assert_array_equal(getattr(bank, name), getattr(expected, name), err_msg=name)
    for ours, theirs in zip(bank.codebooks, expected.codebooks):
        np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(bank.encoder.weights, expected.encoder.weights)
    assert [h.get("nll") for h in bank.metadata["history"]] == [h.get("nll") for h in expected.metadata["history"]]
    assert not list(out.rglob("*.pt")) and not list(out.rglob("*.partial"))


def test_a_checkpoint_of_other_inputs_is_never_used(reference, tiny_llm_dir, caplog):
    from recbole_uip.inference.checkpoint import InferenceCheckpoint

    root, _ = reference
    path = root / "ckpt" / "x.pt"
    InferenceCheckpoint(path, "fingerprint-a").save({"epoch": 1})
    assert InferenceCheckpoint(path, "fingerprint-a").load() == {"epoch": 1}
    assert InferenceCheckpoint(path, "fingerprint-b").load() is None
    assert "belongs to other inputs" in caplog.text
    path.write_bytes(b"not a checkpoint")
    assert InferenceCheckpoint(path, "fingerprint-a").load() is None


def _flags(tmp_path: Path, tiny_llm_dir: Path) -> list[str]:
    return ["--dataset=toy", f"--data_path={tmp_path / 'data'}", f"--uip_llm={tiny_llm_dir}", "--uip_llm_dtype=float32",
            "--uip_codebook_size=3", "--uip_epochs=1", "--uip_batch_size=4", "--uip_checkpoint_every=1",
            f"--output_dir={tmp_path / 'out'}", "--show_progress=false", "--state=WARNING"]


def test_a_nan_loss_stops_the_run_naming_round_and_batch_and_keeps_the_last_checkpoint(tmp_path, tiny_llm_dir,
                                                                                     monkeypatch, capsys):
    import torch

    import recbole_uip.inference.trainer as trainer_module
    from recbole_uip.__main__ import main

    write_dataset(tmp_path / "data", n_users=14, n_items=12, per_user=6)
    real, calls = trainer_module.behaviour_nll, []

    def nan_on_the_third_batch(*args, **kwargs):
        plain, weighted = real(*args, **kwargs)
        calls.append(1)
        return plain, weighted * (torch.nan if len(calls) == 3 else 1.0)

    monkeypatch.setattr(trainer_module, "behaviour_nll", nan_on_the_third_batch)
    assert main(["infer", *_flags(tmp_path, tiny_llm_dir)]) == 2
    err = capsys.readouterr().err
    assert "diverged in round 1, batch 3: the M-step loss is nan" in err and "last good checkpoint is kept" in err
    kept = list((tmp_path / "out" / ".uip_checkpoints").rglob("*.pt"))
    assert len(kept) == 1 and not (tmp_path / "out" / "toy-uip").exists()


def test_an_unexpected_error_keeps_its_traceback(tmp_path, tiny_llm_dir, monkeypatch):
    import recbole_uip.inference.trainer as trainer_module
    from recbole_uip.__main__ import main

    write_dataset(tmp_path / "data", n_users=14, n_items=12, per_user=6)

    def crash(self):
        raise RuntimeError("simulated torch crash")

    monkeypatch.setattr(trainer_module.ProfileInferenceTrainer, "fit", crash)
    with pytest.raises(RuntimeError, match="simulated torch crash"):
        main(["infer", *_flags(tmp_path, tiny_llm_dir)])
