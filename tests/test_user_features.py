"""The encoder's input: a user's history as one vector (items, ratings, prior), standardised and whitened."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recbole_uip.inference.user_features import UserFeatureMap


def _data(users=40, items=12, dim=6, seed=0):
    rng = np.random.default_rng(seed)
    embeddings = torch.from_numpy(rng.normal(size=(items, dim)).astype(np.float32))
    histories = [rng.choice(items, size=rng.integers(1, 9), replace=False) for _ in range(users)]
    ratings = [rng.integers(1, 6, size=len(h)).astype(np.float32) for h in histories]
    return embeddings, histories, ratings


def test_raw_user_vector_is_the_documented_sums_over_n_plus_prior():
    embeddings, histories, ratings = _data()
    fm = UserFeatureMap.fit(embeddings, histories, ratings, dims=5, prior=2.0)
    e = (embeddings - torch.from_numpy(fm.item_mean)) / torch.from_numpy(fm.item_std)
    x = fm.raw(embeddings, histories, ratings)
    assert x.shape == (40, 2 * 6 + 3)
    for u in (0, 7, 31):
        items, centred = torch.as_tensor(histories[u]), torch.from_numpy(ratings[u]) - fm.rating_mean
        n = len(items) + 2.0
        expected = torch.cat([e[items].sum(0) / n, (e[items] * centred[:, None]).sum(0) / n,
                              (centred.sum() / n).view(1), ((centred ** 2).sum() / n).sqrt().view(1),
                              torch.tensor([math.log1p(len(items))])])
        torch.testing.assert_close(x[u], expected)
    assert fm.rating_mean == pytest.approx(float(np.concatenate(ratings).mean()))


def test_z_whitens_the_vector_parts_and_keeps_the_single_statistics_as_their_own_directions():
    embeddings, histories, ratings = _data(users=60)
    fm = UserFeatureMap.fit(embeddings, histories, ratings, dims=7, prior=5.0)
    z = fm(embeddings, histories, ratings)
    assert z.shape == (60, 7) and fm.dims == 7 and fm.num_scalars == 3
    covariance = torch.cov(z.T)
    torch.testing.assert_close(covariance.diagonal(), torch.ones(7), atol=1e-4, rtol=1e-4)     # unit variance
    torch.testing.assert_close(covariance[:4, :4], torch.eye(4), atol=1e-4, rtol=1e-4)       # whitened vector parts
    x = fm.raw(embeddings, histories, ratings)
    generosity = (x[:, -3] - x[:, -3].mean()) / x[:, -3].std()
    torch.testing.assert_close(z[:, 4], generosity, atol=1e-5, rtol=1e-5)       # column 4: dims - 3
    assert fm.column_names == ["pc1", "pc2", "pc3", "pc4", "generosity", "spread", "activity"]
    activity = (x[:, -1] - x[:, -1].mean()) / x[:, -1].std()
    torch.testing.assert_close(z[:, fm.column_names.index("activity")], activity, atol=1e-5, rtol=1e-5)
    # without ratings: one statistic (activity), and the vector part gets the rest
    no_ratings = UserFeatureMap.fit(embeddings, histories, None, dims=7, prior=5.0)
    assert no_ratings.num_scalars == 1 and no_ratings(embeddings, histories, None).shape == (60, 7)
    assert no_ratings.column_names == [f"pc{i}" for i in range(1, 7)] + ["activity"]


def test_the_prior_pulls_a_one_item_user_towards_the_average_user():
    embeddings, histories, ratings = _data()
    fm = UserFeatureMap.fit(embeddings, histories, ratings, dims=5, prior=5.0)
    one = fm.raw(embeddings, [np.array([3])], [np.array([5.0], dtype=np.float32)])
    no_prior = UserFeatureMap.fit(embeddings, histories, ratings, dims=5, prior=0.0)
    bare = no_prior.raw(embeddings, [np.array([3])], [np.array([5.0], dtype=np.float32)])
    torch.testing.assert_close(one[0, :6], bare[0, :6] / 6)                       # 1 / (1 + 5)
    empty = fm(embeddings, [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.float32)])
    assert torch.isfinite(empty).all()                                             # no history: the prior alone


def test_arrays_round_trip():
    embeddings, histories, ratings = _data()
    fm = UserFeatureMap.fit(embeddings, histories, ratings, dims=5, prior=5.0)
    again = UserFeatureMap.from_arrays(fm.arrays(), fm.rating_mean, fm.prior)
    torch.testing.assert_close(again(embeddings, histories, ratings), fm(embeddings, histories, ratings))
