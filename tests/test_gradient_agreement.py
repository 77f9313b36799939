"""The split-half agreement of the encoder's gradient: the statistic on planted signal and noise, and the trainer's
bookkeeping of the two halves on the tiny model."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from recbole_uip.inference.gradient_agreement import paired_gain_z, signal_share, split_half_agreement
from test_trainer import make_trainer

NAMES = ["hobby", "background"]


def halves(signal_norm: float, noise_norm: float, seed: int = 0, shape=(2, 256, 8)):
    """Two halves ``S/2 + N_i`` of a gradient whose signal ``S`` has squared norm ``signal_norm**2`` and whose whole
    noise ``N_1 + N_2`` has squared norm about ``noise_norm**2`` (per profile)."""
    generator = torch.Generator().manual_seed(seed)
    signal = torch.randn(shape, generator=generator, dtype=torch.float64)
    signal *= signal_norm / signal[0].norm()
    scale = noise_norm / np.sqrt(2 * np.prod(shape[1:]))
    return tuple(signal / 2 + scale * torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(2))


@pytest.mark.parametrize("signal_norm, noise_norm", [(1.0, 0.5), (1.0, 1.0), (1.0, 2.0)])
def test_the_signal_share_recovers_the_planted_share_of_signal(signal_norm, noise_norm):
    planted = signal_norm**2 / (signal_norm**2 + noise_norm**2)
    first, second = halves(signal_norm, noise_norm)
    agreement = split_half_agreement(first, second, NAMES)["hobby"]
    assert agreement["cosine"] == pytest.approx(signal_norm**2 / (signal_norm**2 + 2 * noise_norm**2), abs=0.05)
    assert agreement["signal_share"] == pytest.approx(planted, abs=0.05)
    assert len(agreement["columns"]) == 8


def test_identical_halves_agree_fully_and_independent_noise_not_at_all():
    first, _ = halves(1.0, 1.0)
    same = split_half_agreement(first, first.clone(), NAMES)
    assert same["hobby"]["cosine"] == pytest.approx(1.0) and same["hobby"]["signal_share"] == pytest.approx(1.0)
    assert all(c == pytest.approx(1.0) for c in same["background"]["columns"])
    noise_only = split_half_agreement(*halves(0.0, 1.0, seed=1, shape=(2, 4096, 8)), NAMES)
    assert abs(noise_only["background"]["cosine"]) < 0.05
    assert signal_share(-0.3) == 0.0 and signal_share(None) is None


def test_a_zero_half_has_no_cosine_and_a_wrong_shape_is_refused():
    first, _ = halves(1.0, 1.0)
    agreement = split_half_agreement(first, torch.zeros_like(first), NAMES)
    assert agreement["hobby"]["cosine"] is None and agreement["hobby"]["signal_share"] is None
    with pytest.raises(ValueError, match=r"\(P, D, k\)"):
        split_half_agreement(first, first[:1], NAMES)


def test_the_gain_z_is_the_paired_t_statistic_and_its_edge_cases_are_defined():
    from scipy import stats

    rng = np.random.default_rng(0)
    before = rng.normal(2.0, 0.3, 64)
    after = before - 0.01 + rng.normal(0, 0.05, 64)
    assert paired_gain_z(before, after) == pytest.approx(stats.ttest_rel(before, after).statistic)
    assert paired_gain_z(before, after) > 0 and paired_gain_z(after, before) == pytest.approx(-paired_gain_z(before, after))
    exact = np.array([2.0, 3.0, 4.0])
    assert paired_gain_z(exact, exact - 0.5) == np.inf             # every user gains the same: certain
    assert paired_gain_z(exact, exact + 0.5) == -np.inf
    assert paired_gain_z(before, before) == 0.0
    assert paired_gain_z(before[:1], after[:1]) is None            # one user has no standard error


def test_the_trainer_splits_the_pass_gradient_into_its_odd_and_even_batches(tmp_path, tiny_llm_dir):
    """The odd half is exactly what the odd batches added, the even half the rest, and the line search reports their
    agreement (13 training users in batches of 4: batches 0-3, the odd ones 1 and 3)."""
    trainer = make_trainer(tmp_path, tiny_llm_dir, n_users=16, uip_line_search_users=3)
    trainer.setup()
    trainer.assignments, _, scales = trainer.e_step(3)
    added, train_batch = [], trainer.train_batch

    def recording_train_batch(*args, **kwargs):
        before = trainer.soft.encoder.grad
        before = torch.zeros_like(trainer.soft.encoder) if before is None else before.detach().clone()
        nll = train_batch(*args, **kwargs)
        added.append(trainer.soft.encoder.grad.detach() - before)
        return nll

    trainer.train_batch = recording_train_batch
    trainer.m_step(1, scales, trainer.shared_optimizer())
    assert len(added) == 4
    odd = trainer._loop["odd_batches_gradient"]
    torch.testing.assert_close(odd, added[1] + added[3])
    torch.testing.assert_close(trainer.soft.encoder.grad - odd, added[0] + added[2])
    expected = split_half_agreement(added[0] + added[2], added[1] + added[3], trainer.settings.profile_names)

    search = trainer.line_search(scales)
    assert "odd_batches_gradient" not in trainer._loop               # a new pass starts its halves afresh
    for name, agreement in search["gradient_agreement"].items():
        assert agreement["cosine"] == pytest.approx(expected[name]["cosine"], abs=1e-5)
        assert -1 <= agreement["cosine"] <= 1
        assert len(agreement["columns"]) == trainer.soft.encoder.shape[2]


def test_every_round_records_the_agreement_and_the_profile_report_shows_it(tmp_path, tiny_llm_dir):
    from recbole_uip.report import encoder_steps, render_profile_report

    trainer = make_trainer(tmp_path, tiny_llm_dir, n_users=16, uip_epochs=2, uip_line_search_users=4)
    result = trainer.fit()
    steps = encoder_steps(result.history)
    assert [s["round"] for s in steps] == [1, 2]
    for entry, record in zip(steps, result.history[1:]):
        assert entry["step"] == record["line_search"]["step"]
        assert set(entry["agreement"]) == set(trainer.settings.profile_names)
        for agreement in entry["agreement"].values():
            assert -1 <= agreement["cosine"] <= 1 and 0 <= agreement["signal_share"] <= 1
    report = {"dataset": "toy", "users": 16, "llm": "tiny", "profiles": trainer.settings.profile_names,
              "codebook_sizes": {}, "fingerprint": "0" * 12, "usage": {}, "typical": {}, "encoder_steps": steps}
    text = render_profile_report(report)
    assert "## The encoder's steps" in text
    cell = r"-?[01]\.\d{3} \(\d\.\d\d\)"
    assert re.search(rf"\| 2 \| [0-9.]+ \| \+[0-9.]+ \| (\(?-?[0-9.]+\)?|\(?-?inf\)?|-) \| [0-9.e+-]+ \| {cell} \| {cell} \|", text)
    for entry, record in zip(steps, result.history[1:]):          # the z of the step taken, or of the refused best
        search = record["line_search"]
        if search["step"] > 0:
            assert entry["z"] == f"{search['gain_z'][search['step']]:.2f}"
        else:
            assert entry["z"] == ("-" if search["best_z"] is None else f"({search['best_z']:.2f})")
    assert all(s["best_gain"] is not None and s["best_gain"] >= 0 for s in steps)
