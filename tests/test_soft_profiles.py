"""Soft tokens: the shared parts and the encoder (shapes, start), and the free per-user tokens' row optimisers."""

from __future__ import annotations

import pytest
import torch

from recbole_uip.inference.soft_profiles import FreeTokens, SoftProfiles


def _grad(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _step(tokens: FreeTokens, users, grad):
    """One step of ``users`` with the given full-table gradient (only their rows are used)."""
    users = torch.as_tensor(users)
    rows = tokens.rows(users)
    rows.grad = grad[users].clone()
    tokens.step(users, rows)


# ---------------------------------------------------------------------------------------------- FreeTokens
def test_free_tokens_adam_first_update_of_a_late_row_is_a_full_first_step():
    lr = 0.1
    tokens = FreeTokens(torch.zeros(6, 4), "adam", lr)
    for t in range(50):                                       # global time moves on, rows 0 and 1 only
        _step(tokens, [0, 1], _grad((6, 4), t))
    before = tokens.table.clone()
    grad = _grad((6, 4), 99)
    grad[4, 2] = 0.0                                          # one coordinate without gradient
    _step(tokens, [4], grad)
    update = tokens.table[4] - before[4]

    fresh = FreeTokens(torch.zeros(6, 4), "adam", lr)
    _step(fresh, [4], grad)
    torch.testing.assert_close(update, fresh.table[4], rtol=0, atol=1e-7)
    nonzero = grad[4] != 0
    torch.testing.assert_close(update[nonzero].abs(), torch.full((int(nonzero.sum()),), lr), rtol=1e-5, atol=0)
    assert torch.equal(torch.sign(update[nonzero]), -torch.sign(grad[4][nonzero]))
    assert update[2] == 0
    assert tokens.step_count.tolist() == [50, 50, 0, 0, 1, 0]


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_free_tokens_leave_other_rows_and_their_state_alone(optimizer):
    tokens = FreeTokens(torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0)), optimizer, 0.05)
    _step(tokens, [1, 3], _grad((5, 2, 3), 1))
    before = tokens.table.clone()
    state = {k: getattr(tokens, k).clone() for k in ("exp_avg", "exp_avg_sq", "step_count")} if optimizer == "adam" else {}
    _step(tokens, [3, 0], _grad((5, 2, 3), 2))
    for row in (1, 2, 4):
        assert torch.equal(tokens.table[row], before[row])
        for name, value in state.items():
            assert torch.equal(getattr(tokens, name)[row], value[row])
    assert not torch.equal(tokens.table[0], before[0]) and not torch.equal(tokens.table[3], before[3])
    if optimizer == "adam":
        assert tokens.step_count.tolist() == [1, 1, 0, 2, 0]


def test_free_tokens_back_propagate_into_the_batch_rows_only():
    """The loss reaches a (B, P, D) leaf; the (U, P, D) table is no parameter and never holds a gradient."""
    tokens = FreeTokens(torch.zeros(1000, 2, 3), "adam", 0.01)
    users = torch.tensor([7, 500])
    rows = tokens.rows(users)
    (rows ** 2 + rows).sum().backward()
    assert rows.grad.shape == (2, 2, 3)
    assert not tokens.table.requires_grad and tokens.table.grad is None


def test_free_tokens_adam_matches_torch_adam_on_each_rows_own_steps():
    """Row 2's updates at global steps 3 and 7 equal torch Adam's steps 1 and 2 with the same gradients."""
    lr = 0.05
    tokens = FreeTokens(torch.zeros(4, 3), "adam", lr)
    reference = torch.zeros(3, requires_grad=True)
    adam = torch.optim.Adam([reference], lr=lr)
    for t in range(8):
        grad = _grad((4, 3), t)
        _step(tokens, [0, 2] if t in (3, 7) else [0], grad)
        if t in (3, 7):
            reference.grad = grad[2].clone()
            adam.step()
    torch.testing.assert_close(tokens.table[2], reference.detach(), rtol=1e-5, atol=1e-7)


def test_free_tokens_sgd_follows_each_users_own_gradient():
    tokens = FreeTokens(torch.ones(3, 2), "sgd", 0.5)
    rows = tokens.rows(torch.tensor([2]))
    rows.grad = torch.tensor([[0.2, -0.4]]) / 4                # a mean over a batch of 4
    tokens.step(torch.tensor([2]), rows, grad_scale=4)
    torch.testing.assert_close(tokens.table, torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.9, 1.2]]))
    with pytest.raises(ValueError, match="adam or sgd"):
        FreeTokens(torch.zeros(2, 2), "rmsprop", 0.1)


# ------------------------------------------------------------------------------------------ SoftProfiles
def _soft(num_profiles=2, dim=8, dims=5, norm=1.5, seed=0):
    anchors = torch.randn(num_profiles, dim, generator=torch.Generator().manual_seed(seed))
    return SoftProfiles(anchors, dims, norm, torch.Generator().manual_seed(seed)), anchors


def test_soft_profiles_shapes_and_forward_is_center_plus_offsets():
    soft, anchors = _soft()
    assert [p is q for p, q in zip(soft.parameters(), (soft.shared, soft.encoder))] == [True, True]
    assert len(list(soft.parameters())) == 2                 # anchors are a buffer
    assert soft.shared.shape == (2, 8) and soft.encoder.shape == (2, 8, 5)
    with torch.no_grad():
        soft.shared.copy_(torch.randn(2, 8, generator=torch.Generator().manual_seed(1)))
    z = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    offsets = soft.encode(z)
    assert offsets.shape == (3, 2, 8)
    for b in range(3):
        for p in range(2):
            torch.testing.assert_close(offsets[b, p], soft.encoder[p] @ z[b])
    torch.testing.assert_close(soft.center(), anchors + soft.shared)
    torch.testing.assert_close(soft(offsets), soft.center()[None] + offsets)


def test_soft_profiles_without_encoder_have_no_user_part():
    soft, _ = _soft(dims=0)
    assert soft.encoder is None and len(list(soft.parameters())) == 1
    assert torch.equal(soft.encode(torch.zeros(4, 3)), torch.zeros(4, 2, 8))


@pytest.mark.parametrize("dim,dims", [(16, 6), (6, 16)])
def test_soft_profiles_initial_offsets_have_the_requested_norm(dim, dims):
    soft, _ = _soft(dim=dim, dims=dims, norm=2.0)
    z = torch.randn(3000, dims, generator=torch.Generator().manual_seed(5))
    assert float(soft.encode(z).detach().norm(dim=-1).mean()) == pytest.approx(2.0, rel=0.1)
    again, _ = _soft(dim=dim, dims=dims, norm=2.0)
    assert torch.equal(soft.encoder, again.encoder)          # seeded
