"""A reference for the generalisation goal that needs no LLM: how much a collaborative model of a user's own history
predicts of their held-out items beyond what a population model predicts.

The generalisation benchmark scores each user's newest training items (held out of inference) in nats per token of
their text. What such a text says about the user is, item by item, *which* item (its text: a title, or a genre list
shared by many items) and *which rating*. This module scores those two facts per held-out item with models
fitted on the remaining histories only, the information a user's soft tokens are learned from:

* the item's text: the population model is the items' popularity (``pop``), summed over the items that share a
  text. The user's models add the user's history in three nested steps:

  - ``set`` (the history as a set, the kind of thing a profile describes): the popularity over the items the user
    has not seen (``pop_unseen``), the user's own distribution over texts (``own``) and two item-to-item models of
    the remaining histories (``neighbours``: cosine similarity of co-occurrence summed over the user's items;
    ``ease_t<tau>``: EASE's scores through a softmax at a few temperatures; ``mult_vae_t<tau>``: a Mult-VAE's
    softmax, the one component trained as a distribution over items, ``recbole_uip.mult_vae``);
  - ``recent``: the same from the user's newest :data:`RECENT` remaining items alone (``_recent``; the held-out
    items are the newest);
  - ``sequence``: the items that followed the user's last 1, 3 or 10 items in the remaining histories
    (``transitions_last<k>``; on ml-100k most are rated in sessions, half of consecutive ratings in the same second,
    so this reads which session the user was in rather than a taste);

* the rating, given the item's text (what the LLM has read when it predicts the rating; a title names the item, a
  genre list only the genres): the population model mixes the global distribution (``global``) with the ratings
  of the items with that text (``text``) and a discretised Gaussian around their shrunk mean (``text_mean``); the
  ``set`` model adds the user's own distribution (``own``) and the Gaussian moved by the user's shrunk offset from
  those means (``offset``), the ``recent`` and ``sequence`` models the same from the user's newest items
  (``_recent``).

Each model is a mixture of fixed components whose weights are fitted by EM (:func:`mixture_weights`) on the
held-out items of the *other* half of the users (:func:`cross_fitted_log_probs`, two folds by user index): no
user's own held-out items shape their own model. The per-user gain, ``log P_user - log P_population`` summed over
the user's held-out items and divided by their tokens, is then in the same unit as the generalisation goal's
``own - mean`` (with the sign flipped) and the in-context reference's ``own - population``.

:func:`held_out_data` builds the models' input from the training histories and the held-out positions of
``benchmarking.held_out_positions``; :func:`count_reference` scores them; :func:`held_out_token_counts` and
:func:`gains_per_token` put the gains per token (``benchmarks/count_reference.py`` reports them in full, and the
generalisation benchmark beside its goal).

This is a reference, not a bound: a better model can gain more, and an LLM could find in a title or a genre what
no collaborative model sees (the counts alone, without the Mult-VAE, gained less than half as much on ml-100k:
``docs/experiment_log.md``). It says how much of a user's held-out text standard collaborative models of the same history
explain, per token, and how much of that is the history as a set, its newest end, or its order.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import sparse

from recbole_uip import mult_vae

RECENT = 20           # the user's newest remaining items, for the components that read only those
EASE_REGULARISATION = 200.0   # of 50, 200 and 500, the best on ml-100k's held-out items (all users: a little optimistic)
EASE_TEMPERATURES = (5.0, 10.0, 20.0, 40.0)
EASE_MAX_ITEMS = 8000
MULT_VAE_TEMPERATURES = (0.5, 1.0, 2.0)   # a multiplier on its logits: flatter, as trained, sharper
MULT_VAE_MAX_CELLS = 50_000_000           # users x items: its input and logits are dense (U, I) float32
TRANSITION_LAGS = 10  # an item follows each of the user's last items within this many steps, weighted 1 / lag
TRANSITION_LAST = (1, 3, 10)
TEXT_COMPONENTS = ("pop", "pop_unseen", "own", "neighbours", *(f"ease_t{tau:g}" for tau in EASE_TEMPERATURES),
                   *(f"mult_vae_t{tau:g}" for tau in MULT_VAE_TEMPERATURES),
                   "own_recent", "neighbours_recent", *(f"ease_recent_t{tau:g}" for tau in EASE_TEMPERATURES),
                   *(f"mult_vae_recent_t{tau:g}" for tau in MULT_VAE_TEMPERATURES),
                   *(f"transitions_last{k}" for k in TRANSITION_LAST))
RATING_COMPONENTS = ("global", "text", "text_mean", "own", "offset", "own_recent", "offset_recent")
MODELS = ("population", "set", "recent", "sequence")   # nested: each adds components to the one before
SHRINK = 5.0          # pseudo-ratings towards the global mean (text means) and towards zero (user offsets)
SESSION_GAP = 3600.0  # seconds: a held-out item rated this soon after the user's newest remaining one (gains_by_gap)
SMOOTH = 0.5          # add-0.5 on the popularity and global rating counts, so neither gives a value probability 0


def model_components(model: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(text components, rating components)`` of one of :data:`MODELS` (the module's docstring)."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    # each model's components are a prefix of the lists above (the models are nested): where the prefix ends
    text_ends = {"population": "pop_unseen", "set": "own_recent", "recent": "transitions_last1", "sequence": None}
    rating_ends = {"population": "own", "set": "own_recent", "recent": None, "sequence": None}
    text = TEXT_COMPONENTS[:TEXT_COMPONENTS.index(text_ends[model])] if text_ends[model] else TEXT_COMPONENTS
    rating = RATING_COMPONENTS[:RATING_COMPONENTS.index(rating_ends[model])] if rating_ends[model] else RATING_COMPONENTS
    return text, rating


@dataclasses.dataclass
class HeldOutData:
    """Per user, the remaining and the held-out items as the models see them.

    Attributes:
        item_text: int64 ``(I,)``: the text id of each item (items sharing a text share it), ``0..T-1``.
        remaining: per user, int64 item indices of the remaining history (what inference may read).
        remaining_ratings: per user, float ``(len(remaining[u]),)``, or None without ratings.
        held: per user, int64 item indices of the held-out items (possibly empty).
        held_ratings: per user, float ``(len(held[u]),)``, or None without ratings.
        held_gaps: per user, float ``(len(held[u]),)``: seconds from the user's newest remaining item to each
            held-out item; None without timestamps (read only by :func:`gains_by_gap`).
    """

    item_text: np.ndarray
    remaining: list[np.ndarray]
    remaining_ratings: list[np.ndarray] | None
    held: list[np.ndarray]
    held_ratings: list[np.ndarray] | None
    held_gaps: list[np.ndarray] | None = None

    @property
    def num_items(self) -> int:
        return len(self.item_text)

    @property
    def num_texts(self) -> int:
        return int(self.item_text.max()) + 1 if len(self.item_text) else 0


def held_out_data(histories, held: list[np.ndarray]) -> HeldOutData:
    """The models' view of ``histories`` (a ``TrainingHistories``) with ``held[u]`` (positions in user ``u``'s
    items, e.g. ``benchmarking.held_out_positions``) held out: items sharing a text share a text id."""
    _, item_text = np.unique(np.asarray(histories.item_texts, dtype=object).astype(str), return_inverse=True)
    rest = [np.setdiff1d(np.arange(len(items)), h) for items, h in zip(histories.items, held)]
    ratings, times = histories.ratings, getattr(histories, "times", None)
    gaps = None if times is None else [
        t[np.asarray(h, dtype=np.int64)] - (t[r[-1]] if len(r) else np.nan) for t, h, r in zip(times, held, rest)]
    return HeldOutData(
        item_text=item_text.astype(np.int64),
        remaining=[items[r] for items, r in zip(histories.items, rest)],
        remaining_ratings=None if ratings is None else [rt[r] for rt, r in zip(ratings, rest)],
        held=[items[np.asarray(h, dtype=np.int64)] for items, h in zip(histories.items, held)],
        held_ratings=None if ratings is None else [rt[np.asarray(h, dtype=np.int64)] for rt, h in zip(ratings, held)],
        held_gaps=gaps)


def held_out_token_counts(text, held: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens, rating_tokens)``, float ``(U,)`` each: per user, the tokens of the held-out items' text and those of
    them that write the rating (zeros where the text marks none). ``text``: the ``BehaviourText`` the positions
    ``held`` index."""
    pieces = [text.user_pieces[u][np.asarray(h, dtype=np.int64)] for u, h in enumerate(held)]
    tokens = np.array([text.piece_lengths[p].sum() for p in pieces], dtype=float)
    flags = text.rating_flags
    rating = np.array([sum(int(np.sum(flags[i])) for i in p) if flags is not None else 0 for p in pieces], dtype=float)
    return tokens, rating


def per_count(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``values / counts`` elementwise, nan where a count is 0 (a user without held-out tokens or items)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(counts > 0, values / counts, np.nan)


def gains_per_token(reference: "CountReference", tokens: np.ndarray) -> dict[str, np.ndarray]:
    """``{model: (U,)}``: each user model's gain over the population model (text and rating together) per held-out
    token; nan for users without held-out tokens."""
    return {model: per_count(sum(reference.gain(model)), tokens) for model in MODELS[1:]}


def ease_weights(matrix, regularisation: float = EASE_REGULARISATION) -> np.ndarray | None:
    """``(I, I)``: EASE's item-to-item weights (Steck, 2019) of the binary user-item ``matrix`` ``(U, I)``:
    ``B = I - P / diag(P)`` with ``P = (X^T X + lambda I)^-1``, zero diagonal; None above :data:`EASE_MAX_ITEMS`
    items (a dense ``(I, I)`` inverse)."""
    if matrix.shape[1] > EASE_MAX_ITEMS:
        return None
    gram = (matrix.T @ matrix).toarray() + regularisation * np.eye(matrix.shape[1])
    inverse = np.linalg.inv(gram)
    weights = -inverse / np.diag(inverse)
    np.fill_diagonal(weights, 0.0)
    return weights


def transition_counts(histories: list[np.ndarray], num_items: int, lags: int = TRANSITION_LAGS):
    """``(I, I)`` sparse: over the ``histories`` (per user, item indices oldest first), how often item ``j`` came
    ``k <= lags`` steps after item ``i``, each occurrence weighted ``1 / k``."""
    rows, cols, weights = [], [], []
    for items in histories:
        for lag in range(1, min(lags, len(items) - 1) + 1):
            rows.append(items[:-lag])
            cols.append(items[lag:])
            weights.append(np.full(len(items) - lag, 1.0 / lag))
    if not rows:
        return sparse.csr_matrix((num_items, num_items))
    return sparse.csr_matrix((np.concatenate(weights), (np.concatenate(rows), np.concatenate(cols))),
                             shape=(num_items, num_items))


def _normalised(scores: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """``scores`` ``(I,)`` (non-negative) as a distribution, or ``fallback`` where they are all zero."""
    total = scores.sum()
    return scores / total if total > 0 else fallback


def softmax_over_unseen(scores: np.ndarray, temperature: float, seen: np.ndarray) -> np.ndarray:
    """``softmax(temperature * scores)`` over the items not in ``seen``, ``(I,)`` float64, 0 on a seen item (uniform
    where every item is seen). Also what ``recbole_uip.collaborative_text`` draws items from."""
    logits = temperature * scores
    logits[seen] = -np.inf
    finite = np.isfinite(logits)
    if not finite.any():
        return np.full(len(scores), 1.0 / len(scores))
    logits = np.exp(logits - logits[finite].max())
    return logits / logits.sum()


def _mult_vae_logits(matrix, remaining: list[np.ndarray]) -> dict:
    """``{"mult_vae": (U, I), "mult_vae_recent": (U, I)}``: float64 logits of a Mult-VAE trained on the binary
    ``matrix`` ``(U, I)`` of the remaining histories, fed each user's whole remaining history and their newest
    :data:`RECENT` items; both None above :data:`MULT_VAE_MAX_CELLS` cells."""
    if matrix.shape[0] * matrix.shape[1] > MULT_VAE_MAX_CELLS or not matrix.nnz:
        return {"mult_vae": None, "mult_vae_recent": None}
    model = mult_vae.fit_mult_vae(matrix)
    recent = mult_vae.user_item_matrix([r[-RECENT:] for r in remaining], matrix.shape[1])
    return {"mult_vae": mult_vae.item_logits(model, matrix).astype(float),
            "mult_vae_recent": mult_vae.item_logits(model, recent).astype(float)}


def text_component_probs(data: HeldOutData) -> list[np.ndarray]:
    """Per user, ``(len(held[u]), len(TEXT_COMPONENTS))``: the probability of each held-out item's *text* under each
    component (the module's docstring), each a distribution over items fitted on the remaining histories and summed
    over the items that share a text (``own``, ``own_recent``: the user's distribution over texts itself).

    ``neighbours``: item scores ``s = sum_{j in remaining[u]} cos(i, j)`` over the binary user-item matrix of the
    remaining histories, zero on the user's own items, normalised (``pop`` where they co-occur with nothing);
    ``_recent``: over the user's newest :data:`RECENT` remaining items only. ``ease_t<tau>``: ``softmax(tau * s)``
    over the items the user has not seen, ``s`` the EASE scores of the user's items (:func:`ease_weights`; ``pop_unseen``
    above :data:`EASE_MAX_ITEMS` items). ``mult_vae_t<tau>``: ``softmax(tau * logits)`` over the items the user has
    not seen, the logits of a :class:`~recbole_uip.mult_vae.MultVAE` trained on the remaining histories and fed the
    user's (``_recent``: their newest items only; ``pop_unseen`` above :data:`MULT_VAE_MAX_CELLS` users x items).
    ``transitions_last<k>``: the :func:`transition_counts` from the user's last ``k`` items, zero on the user's own
    items, normalised (``pop_unseen`` where there are none). Cost: two sparse ``(I, I)`` count matrices, a dense
    ``(I, I)`` inverse, and the Mult-VAE's training (about 20 s on ml-100k, 2 threads)."""
    num_items = data.num_items
    matrix = mult_vae.user_item_matrix(data.remaining, num_items)        # (U, I) binary
    counts = np.asarray(matrix.sum(axis=0)).ravel()                       # (I,) users per item
    norm = sparse.diags(1.0 / np.sqrt(np.maximum(counts, 1.0)))
    cosine = (norm @ (matrix.T @ matrix) @ norm).tolil()
    cosine.setdiag(0.0)
    cosine = cosine.tocsr()                                               # (I, I)
    ease = ease_weights(matrix)
    vae_logits = _mult_vae_logits(matrix, data.remaining)
    transitions = transition_counts(data.remaining, num_items)
    to_text = sparse.csr_matrix((np.ones(num_items), (np.arange(num_items), data.item_text)),
                                shape=(num_items, data.num_texts))
    pop = (counts + SMOOTH) / (counts + SMOOTH).sum()                    # (I,)
    out = []
    for user, (seen, held) in enumerate(zip(data.remaining, data.held)):
        recent = seen[-RECENT:]
        unseen = pop.copy()
        unseen[seen] = 0.0
        unseen = _normalised(unseen, pop)                                 # pop where the user has seen every item
        items = {"pop": pop, "pop_unseen": unseen}
        for name, window in (("neighbours", seen), ("neighbours_recent", recent)):
            scores = np.asarray(cosine[window].sum(axis=0)).ravel() if len(window) else np.zeros(num_items)
            scores[seen] = 0.0
            items[name] = _normalised(scores, pop)
        for name, window in (("ease", seen), ("ease_recent", recent)):
            scores = ease[window].sum(axis=0) if ease is not None and len(window) else None
            for tau in EASE_TEMPERATURES:
                items[f"{name}_t{tau:g}"] = unseen if scores is None else softmax_over_unseen(scores, tau, seen)
        for name, logits in vae_logits.items():
            for tau in MULT_VAE_TEMPERATURES:
                items[f"{name}_t{tau:g}"] = unseen if logits is None else softmax_over_unseen(logits[user], tau, seen)
        for last in TRANSITION_LAST:
            scores = np.asarray(transitions[seen[-last:]].sum(axis=0)).ravel() if len(seen) else np.zeros(num_items)
            scores[seen] = 0.0
            items[f"transitions_last{last}"] = _normalised(scores, unseen)
        texts = data.item_text[held]
        probs = np.empty((len(held), len(TEXT_COMPONENTS)))
        for k, name in enumerate(TEXT_COMPONENTS):
            if name in ("own", "own_recent"):
                own = np.bincount(data.item_text[seen if name == "own" else recent], minlength=data.num_texts)
                probs[:, k] = own[texts] / max(own.sum(), 1)
            else:
                probs[:, k] = (items[name] @ to_text)[texts]
        out.append(probs)
    return out


def _slots(values: np.ndarray, ratings) -> np.ndarray:
    """Each of ``ratings``' index in the sorted ``values (V,)``."""
    return np.searchsorted(values, np.asarray(ratings, dtype=values.dtype))


@dataclasses.dataclass
class RatingScale:
    """What every rating component reads from the remaining histories: the rating ``values (V,)`` seen anywhere in
    the data, the global distribution ``glob (V,)`` (add-:data:`SMOOTH`), each text's distribution ``text_dist
    (T, V)`` shrunk towards it by 2 ratings, each text's mean ``text_mean (T,)`` shrunk towards the global mean by
    :data:`SHRINK` pseudo-ratings, and ``spread``, the remaining ratings' spread around their texts' means."""

    values: np.ndarray
    glob: np.ndarray
    text_dist: np.ndarray
    text_mean: np.ndarray
    spread: float

    @classmethod
    def fit(cls, data: HeldOutData) -> "RatingScale":
        if data.remaining_ratings is None or data.held_ratings is None:
            raise ValueError("the data holds no ratings")
        values = np.unique(np.concatenate([*data.remaining_ratings, *data.held_ratings]))   # (V,)
        texts = data.item_text[np.concatenate(data.remaining)]
        ratings = np.concatenate(data.remaining_ratings).astype(float)
        rated = _slots(values, np.concatenate(data.remaining_ratings))
        glob = np.bincount(rated, minlength=len(values)) + SMOOTH
        glob = glob / glob.sum()
        per_text = np.zeros((data.num_texts, len(values)))
        np.add.at(per_text, (texts, rated), 1.0)
        text_dist = (per_text + 2 * glob) / (per_text.sum(1, keepdims=True) + 2)
        sums = np.bincount(texts, weights=ratings, minlength=data.num_texts)
        text_mean = (sums + SHRINK * ratings.mean()) / (per_text.sum(1) + SHRINK)
        spread = max(float(np.sqrt(np.mean((ratings - text_mean[texts]) ** 2))), 1e-3)
        return cls(values, glob, text_dist, text_mean, spread)

    def slots(self, ratings) -> np.ndarray:
        """Each rating's index in :attr:`values`."""
        return _slots(self.values, ratings)

    def gaussian(self, centres: np.ndarray) -> np.ndarray:
        """``(n, V)``: a Gaussian of :attr:`spread` around each of ``centres (n,)``, normalised over the values."""
        logits = -0.5 * ((self.values[None, :] - centres[:, None]) / self.spread) ** 2
        p = np.exp(logits - logits.max(1, keepdims=True))
        return p / p.sum(1, keepdims=True)

    def population(self, held_texts: np.ndarray, held_slots: np.ndarray) -> np.ndarray:
        """``(n, 3)``: the population's components (``global``, ``text``, ``text_mean``) of ratings at
        ``held_slots`` of items with ``held_texts``."""
        return np.stack([self.glob[held_slots], self.text_dist[held_texts, held_slots],
                         self.gaussian(self.text_mean[held_texts])[np.arange(len(held_slots)), held_slots]], axis=1)

    def own(self, slots: np.ndarray, held_slots: np.ndarray) -> np.ndarray:
        """``(n,)``: the distribution of the ratings at ``slots`` (shrunk towards the global one by 2 ratings) at
        ``held_slots``."""
        own = np.bincount(slots, minlength=len(self.values)) + 2 * self.glob
        return (own / own.sum())[held_slots]

    def offset(self, ratings: np.ndarray, texts: np.ndarray, held_texts: np.ndarray, held_slots: np.ndarray) -> np.ndarray:
        """``(n,)``: the Gaussian around each held-out text's mean moved by the mean offset of ``ratings`` from
        their ``texts``' means (shrunk towards zero by :data:`SHRINK`), at ``held_slots``."""
        residuals = np.asarray(ratings, dtype=float) - self.text_mean[texts]
        offset = float(residuals.sum() / (len(residuals) + SHRINK))
        return self.gaussian(self.text_mean[held_texts] + offset)[np.arange(len(held_slots)), held_slots]


def rating_component_probs(data: HeldOutData) -> list[np.ndarray]:
    """Per user, ``(len(held[u]), len(RATING_COMPONENTS))``: the probability of each held-out rating under each
    component (the module's docstring), over the rating values seen anywhere in the data.

    ``text_mean`` and ``offset`` are Gaussians over those values, normalised, with the spread of the remaining
    ratings around their texts' means: centred at the mean rating of the item's text shrunk towards the global mean
    by :data:`SHRINK` pseudo-ratings, and at that plus the user's mean offset from it shrunk towards zero the same
    way (:class:`RatingScale`)."""
    scale = RatingScale.fit(data)
    out = []
    for seen, seen_r, held, held_r in zip(data.remaining, data.remaining_ratings, data.held, data.held_ratings):
        held_slots, seen_slots = scale.slots(held_r), scale.slots(seen_r)
        held_texts, seen_texts = data.item_text[held], data.item_text[seen]
        columns = [scale.population(held_texts, held_slots)]
        for window in (slice(None), slice(-RECENT, None)):
            columns.append(np.stack([scale.own(seen_slots[window], held_slots),
                                     scale.offset(seen_r[window], seen_texts[window], held_texts, held_slots)], axis=1))
        out.append(np.concatenate(columns, axis=1))
    return out


GROUP_TEXT_COMPONENTS = ("pop", "group")
GROUP_RATING_COMPONENTS = ("global", "text", "text_mean", "group", "group_offset")


@dataclasses.dataclass
class GroupReference:
    """Users' held-out items scored by a model that knows only their *group* (:func:`group_reference`): the count
    model's analogue of one soft token per group.

    Attributes:
        text_nll, rating_nll: ``(K, n)``: the NLL of user ``j``'s held-out texts (ratings), summed over their items,
            under the population mixed with group ``g``'s model (``rating_nll`` None without ratings).
        population_text_nll, population_rating_nll: ``(n,)``: the same under the population model alone.
        text_weights, rating_weights: ``(2, C)``: the mixtures' weights over :data:`GROUP_TEXT_COMPONENTS`
            (:data:`GROUP_RATING_COMPONENTS`), row f applied to fold f.
    """

    text_nll: np.ndarray
    rating_nll: np.ndarray | None
    population_text_nll: np.ndarray
    population_rating_nll: np.ndarray | None
    text_weights: np.ndarray
    rating_weights: np.ndarray | None


def group_reference(data: HeldOutData, member_group: np.ndarray, users: np.ndarray, user_group: np.ndarray,
                    groups: int) -> GroupReference:
    """``users``' held-out items scored by the population model mixed with each group's model, where a group's
    model is fitted on the remaining histories of its members alone: the items' texts by the group's popularity
    (``group``, add-:data:`SMOOTH` over every item, summed over the items sharing a text; unlike ``pop_unseen`` it
    does not know which items the user has seen, as a token per group does not), the ratings by the group's rating
    distribution and its mean offset from the texts' means (``group``, ``group_offset``, as a user's ``own`` and
    ``offset``).

    Args:
        member_group: ``(U,)`` over every user of ``data``: the group whose model their remaining history joins,
            -1 for none (the scored ``users`` should be none, so that their own history shapes no group's model).
        users: ``(n,)`` user indices into ``data``, the users scored.
        user_group: ``(n,)`` the group of each of ``users``; the mixtures' weights are fitted on the other fold's
            users (by parity of position in ``users``) with their own group's model, then applied to every group's.
        groups: ``K``.
    """
    num_items = data.num_items
    to_text = sparse.csr_matrix((np.ones(num_items), (np.arange(num_items), data.item_text)),
                                shape=(num_items, data.num_texts))
    members = [np.flatnonzero(np.asarray(member_group) == g) for g in range(groups)]

    def popularity(histories: list[np.ndarray]) -> np.ndarray:       # (T,): add-SMOOTH over items, per text
        counts = np.bincount(np.concatenate(histories), minlength=num_items) if histories else np.zeros(num_items)
        return ((counts + SMOOTH) / (counts + SMOOTH).sum()) @ to_text

    def pooled(per_user: list[np.ndarray], m: np.ndarray, dtype) -> np.ndarray:   # a group's values, end to end
        return np.concatenate([per_user[u] for u in m]) if len(m) else np.zeros(0, dtype=dtype)

    pop = popularity(list(data.remaining))
    group_pop = np.stack([popularity([data.remaining[u] for u in m]) for m in members])       # (K, T)
    held_texts = [data.item_text[data.held[u]] for u in users]
    # per group, per user: the component probabilities of each held-out item, (n_u, C)
    text_probs = [[np.stack([pop[t], group_pop[g][t]], axis=1) for t in held_texts] for g in range(groups)]
    rating_probs = None
    if data.remaining_ratings is not None and data.held_ratings is not None:
        scale = RatingScale.fit(data)
        item_texts = [data.item_text[r] for r in data.remaining]
        group_ratings = [pooled(data.remaining_ratings, m, float) for m in members]
        group_slots = [scale.slots(r) for r in group_ratings]
        group_texts = [pooled(item_texts, m, np.int64) for m in members]
        held_slots = [scale.slots(data.held_ratings[u]) for u in users]
        population = [scale.population(t, h) for t, h in zip(held_texts, held_slots)]   # the same for every group
        rating_probs = [[np.concatenate([p, np.stack([scale.own(group_slots[g], h),
                                                      scale.offset(group_ratings[g], group_texts[g], t, h)], axis=1)],
                                        axis=1)
                         for t, h, p in zip(held_texts, held_slots, population)] for g in range(groups)]
    folds = user_folds(len(users))
    own = np.asarray(user_group)
    out = {}
    for part, probs, names in (("text", text_probs, GROUP_TEXT_COMPONENTS),
                               ("rating", rating_probs, GROUP_RATING_COMPONENTS)):
        if probs is None:
            out[part] = (None, None, None)
            continue
        mine = [probs[g][j] for j, g in enumerate(own)]
        _, weights = cross_fitted_log_probs(mine, range(len(names)), folds)
        nll = np.stack([[-np.log(p @ weights[f]).sum() for p, f in zip(probs[g], folds)] for g in range(groups)])
        population_logs, _ = cross_fitted_log_probs(mine, range(names.index("group")), folds)   # the components before
        out[part] = (nll, np.array([-lp.sum() for lp in population_logs]), weights)
    return GroupReference(text_nll=out["text"][0], rating_nll=out["rating"][0],
                          population_text_nll=out["text"][1], population_rating_nll=out["rating"][1],
                          text_weights=out["text"][2], rating_weights=out["rating"][2])


def mixture_weights(probs: np.ndarray, iterations: int = 500, tol: float = 1e-10) -> np.ndarray:
    """``(K,)``: the weights ``w`` (non-negative, summing to 1) of the mixture ``probs @ w`` that maximise
    ``sum log(probs @ w)`` over the ``(n, K)`` component probabilities of ``n`` observations, by EM (each step
    raises the likelihood, which is concave in ``w``). Uniform for no observations."""
    probs = np.asarray(probs, dtype=float)
    count = probs.shape[1]
    weights = np.full(count, 1.0 / count)
    if not len(probs):
        return weights
    previous = -np.inf
    for _ in range(iterations):
        mixed = probs @ weights
        likelihood = float(np.log(mixed).sum())
        if likelihood - previous < tol * max(1.0, abs(likelihood)):
            break
        previous = likelihood
        weights = weights * (probs / mixed[:, None]).mean(0)
        weights /= weights.sum()
    return weights


def user_folds(num_users: int) -> np.ndarray:
    """``(U,)``: the fold (0 or 1) of each user for :func:`cross_fitted_log_probs`, by parity of the user index."""
    return np.arange(num_users) % 2


def cross_fitted_log_probs(probs: list[np.ndarray], columns, folds: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Per user, the log-probability ``(n_u,)`` of each held-out observation under the mixture of the components
    ``columns`` whose weights were fitted on the *other* fold's users' observations; and those weights, ``(2, K)``
    (row f: the weights applied to fold f). ``probs``: per user ``(n_u, K_all)`` (:func:`text_component_probs`,
    :func:`rating_component_probs`); ``folds``: ``(U,)`` of 0/1 (:func:`user_folds`)."""
    columns = list(columns)
    weights = np.empty((2, len(columns)))
    for fold in (0, 1):
        fitting = [p[:, columns] for p, f in zip(probs, folds) if f != fold and len(p)]
        weights[fold] = mixture_weights(np.concatenate(fitting) if fitting else np.zeros((0, len(columns))))
    return [np.log(p[:, columns] @ weights[f]) for p, f in zip(probs, folds)], weights


@dataclasses.dataclass
class CountReference:
    """The log-probabilities of every user's held-out items under each of :data:`MODELS`.

    Attributes:
        text_log_probs: ``{model: [per user (n_u,)]}``: of each held-out item's text.
        rating_log_probs: ``{model: [per user (n_u,)]}``: of its rating (empty without ratings).
        text_weights, rating_weights: ``{model: (2, K)}``: each model's mixture weights, row f applied to fold f
            (fitted on the other fold), over its :func:`model_components`.
    """

    text_log_probs: dict
    rating_log_probs: dict
    text_weights: dict
    rating_weights: dict

    @property
    def text_nll(self) -> dict:
        """``{model: (U,)}``: the NLL of each user's held-out texts, summed over their held-out items."""
        return {model: np.array([-lp.sum() for lp in logs]) for model, logs in self.text_log_probs.items()}

    @property
    def rating_nll(self) -> dict:
        """``{model: (U,)}``: the same for their ratings (empty without ratings)."""
        return {model: np.array([-lp.sum() for lp in logs]) for model, logs in self.rating_log_probs.items()}

    def item_gains(self, model: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """``(text, rating)``: per user, ``(n_u,)`` nats the ``model`` gains over the population's on each held-out
        item (the rating part zeros without ratings)."""
        text = [m - p for m, p in zip(self.text_log_probs[model], self.text_log_probs["population"])]
        rating = ([m - p for m, p in zip(self.rating_log_probs[model], self.rating_log_probs["population"])]
                  if self.rating_log_probs else [np.zeros_like(t) for t in text])
        return text, rating

    def gain(self, model: str) -> tuple[np.ndarray, np.ndarray]:
        """``(text, rating)``, ``(U,)`` each: :meth:`item_gains` summed over each user's held-out items."""
        return tuple(np.array([g.sum() for g in part]) for part in self.item_gains(model))


def count_reference(data: HeldOutData) -> CountReference:
    """Every user's held-out items scored by each of :data:`MODELS` (the module's docstring); users without
    held-out items get zeros."""
    folds = user_folds(len(data.held))
    parts = [("text", text_component_probs(data), TEXT_COMPONENTS, 0)]
    if data.remaining_ratings is not None and data.held_ratings is not None:
        parts.append(("rating", rating_component_probs(data), RATING_COMPONENTS, 1))
    logs = {"text": {}, "rating": {}}
    weights = {"text": {}, "rating": {}}
    for part, probs, names, which in parts:
        for model in MODELS:
            columns = [names.index(c) for c in model_components(model)[which]]
            logs[part][model], weights[part][model] = cross_fitted_log_probs(probs, columns, folds)
    return CountReference(text_log_probs=logs["text"], rating_log_probs=logs["rating"], text_weights=weights["text"],
                          rating_weights=weights["rating"])


def gains_by_gap(reference: CountReference, data: HeldOutData, gap: float = SESSION_GAP) -> dict | None:
    """Each user model's gain over the population model per held-out item (text and rating together), for the items
    rated within ``gap`` seconds of the user's newest remaining item (``within``: mostly the same rating session)
    and the others (``after``): ``{model: {"within" | "after": {"items", "gain_per_item"}}}``, means over items.
    None without timestamps (``data.held_gaps``)."""
    if data.held_gaps is None:
        return None
    within = np.concatenate([np.asarray(g) < gap for g in data.held_gaps]) if data.held_gaps else np.zeros(0, bool)
    out = {}
    for model in MODELS[1:]:
        text, rating = reference.item_gains(model)
        gain = np.concatenate(text) + np.concatenate(rating)
        out[model] = {name: {"items": int(mask.sum()), "gain_per_item": float(gain[mask].mean()) if mask.any() else None}
                      for name, mask in (("within", within), ("after", ~within))}
    return out
