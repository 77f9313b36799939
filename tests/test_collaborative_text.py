"""Texts written from a collaborative model's distribution over unseen items (``recbole_uip.collaborative_text``)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from recbole_uip import mult_vae
from recbole_uip.collaborative_text import CollaborativeTexts, collaborative_contexts, unseen_item_probabilities
from recbole_uip.data.behaviour_text import BehaviourText


class CharTokenizer:
    """A fast tokenizer's interface, one token per character (ids are code points), with character offsets."""

    is_fast = True

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        out = {"input_ids": [ord(c) for c in text]}
        if return_offsets_mapping:
            out["offset_mapping"] = [(i, i + 1) for i in range(len(text))]
        return out


def toy_text() -> BehaviourText:
    """Four items ``a``..``d``; item ``d`` is in no history. Item ``a`` is rated 5 three times and 1 once."""
    histories = SimpleNamespace(item_texts=["a", "b", "c", "d"],
                                items=[np.array([0, 1]), np.array([0, 2]), np.array([0, 1]), np.array([0])],
                                ratings=[np.array([5.0, 3.0]), np.array([5.0, 4.0]), np.array([5.0, 3.0]),
                                         np.array([1.0])])
    settings = SimpleNamespace(rating_weight=1.0, rating_template=" rated {rating:g}", item_separator=";")
    return BehaviourText(histories, settings, CharTokenizer())


def decode(ids) -> str:
    return "".join(map(chr, ids))


def test_texts_are_written_from_the_distribution_within_the_budget_and_never_from_an_item_without_a_piece():
    text = toy_text()
    writer = CollaborativeTexts(text)
    assert [p.tolist() for p in writer.item_pieces][3] == []                 # item d: no history holds it
    np.testing.assert_allclose(writer.item_piece_shares[0], [0.75, 0.25])     # a rated 5 three times, 1 once
    rng = np.random.default_rng(0)
    piece = len(" a rated 5;")
    # all the mass on d, which has no piece: refused, not written from nothing
    with pytest.raises(ValueError, match="positive probability"):
        writer.sample(np.array([0.0, 0.0, 0.0, 1.0]), 100, rng)
    # items drawn in proportion, without replacement; a zero-probability item never
    firsts = []
    for _ in range(400):
        ids, flags = writer.sample(np.array([0.0, 0.8, 0.2, 0.0]), 100, rng)
        written = decode(ids)
        assert "a rated" not in written and len(ids) == len(flags) == 2 * piece
        assert sorted(decode([t for t, f in zip(ids, flags) if f]).split()) == ["3", "4", "rated", "rated"]
        firsts.append(written[1])
    assert 0.7 < firsts.count("b") / len(firsts) < 0.9                       # b first 80% of the time
    # as many items as fit the budget, at least one; the piece of an item by how often its rating occurs
    assert len(writer.sample(np.array([1.0, 1.0, 1.0, 0.0]), piece, rng)[0]) == piece
    assert len(writer.sample(np.array([1.0, 1.0, 1.0, 0.0]), 3, rng)[0]) == 3    # one item, cut to the budget
    ratings = [decode(writer.sample(np.array([1.0, 0.0, 0.0, 0.0]), 100, rng)[0]) for _ in range(400)]
    assert set(ratings) == {" a rated 5;", " a rated 1;"}
    assert 0.68 < ratings.count(" a rated 5;") / len(ratings) < 0.82


def test_the_distribution_is_the_models_softmax_over_the_items_a_user_has_not_seen():
    histories = [np.array([0, 1]), np.array([2]), np.arange(6)]
    model = mult_vae.fit_mult_vae(mult_vae.user_item_matrix(histories, 6), epochs=2)
    probabilities = unseen_item_probabilities(model, histories[:2], 6)
    assert probabilities.shape == (2, 6) and (probabilities[0, [0, 1]] == 0).all() and probabilities[1, 2] == 0
    np.testing.assert_allclose(probabilities.sum(1), 1.0)
    logits = mult_vae.item_logits(model, mult_vae.user_item_matrix(histories[:1], 6))[0, 2:].astype(float)
    np.testing.assert_allclose(probabilities[0, 2:], np.exp(logits) / np.exp(logits).sum(), rtol=1e-6)
    with pytest.raises(ValueError, match="seen every one of the 6 items"):
        unseen_item_probabilities(model, histories, 6)


def test_most_likely_first_writes_the_most_probable_items_in_order():
    writer = CollaborativeTexts(toy_text())
    rng = np.random.default_rng(0)
    for _ in range(20):
        written = decode(writer.sample(np.array([0.3, 0.2, 0.5, 0.0]), 100, rng, most_likely_first=True)[0])
        assert [piece.split()[0] for piece in written.split(";")[:-1]] == ["c", "a", "b"]


def test_collaborative_contexts_begin_alike_at_every_budget_and_do_not_depend_on_who_else_is_asked_for():
    text = toy_text()
    everyone = collaborative_contexts(text, [0, 1, 3])
    alone = collaborative_contexts(text, [3])
    piece = len(" a rated 5;")
    for user in (0, 1, 3):
        short, long = everyone(user, piece), everyone(user, 3 * piece)
        assert 0 < len(short) <= piece and long[:len(short)] == short
        assert everyone(user, 3 * piece) == long                       # the same text each time it is asked for
        assert " d rated" not in decode(long)                           # no history holds d: it has no piece
    assert alone(3, 3 * piece) == everyone(3, 3 * piece)
    seen = decode(everyone(1, 3 * piece))
    assert " a rated" not in seen and " c rated" not in seen           # user 1 has seen a and c
