"""Behaviour texts sampled from a collaborative model's prediction of the items a user has not seen.

A user's soft tokens fitted to their own observed text learn those items: 20 Adam steps on a 64-token draw lower
its NLL by 0.57 nats/token against the mean of the fitted tokens and carry nothing to the user's newer items
(``benchmarks/token_probe.py``). A Mult-VAE (:mod:`recbole_uip.mult_vae`) of the same training histories does
predict those newer items (0.062 nats/token on titles, ``benchmarks/count_reference.py``). Here a user's text is
written from items drawn from that model's distribution over the items the user has not seen, a new draw at every
step, so that tokens fitted to such texts can learn only what the distribution says about the user, not the items
of one text. Measured on ml-100k (``docs/experiment_log.md``, 2026-12-06): they memorise nothing and learn what all
users share, but nothing that sets the user apart, not even on a new text from the same distribution.

Departure from the paper, which fits the tokens to the user's observed behaviour text: these targets come from a
collaborative model of the same training histories (no held-out item enters either). Each drawn item is written
with one of its training pieces (``" <item text> rated <r>;"``), drawn as often as that rating occurs for it in
the training histories: the collaborative model predicts items, not ratings.
"""

from __future__ import annotations

import numpy as np

from recbole_uip import mult_vae
from recbole_uip.count_reference import softmax_over_unseen
from recbole_uip.data.behaviour_text import BehaviourText


def unseen_item_probabilities(model: mult_vae.MultVAE, histories: list[np.ndarray], num_items: int) -> np.ndarray:
    """``(B, I)`` float64: per user, the model's softmax over the ``num_items`` items restricted to those not in
    their ``histories[j]`` (item indices; 0 for a seen item), the latent at its mean.

    Raises:
        ValueError: a user has seen every item (nothing is left to draw).
    """
    full = sum(len(np.unique(items)) == num_items for items in histories)
    if full:
        raise ValueError(f"{full} user(s) have seen every one of the {num_items} items: no unseen item to draw a "
                         f"text from.")
    logits = mult_vae.item_logits(model, mult_vae.user_item_matrix(histories, num_items)).astype(np.float64)
    return np.stack([softmax_over_unseen(row, 1.0, items) for row, items in zip(logits, histories)])


class CollaborativeTexts:
    """Writes behaviour texts of items drawn from a distribution over items (see the module docstring).

    Args:
        text: the training histories' :class:`BehaviourText`; its pieces are what the texts are written with.

    Attributes:
        item_pieces: per item, int64 ``(m_i,)`` its pieces (empty for an item no training history holds: such an
            item has no text to write and is never drawn).
        item_piece_shares: per item, float64 ``(m_i,)``: how often each of its pieces occurs in the training
            histories, as a share of the item's occurrences.
        writable: bool ``(I,)``: whether the item has a piece (only those are drawn).
    """

    def __init__(self, text: BehaviourText):
        self.text = text
        counts = np.bincount(np.concatenate(text.user_pieces), minlength=len(text.piece_ids)).astype(np.float64)
        num_items = len(text.histories.item_texts)
        order = np.argsort(text.piece_items, kind="stable")
        bounds = np.searchsorted(text.piece_items[order], np.arange(num_items + 1))
        self.item_pieces = [order[bounds[i]:bounds[i + 1]] for i in range(num_items)]
        self.item_piece_shares = [counts[p] / counts[p].sum() if len(p) else counts[p] for p in self.item_pieces]
        self.writable = np.array([len(p) > 0 for p in self.item_pieces])

    def sample(self, probabilities: np.ndarray, budget: int, rng: np.random.Generator,
               most_likely_first: bool = False) -> tuple[list[int], list[bool] | None]:
        """One text of at most ``budget`` tokens: items drawn without replacement in proportion to
        ``probabilities`` ``(I,)`` (among the items with a piece), or with ``most_likely_first`` the most probable
        items in order of probability, each written with a piece drawn by :attr:`item_piece_shares`, in that order,
        as many as fit (at least one). Token ids and their rating flags (None when ratings are not marked), as
        :meth:`BehaviourText.pieces_tokens`."""
        weights = np.where(self.writable, probabilities, 0.0)
        if not (weights > 0).any():
            raise ValueError("No item with a training piece has a positive probability: nothing to write.")
        with np.errstate(divide="ignore"):
            keys = rng.exponential(size=len(weights)) / weights     # the smallest keys: a draw without replacement
        if most_likely_first:
            keys = -weights                     # the random keys are still drawn: the generator moves on alike
        order = np.argsort(keys, kind="stable")[:int((weights > 0).sum())]
        pieces, used = [], 0
        for item in order:
            piece = rng.choice(self.item_pieces[item], p=self.item_piece_shares[item])
            length = int(self.text.piece_lengths[piece])
            if pieces and used + length > budget:
                break
            pieces.append(piece)
            used += length
        return self.text.pieces_tokens(pieces, budget)


def collaborative_contexts(text: BehaviourText, users, seed: int = 0, most_likely_first: bool = False):
    """A function ``context(user, budget) -> token ids``: for each of ``users``, a text of at most ``budget`` tokens
    written (:meth:`CollaborativeTexts.sample`) from a Mult-VAE's distribution over the items they have not seen in
    ``text``'s histories, the Mult-VAE trained on every history in ``text`` (pass the text without any held-out
    item). Each user's texts come from a generator of their own (``seed``, user), so that their texts at two budgets
    begin with the same items, and any user's text is the same whichever other users are asked for.

    What the in-context benchmark reads in place of a user's own history (``--context_source``): the collaborative
    model's prediction for the user, written as text."""
    num_items = len(text.histories.item_texts)
    model = mult_vae.fit_mult_vae(mult_vae.user_item_matrix(text.histories.items, num_items))
    users = [int(u) for u in users]
    rows = unseen_item_probabilities(model, [text.histories.items[u] for u in users], num_items)
    probabilities = dict(zip(users, rows))
    writer = CollaborativeTexts(text)

    def context(user: int, budget: int) -> list[int]:
        ids, _ = writer.sample(probabilities[int(user)], budget, np.random.default_rng([seed, int(user)]),
                               most_likely_first)
        return ids

    return context
