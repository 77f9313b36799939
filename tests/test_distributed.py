"""Profile inference sharded over processes (torchrun, gloo on CPU), and RecBole's own multi-process mode.

The torchrun cases launch ``python -m torch.distributed.run --standalone --nproc_per_node=2 -m recbole_uip infer``
as a user would, on the toy dataset and the tiny LLM, and compare the bank with a single process's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import uip_config_dict, write_dataset

FLAGS = ["--dataset=toy", "--uip_codebook_size=4", "--uip_batch_size=4",
         "--uip_line_search_users=4", "--uip_kmeans_iters=5", "--uip_max_behaviour_tokens=48", "--uip_num_threads=1",
         "--show_progress=false", "--seed=2020"]


def _infer(root: Path, llm: Path, out: str, ranks: int, *extra: str, fault: str | None = None,
           dtype: str = "float32"):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 \
        else [sys.executable]
    command = [*launcher, "-m", "recbole_uip", "infer", f"--data_path={root / 'data'}", f"--uip_llm={llm}",
               f"--output_dir={root / out}", f"--checkpoint_dir={root / 'saved'}", f"--uip_llm_dtype={dtype}", *FLAGS,
               *extra]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    env.pop("RECBOLE_UIP_FAULT", None)
    if fault:
        env["RECBOLE_UIP_FAULT"] = fault
    # a hang would end here, as a failure, not as a stuck suite
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)


def _bank(root: Path, out: str):
    from recbole_uip.bank import FeatureBank

    return FeatureBank.load(root / out / "toy-uip" / "bank")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    write_dataset(root / "data", n_users=30, n_items=16, per_user=8)
    return root


def test_two_ranks_write_one_complete_bank_with_the_single_processs_ids(root, tiny_llm_dir):
    """The default (uip_epochs 0: item embeddings, feature map, k-means) sharded over 2 ranks gives the single
    process's IDs, in bfloat16 too: each rank embeds its share of the single process's item batches (the same
    rounding), the statistics are summed, k-means++ draws the same users; only the summation order differs."""
    from recbole.config import Config
    from recbole.data import create_dataset

    single = _infer(root, tiny_llm_dir, "one", 1, "--uip_epochs=0", dtype="bfloat16")
    assert single.returncode == 0, single.stderr[-3000:]
    done = _infer(root, tiny_llm_dir, "two", 2, "--uip_epochs=0", dtype="bfloat16")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count(str(root / "two" / "toy-uip")) == 1          # rank 0 alone prints (and writes)
    one, two = _bank(root, "one"), _bank(root, "two")
    assert two.users == one.users
    np.testing.assert_array_equal(two.codes, one.codes)
    np.testing.assert_array_equal(two.initial_codes, one.initial_codes)
    np.testing.assert_array_equal(two.encoder.item_embeddings, one.encoder.item_embeddings)
    np.testing.assert_allclose(two.summaries, one.summaries, atol=1e-4)
    np.testing.assert_allclose(two.offsets, one.offsets, rtol=1e-3, atol=1e-6)
    assert two.metadata["inputs"]["numerics"]["ranks"] == 2 and one.metadata["inputs"]["numerics"]["ranks"] == 1
    assert len(list((root / "two" / ".uip_banks" / "toy").iterdir())) == 1  # one bank, written once
    assert not list((root / "two").rglob("*.pt")) and not list((root / "two").rglob("*.partial"))
    # the atomic files are complete: stock RecBole loads them with a profile for every user
    config = Config(model="DeepFM", dataset="toy-uip", config_dict={
        "data_path": str(root / "two"), "use_gpu": False, "load_col": None, "state": "WARNING"})
    dataset = create_dataset(config)
    for field in ("uip_hobby", "uip_background"):
        assert field in dataset.field2type and (dataset.user_feat[field][1:] > 0).all()   # row 0: padding


def test_em_rounds_over_two_ranks_start_from_the_same_ids_and_differ_only_by_data_parallel_steps(root, tiny_llm_dir):
    """With EM rounds the ranks step the shared shift together on the mean of their batches' gradients (twice
    the users per step), and each rank draws its own batch order and targets: the IDs after a round may differ
    from one process's, the starting IDs may not, and the likelihood stays the same."""
    single = _infer(root, tiny_llm_dir, "one_em", 1, "--uip_epochs=1")
    assert single.returncode == 0, single.stderr[-3000:]
    done = _infer(root, tiny_llm_dir, "two_em", 2, "--uip_epochs=1")
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = _bank(root, "one_em"), _bank(root, "two_em")
    np.testing.assert_array_equal(two.initial_codes, one.initial_codes)
    nll_one, nll_two = one.metadata["history"][-1]["nll"], two.metadata["history"][-1]["nll"]
    agreement = (two.codes == one.codes).mean(0)
    print(f"after 1 EM round: IDs agree {agreement}, M-step NLL {nll_one:.4f} (1 rank) vs {nll_two:.4f} (2 ranks)")
    assert abs(nll_one - nll_two) < 0.02 * nll_one
    assert np.isfinite(two.offsets).all() and two.codes.shape == one.codes.shape


@pytest.fixture(scope="module")
def uninterrupted(root, tiny_llm_dir):
    """The bank of an uninterrupted 2-rank run with one EM round and a checkpoint every 2 batches."""
    done = _infer(root, tiny_llm_dir, "uninterrupted", 2, "--uip_epochs=1", "--uip_checkpoint_every=2")
    assert done.returncode == 0, done.stderr[-3000:]
    return _bank(root, "uninterrupted")


def _assert_same_bank(a, b) -> None:
    assert a.random_step_codes is not None
    for name in ("codes", "initial_codes", "random_step_codes", "offsets", "summaries"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_a_rank_killed_mid_run_publishes_nothing_stops_the_others_and_the_rerun_resumes(root, tiny_llm_dir,
                                                                                      uninterrupted):
    failed = _infer(root, tiny_llm_dir, "killed", 2, "--uip_epochs=1", "--uip_checkpoint_every=2",
                    fault="m_step_batch:3@1")
    assert failed.returncode != 0
    output = failed.stdout + failed.stderr
    assert "another rank stopped" in output or "stopped by the launcher (SIGTERM)" in output, output[-3000:]
    assert not (root / "killed" / "toy-uip").exists()                   # nothing published
    assert len(list((root / "killed").rglob("*.rank*of2.pt"))) == 2      # one checkpoint per rank
    resumed = _infer(root, tiny_llm_dir, "killed", 2, "--uip_epochs=1", "--uip_checkpoint_every=2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from the checkpoint" in resumed.stdout + resumed.stderr
    _assert_same_bank(_bank(root, "killed"), uninterrupted)
    assert not list((root / "killed").rglob("*.pt"))


def test_ranks_whose_checkpoints_stop_at_different_points_start_afresh(root, tiny_llm_dir, uninterrupted):
    """Rank 1 killed while writing its second M-step checkpoint: rank 0 has written its own, rank 1 keeps the one
    before. Resuming each from its own would mix two points of the run; the rerun must start afresh."""
    failed = _infer(root, tiny_llm_dir, "torn", 2, "--uip_epochs=1", "--uip_checkpoint_every=2",
                    fault="checkpoint_write:3@1")
    assert failed.returncode != 0 and not (root / "torn" / "toy-uip").exists()
    points = set()
    for path in (root / "torn").rglob("*.rank*of2.pt"):
        state = torch.load(path, weights_only=False)["state"]
        points.add((state["phase"], state["epoch"], (state["progress"] or {}).get("done")))
    assert len(points) == 2, points                     # the two ranks stopped at different points
    rerun = _infer(root, tiny_llm_dir, "torn", 2, "--uip_epochs=1", "--uip_checkpoint_every=2")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "stop at different points; starting afresh" in rerun.stdout + rerun.stderr
    _assert_same_bank(_bank(root, "torn"), uninterrupted)


def test_run_under_torchrun_is_refused_with_what_to_launch(monkeypatch, capsys):
    from recbole_uip.__main__ import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["run", "--model=DeepFM", "--dataset=toy"]) == 2
    assert "recbole_uip infer" in capsys.readouterr().err
    assert main(["assign", "--bank=b", "--dataset=toy"]) == 2          # would write one folder from every rank
    assert "assign runs in one process" in capsys.readouterr().err


def test_recbole_multi_process_training_on_cpu_is_refused_before_any_inference(tmp_path, tiny_llm_dir):
    from recbole_uip.config import UIPConfigError
    from recbole_uip.quick_start import run_recbole_uip

    write_dataset(tmp_path / "data")
    with pytest.raises(UIPConfigError, match="NCCL"):
        run_recbole_uip("DeepFM", "toy", config_dict=uip_config_dict(tmp_path, tiny_llm_dir, uip=True, nproc=2))
    assert not (tmp_path / "out").exists()


def test_recbole_multi_process_training_gets_the_profiles_of_one_inference(tmp_path, tiny_llm_dir, monkeypatch):
    """--nproc=N: the profiles are inferred once, in the launching process, and every RecBole worker is started
    on the augmented copy (the workers' NCCL training itself needs N GPUs: benchmarks/device_check.sh)."""
    import torch.multiprocessing as mp
    from recbole.data import create_dataset

    from recbole_uip import quick_start

    write_dataset(tmp_path / "data")
    inferred, spawned = [], []
    real_infer = quick_start.infer_profiles
    monkeypatch.setattr(quick_start, "infer_profiles", lambda *a, **k: inferred.append(1) or real_infer(*a, **k))
    monkeypatch.setattr(quick_start, "training_processes", lambda config: 2)

    def spawn(function, args, nprocs, join):
        model, dataset, files, config_dict, saved, queue = args
        spawned.append((function, nprocs, dataset, config_dict))
        # what a worker builds (once: RecBole joins the NCCL group then), without its local_rank
        config = quick_start._make_config(quick_start.resolve_model_class(model) if isinstance(model, str) else model,
                                          dataset, list(files), config_dict, [])
        data = create_dataset(config)
        assert {"uip_hobby", "uip_background"} <= set(data.field2type)
        queue.put({"test_result": {"auc": 0.5}})

    monkeypatch.setattr(mp, "spawn", spawn)
    result = quick_start.run_recbole_uip("DeepFM", "toy", config_dict=uip_config_dict(tmp_path, tiny_llm_dir, uip=True))
    assert inferred == [1] and len(spawned) == 1
    function, nprocs, dataset, config_dict = spawned[0]
    assert function is quick_start.train_rank and nprocs == 2 and dataset == "toy-uip"
    assert config_dict["world_size"] == 2 and config_dict["nproc"] == 2
    assert result["uip_dataset"] == str(tmp_path / "out" / "toy-uip") and result["test_result"] == {"auc": 0.5}


def test_one_rank_collectives_return_their_input_and_shards_cover_every_row():
    from recbole_uip.inference.distributed import Communicator

    one = Communicator()
    x = torch.arange(6.0)
    assert one.sum(x) is x and one.gather_rows(x, 6) is x and one.broadcast("a") == "a" and one.same_on_all(3)
    assert one.count(5) == 5
    for world in (1, 2, 3, 5):
        rows = np.concatenate([Communicator(r, world).shard(7) for r in range(world)])
        np.testing.assert_array_equal(rows, np.arange(7))
        for index in range(7):                           # every row is found in the block that holds it
            owner, row = Communicator(0, world).locate(index, 7)
            assert Communicator(owner, world).shard(7)[row] == index
    with pytest.raises(ValueError):
        Communicator(2, 2)


def test_sampling_by_inverse_cdf_follows_the_weights_and_never_draws_a_zero_weight():
    from recbole_uip.inference.distributed import Communicator, sample_index

    generator = torch.Generator().manual_seed(0)
    weights = torch.tensor([0.0, 1.0, 3.0, 0.0])
    draws = [sample_index(weights, generator, Communicator())[1] for _ in range(4000)]
    counts = np.bincount(draws, minlength=4) / len(draws)
    assert counts[0] == 0 and counts[3] == 0
    assert abs(counts[2] - 0.75) < 0.03
    assert sample_index(torch.zeros(3), generator, Communicator()) == (-1, -1)


def test_the_ctr_criterion_over_two_ranks_scores_every_users_ids_as_one_process_does(root, tiny_llm_dir):
    """``uip_line_search_criterion: ctr`` sharded over 2 ranks: each rank computes its own users' held-out offsets,
    the E-step gathers every user's IDs, and the held-out AUC without a step (the encoder before round 1's step,
    from the same starting IDs) equals one process's; every tried length is scored and one step is recorded."""
    extra = ("--uip_epochs=1", "--uip_line_search_criterion=ctr", "--uip_ctr_label_threshold=4",
             "--uip_line_search_lengths=[0.01,0.1,1.0]")
    single = _infer(root, tiny_llm_dir, "one_ctr", 1, *extra)
    assert single.returncode == 0, single.stderr[-3000:]
    done = _infer(root, tiny_llm_dir, "two_ctr", 2, *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (_bank(root, out).metadata["history"][-1]["line_search"] for out in ("one_ctr", "two_ctr"))
    for search in (one, two):
        assert {float(length) for length in search["ctr_auc"]} == {float(length) for length in search["tried"]}
        assert float(search["step"]) in {float(length) for length in search["ctr_auc"]}
    no_step = lambda search: {float(k): v for k, v in search["ctr_auc"].items()}[0.0]       # noqa: E731
    assert 0.5 < no_step(two) < 1.0
    assert no_step(two) == pytest.approx(no_step(one), abs=1e-6)
