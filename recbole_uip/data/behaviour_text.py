"""The tokenised behaviour text of every user, and the choice of which items a training step scores.

One *piece* per distinct (item, rating): ``" <item text> rated <r>;"`` tokenised once and shared by every user who
gave that item that rating, so memory grows with the distinct pairs, not with the users. A user's text is the
concatenation of the pieces of some of their training items, oldest first.

Which items a step scores (``uip_target``):

* ``random`` (default; a departure from the paper): a random subset of the user's training items within
  ``uip_max_behaviour_tokens``; the encoder reads the user's *other* items. The soft tokens must then predict
  items they did not read, which is what a profile is for (a new item, a new user). Each visit draws another
  subset, so no user's text is memorised.
* ``newest``: the paper's setting: the newest items within the budget, the same text at every visit.
"""

from __future__ import annotations

import numpy as np

from recbole_uip.data.behaviour import TrainingHistories


class BehaviourText:
    """Tokenised pieces of every user's history (see module docstring).

    Args:
        histories: the training histories.
        settings: :class:`~recbole_uip.config.UIPSettings` (templates, separator, rating weight).
        tokenizer: the LLM's tokenizer.

    Attributes:
        piece_ids: per piece, int64 token ids.
        rating_flags: per piece, bool per token: whether it writes the rating (``uip_rating_template``); wherever
            the text writes ratings and the tokenizer gives character offsets, else None. Marked even where
            ``uip_rating_weight`` is 1 (no token weighs more in training), so that the rating tokens can be scored
            alone (the generalisation benchmark's ``rating_tokens``) in the paper's setting too.
        user_pieces: per user, int64 ``(n_u,)`` piece indices aligned with ``histories.items``.
        piece_lengths: int64 ``(num_pieces,)``.
        piece_items: int64 ``(num_pieces,)``: the item each piece writes.
    """

    def __init__(self, histories: TrainingHistories, settings, tokenizer, logger=None):
        self.histories = histories
        ratings = histories.ratings
        self.mark_ratings = ratings is not None and bool(getattr(tokenizer, "is_fast", False))
        if settings.rating_weight != 1.0 and not self.mark_ratings and logger:
            reason = ("the behaviour text writes no rating (" + "; ".join(histories.fields.notes or ("no rating field",)) + ")"
                      if ratings is None else "the tokenizer is not a fast one (no character offsets to find the rating tokens)")
            logger.warning(f"UIP: uip_rating_weight={settings.rating_weight:g} has no effect: {reason}; every behaviour "
                           f"token weighs 1.")
        index: dict[tuple[int, float], int] = {}
        self.piece_ids: list[np.ndarray] = []
        piece_items: list[int] = []
        flags: list[np.ndarray] = []
        self.user_pieces: list[np.ndarray] = []
        for u, items in enumerate(histories.items):
            user_ratings = ratings[u] if ratings is not None else np.zeros(len(items), dtype=np.float32)
            row = np.empty(len(items), dtype=np.int64)
            for j, (item, rating) in enumerate(zip(items.tolist(), user_ratings.tolist())):
                key = (item, rating)
                if key not in index:
                    index[key] = len(self.piece_ids)
                    ids, rating_flags = self._encode(tokenizer, settings, histories.item_texts[item],
                                                     rating if ratings is not None else None)
                    self.piece_ids.append(ids)
                    piece_items.append(item)
                    flags.append(rating_flags)
                row[j] = index[key]
            self.user_pieces.append(row)
        self.rating_flags = flags if self.mark_ratings else None
        self.piece_lengths = np.array([len(ids) for ids in self.piece_ids], dtype=np.int64)
        self.piece_items = np.array(piece_items, dtype=np.int64)
        if logger:
            logger.info(f"Behaviour text: {len(self.piece_ids)} distinct (item, rating) pieces, "
                        f"{self.piece_lengths.mean():.1f} tokens each on average.")

    def _encode(self, tokenizer, settings, text: str, rating: float | None) -> tuple[np.ndarray, np.ndarray]:
        head = " " + text
        full = text if rating is None else text + settings.rating_template.format(rating=rating)
        encoded = tokenizer(" " + full + settings.item_separator, add_special_tokens=False,
                            return_offsets_mapping=self.mark_ratings)
        ids = np.asarray(encoded["input_ids"], dtype=np.int64)
        if not self.mark_ratings:
            return ids, np.zeros(len(ids), dtype=bool)
        end = len(" " + full)  # tokens overlapping the characters the rating template wrote
        return ids, np.array([start < end and stop > len(head) for start, stop in encoded["offset_mapping"]], dtype=bool)

    def __len__(self) -> int:
        return len(self.user_pieces)

    def tokens(self, user: int, positions, budget: int | None = None) -> tuple[list[int], list[bool] | None]:
        """Token ids of ``user``'s items at ``positions`` (oldest first), cut to ``budget`` tokens, and their rating
        flags (None when ratings are not marked)."""
        return self.pieces_tokens(self.user_pieces[user][np.sort(np.asarray(positions, dtype=np.int64))], budget)

    def pieces_tokens(self, pieces, budget: int | None = None) -> tuple[list[int], list[bool] | None]:
        """Token ids of ``pieces`` (piece indices, in the order given) written one after another, cut to
        ``budget`` tokens, and their rating flags (None when ratings are not marked)."""
        ids = np.concatenate([self.piece_ids[p] for p in pieces])[:budget]
        if self.rating_flags is None:
            return ids.tolist(), None
        return ids.tolist(), np.concatenate([self.rating_flags[p] for p in pieces])[:budget].tolist()

    def newest_target(self, user: int, budget: int) -> np.ndarray:
        """Positions of the newest items of ``user`` whose pieces fit ``budget`` tokens (at least the newest one)."""
        lengths = self.piece_lengths[self.user_pieces[user]][::-1]
        fits = int(np.searchsorted(np.cumsum(lengths), budget, side="right"))
        n = len(lengths)
        return np.arange(n - max(fits, 1), n)

    def random_target(self, user: int, budget: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``(target, rest)`` positions: a random subset of ``user``'s items within ``budget`` tokens (at least one
        item; never every item when the user has two or more), and the items the encoder reads."""
        n = len(self.user_pieces[user])
        order = rng.permutation(n)
        lengths = self.piece_lengths[self.user_pieces[user]][order]
        fits = int(np.searchsorted(np.cumsum(lengths), budget, side="right"))
        take = min(max(fits, 1), max(n - 1, 1))
        return np.sort(order[:take]), np.sort(order[take:])

    @property
    def num_tokens(self) -> int:
        """Tokens in every user's full history text."""
        return int(sum(self.piece_lengths[p].sum() for p in self.user_pieces))
