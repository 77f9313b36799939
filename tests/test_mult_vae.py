"""The Mult-VAE of the count reference (``recbole_uip.mult_vae``): it learns planted groups, deterministically."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import sparse

from recbole_uip import mult_vae


def planted_matrix(users: int = 40, items: int = 60, per_user: int = 10, seed: int = 0) -> sparse.csr_matrix:
    """Even users draw from the first half of the items, odd users from the second."""
    rng = np.random.default_rng(seed)
    half = items // 2
    rows, cols = [], []
    for u in range(users):
        rows += [u] * per_user
        cols += list(rng.choice(half, per_user, replace=False) + (half if u % 2 else 0))
    return sparse.csr_matrix((np.ones(len(cols)), (rows, cols)), shape=(users, items))


def own_half_mass(logits: np.ndarray, matrix: sparse.csr_matrix) -> np.ndarray:
    """``(U,)``: the softmax mass each user's logits put on the unseen items of their own half."""
    half = matrix.shape[1] // 2
    seen = matrix.toarray() > 0
    logits = np.where(seen, -np.inf, logits.astype(float))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    own = np.zeros_like(seen)
    own[0::2, :half] = True
    own[1::2, half:] = True
    return (probs * own).sum(1)


def test_it_learns_which_half_of_the_items_a_user_draws_from():
    matrix = planted_matrix()
    trained = mult_vae.item_logits(mult_vae.fit_mult_vae(matrix, epochs=30), matrix)
    untrained = mult_vae.item_logits(mult_vae.fit_mult_vae(matrix, epochs=0), matrix)
    assert trained.shape == matrix.shape and trained.dtype == np.float32
    assert own_half_mass(trained, matrix).min() > 0.9
    assert abs(own_half_mass(untrained, matrix).mean() - 20 / 50) < 0.1   # about uniform: 20 of 50 unseen are own


def test_a_seed_gives_the_same_model_and_leaves_the_global_random_state_alone():
    matrix = planted_matrix()
    torch.manual_seed(123)
    first = mult_vae.item_logits(mult_vae.fit_mult_vae(matrix, epochs=3, seed=7), matrix)
    after_fit = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after_fit)
    again = mult_vae.item_logits(mult_vae.fit_mult_vae(matrix, epochs=3, seed=7), matrix)
    other = mult_vae.item_logits(mult_vae.fit_mult_vae(matrix, epochs=3, seed=8), matrix)
    assert np.array_equal(first, again) and not np.allclose(first, other)


def test_logits_in_batches_equal_logits_at_once():
    matrix = planted_matrix()
    model = mult_vae.fit_mult_vae(matrix, epochs=2)
    assert mult_vae.item_logits(model, matrix, batch_users=7) == pytest.approx(
        mult_vae.item_logits(model, matrix), abs=1e-5)
