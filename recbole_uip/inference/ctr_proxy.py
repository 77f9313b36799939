"""A cheap CTR-facing score of profile IDs, from the training split alone: how well the IDs, computed from part of
each user's training history, predict the labels of the rest.

Why: on ml-100k the validation likelihood, significant or not, was a poor guide to what helps the CTR models (a
step that was noise for the likelihood made the IDs better by 0.0035 AUC over 8 models; docs/experiment_log.md).
``uip_line_search_criterion: ctr`` therefore chooses the encoder's step length by this score instead; the step's
*direction* is still the likelihood's gradient. Departs from the paper, which has no such selection.

The split: each user's training interactions, a random :data:`HELD_OUT_SHARE` of them held out (at least one kept),
as RecBole's ``RO`` split draws its test interactions at random. The IDs a candidate encoder gives are computed from
the kept part only (the trainer quantises the kept part's offsets). The predictor has no training step, so scoring
a candidate costs a few bincounts: for a held-out ``(u, i)``,

``score = m_i + sum_p (m_{c_p(u), i} - m_i)``,

with ``m_i`` the item's kept label mean and ``m_{c, i}`` the mean over the kept interactions with ``i`` of the users
whose profile ``p`` has the code ``c``, each shrunk towards the level above it (the global mean, then ``m_i``) by
:data:`PRIOR` pseudo-interactions. The score is the AUC of these scores against the held-out labels (labels:
``rating >= threshold``, RecBole's ``threshold`` semantics). The ``sum_p`` term helps only where users with the same ID
agree about an item beyond its popularity; IDs that group users at random add noise and score below one ID for all.

Is it a fair stand-in for the CTR models? ``benchmarks/ctr_proxy_check.py`` scores every ID set of a model-zoo grid
beside the grid's test AUC: on three ml-100k grids (8 CTR models x 3 seeds each; trained IDs, both controls, k-means
over ``z``, genre k-means, shuffled IDs) the two orders agree exactly (results/ml-100k/*/ctr_proxy_check.md).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
from scipy.stats import rankdata

from recbole_uip.data.behaviour import TrainingHistories

HELD_OUT_SHARE = 0.2      # of each user's training interactions, held out of what the IDs are computed from
PRIOR = 10.0              # pseudo-interactions that shrink an (ID, item) mean towards the item's, and it towards all


@dataclasses.dataclass
class HeldOutLabels:
    """The proxy's split of the training interactions.

    Attributes:
        kept: per user, int64 positions (into their history) the IDs are computed from.
        kept_users, kept_items: int64 ``(n_k,)`` rows of the users and items of the kept interactions.
        kept_labels: float64 ``(n_k,)`` their labels (1.0 or 0.0).
        held_users, held_items, held_labels: the same for the held-out interactions ``(n_h,)``.
        num_items: the number of items (``items`` index ``[0, num_items)``).
    """

    kept: list[np.ndarray]
    kept_users: np.ndarray
    kept_items: np.ndarray
    kept_labels: np.ndarray
    held_users: np.ndarray
    held_items: np.ndarray
    held_labels: np.ndarray
    num_items: int

    @classmethod
    def split(cls, histories: TrainingHistories, threshold: float, seed: int) -> "HeldOutLabels":
        """Hold out :data:`HELD_OUT_SHARE` of every user's interactions at random (seeded), keeping at least one."""
        if histories.ratings is None:
            raise ValueError("The CTR criterion labels interactions by their rating (rating >= threshold); this "
                             "dataset's histories have no rating field. Use uip_line_search_criterion: likelihood.")
        rng = np.random.default_rng([seed, 0xC7])
        kept, parts = [], {"kept": ([], [], []), "held": ([], [], [])}
        for u, (items, ratings) in enumerate(zip(histories.items, histories.ratings)):
            held = rng.random(len(items)) < HELD_OUT_SHARE
            if held.all():
                held[rng.integers(len(items))] = False
            kept.append(np.flatnonzero(~held))
            for name, mask in (("kept", ~held), ("held", held)):
                users, item_rows, labels = parts[name]
                users.append(np.full(int(mask.sum()), u, dtype=np.int64))
                item_rows.append(np.asarray(items, dtype=np.int64)[mask])
                labels.append((np.asarray(ratings, dtype=np.float64)[mask] >= threshold).astype(np.float64))
        (ku, ki, kl), (hu, hi, hl) = ([np.concatenate(x) for x in parts[name]] for name in ("kept", "held"))
        if len(np.unique(hl)) < 2:
            raise ValueError(f"The CTR criterion needs held-out interactions of both labels; with the threshold "
                             f"{threshold:g} every held-out rating falls on one side. Check uip_ctr_label_threshold.")
        return cls(kept, ku, ki, kl, hu, hi, hl, len(histories.item_ids))

    @functools.cached_property
    def held_item_means(self) -> np.ndarray:
        """``(n_h,)`` float64: each held-out interaction's item mean ``m_i`` over the kept labels (shrunk towards
        their global mean), the same for every candidate's IDs, so computed once."""
        overall = self.kept_labels.mean()
        item_sum = np.bincount(self.kept_items, self.kept_labels, minlength=self.num_items)
        item_count = np.bincount(self.kept_items, minlength=self.num_items)
        item_mean = (item_sum + PRIOR * overall) / (item_count + PRIOR)                           # (I,)
        return item_mean[self.held_items]

    def auc(self, codes: np.ndarray) -> float:
        """The held-out AUC of the predictor above for the IDs ``codes`` int ``(U, P)`` (every user's, computed
        from their kept interactions)."""
        base = self.held_item_means
        score = base.copy()
        for p in range(codes.shape[1]):
            code = np.asarray(codes[:, p], dtype=np.int64)
            size = int(code.max()) + 1
            key = code[self.kept_users] * self.num_items + self.kept_items
            pair_sum = np.bincount(key, self.kept_labels, minlength=size * self.num_items)
            pair_count = np.bincount(key, minlength=size * self.num_items)
            held_key = code[self.held_users] * self.num_items + self.held_items
            score += (pair_sum[held_key] + PRIOR * base) / (pair_count[held_key] + PRIOR) - base
        return _auc(self.held_labels, score)


def format_ctr_auc(step: float | dict, ctr_auc: dict) -> str:
    """The held-out AUC at the step taken and without a step: ``"0.7338 (no step 0.7226)"``; per profile
    (``step`` and ``ctr_auc`` dicts by profile name, as ``uip_line_search: per_profile`` records them) joined by
    commas. Keys may be floats or, read back from a bank's JSON, strings."""
    if isinstance(step, dict):
        return ", ".join(f"{name} {format_ctr_auc(step[name], ctr_auc[name])}" for name in step)
    by_length = {float(length): value for length, value in ctr_auc.items()}
    return f"{by_length[float(step)]:.4f} (no step {by_length[0.0]:.4f})"


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (ties count one half): the Mann-Whitney statistic over the positives and negatives."""
    ranks = rankdata(scores)
    positives = labels > 0.5
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
