"""The quantiser: k-means codebooks with dead-code restart, the commitment loss, the whitened metric, perplexity."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from recbole_uip.inference.codebook import ProfileCodebook, perplexity

CENTERS = torch.tensor([[0.0, 0.0, 0.0, 0.0], [10.0, 0.0, 0.0, 0.0], [0.0, 0.0, 10.0, 10.0]])


def clusters(n_per: int = 20, seed: int = 0, noise: float = 0.3):
    """Three well-separated Gaussian blobs, interleaved; returns ``(x, truth)``."""
    gen = torch.Generator().manual_seed(seed)
    truth = torch.arange(len(CENTERS)).repeat(n_per)
    x = CENTERS[truth] + noise * torch.randn(len(truth), CENTERS.shape[1], generator=gen)
    perm = torch.randperm(len(truth), generator=gen)
    return x[perm], truth[perm]


def matches_up_to_permutation(assignment: torch.Tensor, truth: torch.Tensor, k: int) -> bool:
    return any(torch.equal(torch.tensor(perm)[truth], assignment) for perm in itertools.permutations(range(k)))


# ------------------------------------------------------------------------------------------- codebooks
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_recovers_well_separated_clusters(seed):
    x, truth = clusters(seed=seed)
    codebook = ProfileCodebook(3, 4)
    assert not bool(codebook.initialised)
    assignment, health = codebook.fit(x, iterations=10, generator=torch.Generator().manual_seed(seed))
    assert bool(codebook.initialised)
    assert assignment.shape == (60,) and assignment.dtype == torch.long
    assert matches_up_to_permutation(assignment, truth, 3)
    assert sorted(health.usage) == [20, 20, 20]
    assert health.perplexity == pytest.approx(3.0, abs=1e-5)
    # each code is the mean of its cluster
    for code in range(3):
        torch.testing.assert_close(codebook.codes[code], x[assignment == code].mean(0))
    # and lies at the true center
    distance = torch.cdist(codebook.codes, CENTERS).min(dim=1).values
    assert (distance < 0.3).all()


def test_kmeans_plus_plus_seeds_are_data_points_and_deterministic():
    x, _ = clusters(seed=4)
    a, b = ProfileCodebook(3, 4), ProfileCodebook(3, 4)
    a.kmeans_plus_plus(x, torch.Generator().manual_seed(5))
    b.kmeans_plus_plus(x, torch.Generator().manual_seed(5))
    assert torch.equal(a.codes, b.codes)
    for code in a.codes:
        assert (x == code).all(dim=1).any()
    # far-apart seeding: one seed per cluster
    nearest = torch.cdist(a.codes, CENTERS).argmin(dim=1)
    assert sorted(nearest.tolist()) == [0, 1, 2]


def test_assign_returns_the_nearest_code():
    gen = torch.Generator().manual_seed(0)
    codebook = ProfileCodebook(5, 3)
    codebook.codes.copy_(torch.randn(5, 3, generator=gen) * 3)
    x = torch.randn(200, 3, generator=gen) * 3
    brute = ((x[:, None, :] - codebook.codes[None]) ** 2).sum(-1).argmin(dim=1)
    assert torch.equal(codebook.assign(x), brute)
    # a point exactly on a code is assigned that code
    assert codebook.assign(codebook.codes.clone()).tolist() == [0, 1, 2, 3, 4]
    # ties go to the lowest index
    tied = ProfileCodebook(3, 2)
    tied.codes.copy_(torch.tensor([[5.0, 5.0], [0.0, 0.0], [0.0, 0.0]]))
    assert tied.assign(torch.tensor([[0.1, 0.0]])).tolist() == [1]


def test_dead_code_is_restarted_and_reported():
    x, truth = clusters(seed=3)
    codebook = ProfileCodebook(3, 4)
    # two codes on two of the clusters, the third far from every point: nobody picks it
    codebook.codes.copy_(torch.stack([CENTERS[0], CENTERS[1], torch.full((4,), 1000.0)]))
    codebook.initialised.fill_(True)
    counts = torch.bincount(codebook.assign(x), minlength=3)
    assert counts[2] == 0                                   # really dead before fit
    assignment, health = codebook.fit(x, iterations=10, generator=torch.Generator().manual_seed(0))
    assert health.dead_codes == 1
    assert health.restarted >= 1
    assert all(u > 0 for u in health.usage)
    assert torch.bincount(assignment, minlength=3).tolist() == health.usage
    assert (codebook.codes.abs() < 100).all()               # the far code moved onto the data
    assert matches_up_to_permutation(assignment, truth, 3)  # and ended on the third cluster


def test_no_restart_when_every_code_is_used():
    x, _ = clusters(seed=6)
    codebook = ProfileCodebook(3, 4)
    codebook.codes.copy_(CENTERS)
    codebook.initialised.fill_(True)
    _, health = codebook.fit(x, iterations=3, generator=torch.Generator().manual_seed(0))
    assert health.dead_codes == 0 and health.restarted == 0


def test_commitment_is_mean_squared_distance_over_scale_and_codes_get_no_gradient():
    gen = torch.Generator().manual_seed(0)
    codebook = ProfileCodebook(3, 4)
    codebook.codes.copy_(torch.randn(3, 4, generator=gen))
    codebook.codes.requires_grad_(True)   # so that a missing stop-gradient would show up as codes.grad
    x = torch.randn(5, 4, generator=gen, requires_grad=True)
    assignment = torch.tensor([0, 2, 2, 1, 0])
    scale = 2.5
    loss = codebook.commitment(x, assignment, scale)
    assert loss.dim() == 0
    c, xd = codebook.codes.detach(), x.detach()
    expected = sum(float(((xd[b] - c[assignment[b]]) ** 2).sum()) for b in range(5)) / 5 / scale
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * (x.detach() - c[assignment]) / (5 * scale))
    assert codebook.codes.grad is None


# ------------------------------------------------------------------------------------ whitened metric
def noise_and_two_clusters(n: int = 200, seed: int = 0):
    """``(x (n, 3), truth (n,))``: column 0 is wide structureless noise (std 10), column 1 holds two clusters at
    +-1 (std 0.1), column 2 is small noise. Plain k-means with 2 codes cuts the wide column; the clusters live in
    a direction of small variance."""
    gen = torch.Generator().manual_seed(seed)
    truth = torch.arange(n) % 2
    x = torch.stack([10 * torch.randn(n, generator=gen), (2.0 * truth - 1) + 0.1 * torch.randn(n, generator=gen),
                     0.3 * torch.randn(n, generator=gen)], dim=1)
    return x, truth


def test_whitening_finds_clusters_that_plain_distances_miss():
    x, truth = noise_and_two_clusters()
    plain, whitened = ProfileCodebook(2, 3), ProfileCodebook(2, 3, metric="whitened", components=2)
    plain_ids, _ = plain.fit(x, iterations=20, generator=torch.Generator().manual_seed(0))
    white_ids, health = whitened.fit(x, iterations=20, generator=torch.Generator().manual_seed(0))
    assert matches_up_to_permutation(white_ids, truth, 2)
    assert not matches_up_to_permutation(plain_ids, truth, 2)
    assert plain.projection is None and whitened.projection.shape == (3, 2)
    # the two top directions (noise column, cluster column) hold almost all the variance
    assert 0.99 < health.projection_share < 1.0
    # codes stay in the embedding space: the mean offset of their users
    for code in range(2):
        torch.testing.assert_close(whitened.codes[code], x[white_ids == code].mean(0))


def test_whitening_projection_gives_unit_covariance_and_is_capped_by_the_data():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(50, 6, generator=gen) @ torch.randn(6, 6, generator=gen) + 5.0
    codebook = ProfileCodebook(3, 6, metric="whitened", components=4)
    codebook.fit_whitening(x)
    share = codebook.projection_share
    y = (x - x.mean(0)) @ codebook.projection
    torch.testing.assert_close(torch.cov(y.T), torch.eye(4), atol=1e-4, rtol=1e-4)
    assert 0 < share < 1
    few = ProfileCodebook(2, 6, metric="whitened", components=16)
    few.fit_whitening(x[:5])                       # 5 rows: at most 4 directions with variance
    assert few.projection.shape == (6, 4)
    with pytest.raises(ValueError, match="components"):
        ProfileCodebook(2, 6, metric="whitened", components=-1)
    with pytest.raises(ValueError, match="metric"):
        ProfileCodebook(2, 6, metric="fisher")


def test_whitened_commitment_measures_the_projected_distance():
    gen = torch.Generator().manual_seed(1)
    x, _ = noise_and_two_clusters()
    codebook = ProfileCodebook(2, 3, metric="whitened", components=1)   # the wide noise column only
    assignment, _ = codebook.fit(x, iterations=5, generator=gen)
    a = codebook.projection
    batch = x[:6].clone().requires_grad_(True)
    loss = codebook.commitment(batch, assignment[:6], scale=2.0)
    expected = (((x[:6] - codebook.codes[assignment[:6]]) @ a) ** 2).sum(1).mean() / 2.0
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    loss.backward()
    # no pull along directions the projection ignores: the gradient lies in the span of A's column
    residual = batch.grad - (batch.grad @ a) @ a.T / float(a.T @ a)
    assert float(residual.abs().max()) < 1e-6
    assert codebook.scale(x) == pytest.approx(float(((x @ a) ** 2).sum(1).mean()), rel=1e-5)


def test_a_stored_projection_requantises_like_the_quantiser_that_stored_it():
    """use_projection: a plain codebook given a whitened codebook's final projection keeps it through fit() and
    finds the same clusters from the same start (what fold-in and benchmarks/partitions.py rely on); a wrong
    shape is refused."""
    x, truth = noise_and_two_clusters()
    whitened = ProfileCodebook(2, 3, metric="whitened", components=2)
    white_ids, _ = whitened.fit(x, iterations=20, generator=torch.Generator().manual_seed(0))
    fixed = ProfileCodebook(2, 3)
    fixed.use_projection(whitened.projection.clone())
    ids, health = fixed.fit(x, iterations=20, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ids, white_ids) and matches_up_to_permutation(ids, truth, 2)
    assert fixed.assign(x).tolist() == whitened.assign(x).tolist()
    torch.testing.assert_close(fixed.projection, whitened.projection)      # not refitted
    assert health.projection_share is None
    with pytest.raises(ValueError, match=r"\(D, k\)"):
        fixed.use_projection(torch.zeros(4, 2))


def test_perplexity():
    assert perplexity(torch.tensor([4, 4, 4, 4, 4])) == pytest.approx(5.0)
    assert perplexity(torch.tensor([0, 9, 0, 0])) == pytest.approx(1.0)
    assert perplexity(torch.tensor([3, 0, 3, 0])) == pytest.approx(2.0)
    p = torch.tensor([0.75, 0.25])
    assert perplexity(torch.tensor([3, 1])) == pytest.approx(math.exp(float(-(p * p.log()).sum())))
