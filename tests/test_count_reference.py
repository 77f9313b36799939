"""The collaborative models' reference for the generalisation goal (``recbole_uip.count_reference``): no LLM."""

from __future__ import annotations

import numpy as np
import pytest

from recbole_uip import count_reference as cr


def planted_data(seed: int = 0, users: int = 40, items: int = 60, per_user: int = 12, held: int = 3,
                 chained: bool = False) -> cr.HeldOutData:
    """Two groups of users, each drawing from its own half of the items; crossing them, high raters (mostly 5) and
    low raters (mostly 1). With ``chained``, each user walks through their half in item order from a random start
    instead (item ``i`` is followed by ``i + 1``). Items ``2k`` and ``2k + 1`` share a text. The newest ``held``
    items of each user are held out."""
    rng = np.random.default_rng(seed)
    half = items // 2
    remaining, remaining_r, held_items, held_r = [], [], [], []
    for u in range(users):
        pool = np.arange(half) + (half if u % 2 else 0)
        if chained:
            start = rng.integers(half)
            sequence = pool[(start + np.arange(per_user)) % half]
        else:
            sequence = rng.permutation(pool)[:per_user]
        likely, unlikely = (5.0, 2.0) if (u // 2) % 2 else (1.0, 4.0)
        ratings = np.where(rng.random(per_user) < 0.8, likely, unlikely)
        remaining.append(sequence[:-held])
        remaining_r.append(ratings[:-held])
        held_items.append(sequence[-held:])
        held_r.append(ratings[-held:])
    return cr.HeldOutData(item_text=np.arange(items) // 2, remaining=remaining, remaining_ratings=remaining_r,
                          held=held_items, held_ratings=held_r)


def test_mixture_weights_recover_the_mixture_and_never_lower_the_likelihood():
    rng = np.random.default_rng(0)
    probs = rng.random((4000, 3)) + 0.05
    probs /= probs.sum(0)                                  # three distributions over 4000 outcomes
    draws = rng.choice(4000, size=20000, p=probs @ np.array([0.6, 0.3, 0.1]))
    weights = cr.mixture_weights(probs[draws])
    assert weights.sum() == pytest.approx(1.0) and (weights >= 0).all()
    assert weights == pytest.approx([0.6, 0.3, 0.1], abs=0.05)
    uniform = np.log(probs[draws] @ np.full(3, 1 / 3)).sum()
    assert np.log(probs[draws] @ weights).sum() >= uniform
    assert cr.mixture_weights(np.zeros((0, 4))) == pytest.approx(np.full(4, 0.25))


def test_the_models_are_nested_and_unknown_ones_refused():
    previous = (set(), set())
    for model in cr.MODELS:
        text, rating = cr.model_components(model)
        assert set(text) <= set(cr.TEXT_COMPONENTS) and set(rating) <= set(cr.RATING_COMPONENTS)
        assert previous[0] <= set(text) and previous[1] <= set(rating)
        previous = (set(text), set(rating))
    assert cr.model_components("population") == (("pop",), ("global", "text", "text_mean"))
    assert cr.model_components("sequence") == (cr.TEXT_COMPONENTS, cr.RATING_COMPONENTS)
    with pytest.raises(ValueError, match="model must be one of"):
        cr.model_components("everything")


def test_every_component_is_a_distribution_over_texts_and_ratings():
    """Summed over every text (every rating value), each component gives 1, for any user: the held-out items are
    set to each text (value) in turn."""
    data = planted_data()
    everything = cr.HeldOutData(item_text=data.item_text, remaining=data.remaining,
                                remaining_ratings=data.remaining_ratings,
                                held=[np.arange(0, len(data.item_text), 2)] * len(data.held),   # one item per text
                                held_ratings=[np.full(len(data.item_text) // 2, 1.0)] * len(data.held))
    for probs in cr.text_component_probs(everything)[:4]:
        assert probs.sum(0) == pytest.approx(np.ones(len(cr.TEXT_COMPONENTS)))
    values = np.unique(np.concatenate(data.remaining_ratings))
    totals = 0
    for value in values:
        rated = cr.HeldOutData(item_text=data.item_text, remaining=data.remaining,
                               remaining_ratings=data.remaining_ratings, held=[np.array([3])] * len(data.held),
                               held_ratings=[np.array([value])] * len(data.held))
        totals = totals + np.stack([p[0] for p in cr.rating_component_probs(rated)])
    assert totals == pytest.approx(np.ones_like(totals))


def test_a_user_model_gains_on_planted_tastes_and_the_population_gains_nothing():
    reference = cr.count_reference(planted_data())
    text, rating = reference.gain("set")
    assert (text > 0).mean() > 0.9 and text.mean() > 1.0          # which half: up to log 2 per item, 3 items
    assert rating.mean() > 0.5                                     # each user rates their own way
    zero_text, zero_rating = reference.gain("population")
    assert (zero_text == 0).all() and (zero_rating == 0).all()


def test_the_sequence_model_reads_what_follows_the_last_items():
    """Where each item is followed by the next one, the items that followed the user's last item in other
    histories predict the held-out items far better than the history as a set."""
    reference = cr.count_reference(planted_data(chained=True))
    text_set, _ = reference.gain("set")
    text_sequence, _ = reference.gain("sequence")
    assert text_sequence.mean() > text_set.mean() + 2.0
    assert cr.transition_counts([np.array([0, 1, 2])], 3).toarray() == pytest.approx(
        np.array([[0, 1, 0.5], [0, 0, 1], [0, 0, 0]]))


def test_a_users_held_out_items_shape_neither_their_own_model_nor_anyone_elses():
    """No leakage: the held-out items enter no count, and each user's mixture weights come from the other fold.
    Changing one user's held-out items and ratings changes no other user's component probabilities, and not the
    weights applied to that user's fold."""
    data = planted_data()
    changed_user = 4                                               # fold 0
    changed = cr.HeldOutData(item_text=data.item_text, remaining=data.remaining,
                             remaining_ratings=data.remaining_ratings,
                             held=[h if u != changed_user else (h + 1) % len(data.item_text) for u, h in enumerate(data.held)],
                             held_ratings=[r if u != changed_user else 6.0 - r for u, r in enumerate(data.held_ratings)])
    for fn in (cr.text_component_probs, cr.rating_component_probs):
        before, after = fn(data), fn(changed)
        for u in range(len(data.held)):
            if u != changed_user:
                assert before[u] == pytest.approx(after[u])
    a, b = cr.count_reference(data), cr.count_reference(changed)
    for part in ("text_weights", "rating_weights"):
        for model in cr.MODELS:
            assert getattr(a, part)[model][0] == pytest.approx(getattr(b, part)[model][0])   # fold 0: fitted on fold 1


def test_ease_weights_and_their_size_limit(monkeypatch):
    from scipy import sparse

    matrix = sparse.csr_matrix(np.array([[1, 1, 0], [1, 1, 0], [0, 1, 1]], dtype=float))
    weights = cr.ease_weights(matrix, regularisation=1.0)
    assert np.diag(weights) == pytest.approx(np.zeros(3))
    assert weights[0, 1] > weights[2, 0]                         # items 0 and 1 co-occur, 0 and 2 never
    monkeypatch.setattr(cr, "EASE_MAX_ITEMS", 2)
    assert cr.ease_weights(matrix) is None
    probs = cr.text_component_probs(planted_data())               # above the limit: the EASE columns are pop_unseen
    unseen = cr.TEXT_COMPONENTS.index("pop_unseen")
    for name in cr.TEXT_COMPONENTS:
        if name.startswith("ease"):
            assert probs[0][:, cr.TEXT_COMPONENTS.index(name)] == pytest.approx(probs[0][:, unseen])


def test_no_ratings_scores_the_texts_alone():
    data = planted_data()
    bare = cr.HeldOutData(item_text=data.item_text, remaining=data.remaining, remaining_ratings=None,
                          held=data.held, held_ratings=None)
    reference = cr.count_reference(bare)
    assert reference.rating_nll == {} and (reference.gain("recent")[1] == 0).all()
    with pytest.raises(ValueError, match="no ratings"):
        cr.rating_component_probs(bare)


def test_held_out_data_splits_each_history_at_its_positions_and_shares_text_ids():
    from types import SimpleNamespace

    histories = SimpleNamespace(item_texts=["b", "a", "b", "c"],
                                items=[np.array([0, 1, 2, 3]), np.array([3, 1])],
                                ratings=[np.array([1.0, 2.0, 3.0, 4.0]), np.array([5.0, 1.0])],
                                times=[np.array([10.0, 20.0, 25.0, 5000.0]), np.array([1.0, 2.0])])
    data = cr.held_out_data(histories, [np.array([2, 3]), np.zeros(0, dtype=np.int64)])
    assert [g.tolist() for g in data.held_gaps] == [[5.0, 4980.0], []]   # after the newest remaining item (20)
    assert data.item_text.tolist() == [1, 0, 1, 2]                   # "b" twice: one text id
    assert [r.tolist() for r in data.remaining] == [[0, 1], [3, 1]]
    assert [h.tolist() for h in data.held] == [[2, 3], []]
    assert data.held_ratings[0].tolist() == [3.0, 4.0] and data.remaining_ratings[1].tolist() == [5.0, 1.0]
    text = SimpleNamespace(user_pieces=[np.array([0, 1, 2, 3]), np.array([4, 5])],
                           piece_lengths=np.array([5, 6, 7, 8, 9, 10]),
                           rating_flags=[np.array([False, True])] * 6)
    tokens, rating = cr.held_out_token_counts(text, [np.array([2, 3]), np.zeros(0, dtype=np.int64)])
    assert tokens.tolist() == [15.0, 0.0] and rating.tolist() == [2.0, 0.0]
    reference = cr.count_reference(data)
    gains = cr.gains_per_token(reference, tokens)
    assert np.isfinite(gains["set"][0]) and np.isnan(gains["set"][1])   # no held-out tokens: no gain per token


def test_gains_by_gap_splits_the_items_by_when_they_were_rated():
    """Each model's per-item gain over the population, for the items rated within the gap of the user's newest
    remaining item and for the later ones; their item-weighted mean is the overall per-item gain."""
    data = planted_data(chained=True)
    gaps = [np.where(np.arange(len(h)) == 0, 60.0, 7200.0) for h in data.held]       # the first held-out item: soon
    timed = cr.HeldOutData(**{**data.__dict__, "held_gaps": gaps})
    reference = cr.count_reference(timed)
    assert cr.gains_by_gap(reference, data) is None                                   # no timestamps
    by_gap = cr.gains_by_gap(reference, timed)
    total_items = sum(len(h) for h in data.held)
    for model in ("set", "recent", "sequence"):
        within, after = by_gap[model]["within"], by_gap[model]["after"]
        assert within["items"] == len(data.held) and within["items"] + after["items"] == total_items
        text, rating = reference.gain(model)
        overall = (text.sum() + rating.sum()) / total_items
        mixed = (within["gain_per_item"] * within["items"] + after["gain_per_item"] * after["items"]) / total_items
        assert mixed == pytest.approx(overall)
    assert by_gap["sequence"]["within"]["gain_per_item"] > by_gap["set"]["within"]["gain_per_item"]


def test_a_user_who_has_seen_every_item_still_gets_finite_probabilities():
    """Where a user's remaining history holds every item (a held-out item is then a repeat), the components that
    leave the user's items out fall back to popularity or uniform instead of dividing by zero."""
    items = 6
    data = cr.HeldOutData(item_text=np.arange(items), remaining=[np.arange(items), np.array([0, 1, 2])],
                          remaining_ratings=[np.full(items, 4.0), np.array([1.0, 2.0, 3.0])],
                          held=[np.array([2]), np.array([4])], held_ratings=[np.array([5.0]), np.array([2.0])])
    for probs in cr.text_component_probs(data):
        columns = [cr.TEXT_COMPONENTS.index(c) for c in cr.TEXT_COMPONENTS if not c.startswith(("own", "neigh"))]
        assert np.isfinite(probs).all() and (probs[:, columns] > 0).all()
    reference = cr.count_reference(data)
    assert all(np.isfinite(v).all() for v in reference.text_nll.values())


def test_the_mult_vae_components_and_their_size_limit(monkeypatch):
    """On planted tastes the Mult-VAE (as trained, ``t1``) gives each user's held-out items, drawn from their half
    of the items, well over what popularity over the unseen items gives them; above the size limit its components
    are that popularity."""
    data = planted_data()
    probs = cr.text_component_probs(data)
    trained, unseen = cr.TEXT_COMPONENTS.index("mult_vae_t1"), cr.TEXT_COMPONENTS.index("pop_unseen")
    assert np.mean([p[:, trained].mean() / p[:, unseen].mean() for p in probs]) > 1.5
    monkeypatch.setattr(cr, "MULT_VAE_MAX_CELLS", 1)
    for p in cr.text_component_probs(data):
        for name in cr.TEXT_COMPONENTS:
            if name.startswith("mult_vae"):
                assert p[:, cr.TEXT_COMPONENTS.index(name)] == pytest.approx(p[:, unseen])


def test_a_group_model_finds_a_planted_group_and_a_users_held_out_items_shape_no_other_users_score():
    """Users 0..31 make the groups' models, 32..39 are scored. Grouped by the half of the items they draw from, a
    user's own group predicts their held-out texts better than the population and the other group; grouped by how
    they rate, their ratings. A scored user's held-out items change no score of another user but through the
    mixture's weights, which their own fold does not use."""
    data = planted_data(users=40)
    scored = np.arange(32, 40)
    for grouping, part in ((lambda u: u % 2, "text"), (lambda u: (u // 2) % 2, "rating")):
        member = np.array([grouping(u) if u < 32 else -1 for u in range(40)])
        ref = cr.group_reference(data, member, scored, np.array([grouping(u) for u in scored]), 2)
        nll = ref.text_nll if part == "text" else ref.rating_nll
        population = ref.population_text_nll if part == "text" else ref.population_rating_nll
        own = nll[[grouping(u) for u in scored], np.arange(len(scored))]
        other = nll[[1 - grouping(u) for u in scored], np.arange(len(scored))]
        assert (own < population).all() and (own < other).all(), part
        assert ref.text_nll.shape == ref.rating_nll.shape == (2, 8)
    changed = cr.HeldOutData(item_text=data.item_text, remaining=data.remaining,
                             remaining_ratings=data.remaining_ratings, held=[*data.held[:39], data.held[0]],
                             held_ratings=data.held_ratings)
    member = np.array([u % 2 if u < 32 else -1 for u in range(40)])
    before = cr.group_reference(data, member, scored, scored % 2, 2)
    after = cr.group_reference(changed, member, scored, scored % 2, 2)
    same_fold = np.arange(len(scored)) % 2 == 1                 # user 39 sits at position 7: fold 1, fitted on fold 0
    assert np.array_equal(before.text_nll[:, same_fold][:, :-1], after.text_nll[:, same_fold][:, :-1])
    assert not np.array_equal(before.text_nll[:, -1], after.text_nll[:, -1])
    assert np.array_equal(before.text_weights[1], after.text_weights[1])


def test_a_group_model_without_members_or_ratings_is_the_population():
    data = planted_data(users=12)
    bare = cr.HeldOutData(item_text=data.item_text, remaining=data.remaining, remaining_ratings=None,
                          held=data.held, held_ratings=None)
    ref = cr.group_reference(bare, np.full(12, -1), np.arange(12), np.zeros(12, dtype=np.int64), 2)
    assert ref.rating_nll is None and ref.population_rating_nll is None
    assert np.all(np.isfinite(ref.text_nll)) and ref.text_nll.shape == (2, 12)
    assert np.allclose(ref.text_nll[0], ref.text_nll[1])       # two empty groups: the same uniform model
