"""The CTR criterion's held-out score of profile IDs (no LLM): its split, its labels and that it rewards IDs that
group users who agree about items."""

from __future__ import annotations

import itertools
import types

import numpy as np
import pytest

from recbole_uip.inference.ctr_proxy import HELD_OUT_SHARE, HeldOutLabels, _auc, format_ctr_auc


def planted_histories(n_users=60, n_items=40, per_user=30, seed=0):
    """Two taste groups (even and odd users) who rate each other's favourite items low; every item is rated by
    both groups, so an item's popularity alone says little."""
    rng = np.random.default_rng(seed)
    items, ratings = [], []
    for u in range(n_users):
        rows = rng.choice(n_items, size=per_user, replace=False)
        liked = (rows % 2) == (u % 2)
        items.append(rows.astype(np.int64))
        ratings.append(np.where(liked, rng.choice([4.0, 5.0], per_user), rng.choice([1.0, 2.0, 3.0], per_user)))
    return types.SimpleNamespace(items=items, ratings=ratings, item_ids=[str(i) for i in range(n_items)])


def test_the_split_holds_out_a_share_of_every_users_interactions_and_keeps_at_least_one():
    histories = planted_histories()
    histories.items.append(np.array([3], dtype=np.int64))                   # a user with a single interaction
    histories.ratings.append(np.array([5.0]))
    labels = HeldOutLabels.split(histories, 4.0, seed=1)
    assert len(labels.kept) == len(histories.items)
    for u, kept in enumerate(labels.kept):
        assert len(kept) >= 1 and np.all(np.diff(kept) > 0)
        held = np.setdiff1d(np.arange(len(histories.items[u])), kept)
        assert sorted(labels.held_items[labels.held_users == u]) == sorted(histories.items[u][held])
        assert sorted(labels.kept_items[labels.kept_users == u]) == sorted(histories.items[u][kept])
    assert labels.kept_items.size + labels.held_items.size == sum(len(i) for i in histories.items)
    assert abs(labels.held_items.size / labels.kept_items.size - HELD_OUT_SHARE / (1 - HELD_OUT_SHARE)) < 0.1
    all_ratings = np.concatenate(histories.ratings)
    assert np.array_equal(np.sort(np.concatenate([labels.kept_labels, labels.held_labels])),
                          np.sort((all_ratings >= 4.0).astype(float)))               # RecBole's rating >= threshold
    again = HeldOutLabels.split(histories, 4.0, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(again.kept, labels.kept))
    other = HeldOutLabels.split(histories, 4.0, seed=2)
    assert not all(np.array_equal(a, b) for a, b in zip(other.kept, labels.kept))


def test_ids_that_group_users_who_agree_score_above_one_id_and_above_shuffled_ids():
    histories = planted_histories()
    labels = HeldOutLabels.split(histories, 4.0, seed=0)
    users = len(histories.items)
    groups = (np.arange(users) % 2)[:, None]
    one_id = np.zeros((users, 1), dtype=np.int64)
    shuffled = np.random.default_rng(3).permutation(groups[:, 0])[:, None]
    planted, single, random = labels.auc(groups), labels.auc(one_id), labels.auc(shuffled)
    assert planted > 0.8 and planted > single + 0.2 and planted > random + 0.2
    assert single == pytest.approx(labels.auc(one_id + 5))                   # only the grouping counts
    both = np.concatenate([groups, one_id], axis=1)                          # a second, uninformative profile
    assert labels.auc(both) == pytest.approx(planted, abs=0.02)


def test_the_auc_is_the_share_of_positive_negative_pairs_ranked_right_ties_half():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 50).astype(float)
    scores = rng.integers(0, 6, 50).astype(float)                           # many ties
    pairs = [(s_p > s_n) + 0.5 * (s_p == s_n) for (s_p, l_p), (s_n, l_n)
             in itertools.product(zip(scores, labels), repeat=2) if l_p == 1 and l_n == 0]
    assert _auc(labels, scores) == pytest.approx(np.mean(pairs))


def test_a_split_without_ratings_or_with_one_label_is_refused_with_the_fix():
    histories = planted_histories()
    with pytest.raises(ValueError, match="no rating field"):
        HeldOutLabels.split(types.SimpleNamespace(**{**vars(histories), "ratings": None}), 4.0, seed=0)
    with pytest.raises(ValueError, match="uip_ctr_label_threshold"):
        HeldOutLabels.split(histories, 9.0, seed=0)


def test_the_auc_at_the_step_and_without_one_is_formatted_per_search_and_per_profile():
    assert format_ctr_auc(0.01, {0.0: 0.72261, 0.01: 0.73384}) == "0.7338 (no step 0.7226)"
    assert format_ctr_auc(0.0, {"0.0": 0.7, "0.003": 0.69}) == "0.7000 (no step 0.7000)"   # keys read from JSON
    assert format_ctr_auc({"hobby": 0.003, "background": 0.0},
                          {"hobby": {0.0: 0.7, 0.003: 0.71}, "background": {0.0: 0.71}}) == \
        "hobby 0.7100 (no step 0.7000), background 0.7100 (no step 0.7100)"
