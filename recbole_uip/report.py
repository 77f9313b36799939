"""Is a profile informative? Measures on the leak-free training split, shared by benchmarks and reports.

* :func:`group_similarity_test`: do users who share an ID have more similar training histories than random
  groups of the same sizes? (a permutation test over the IDs: group sizes stay fixed).
* :func:`normalized_mutual_information`: agreement between profile IDs and any other user attribute.
* :func:`kmeans_ids`: the cheap baselines' IDs (k-means over any per-user vectors, e.g. genre histograms or
  the LLM's pooled hidden states without prompt tuning).
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import torch

from recbole_uip.inference.codebook import ProfileCodebook


@dataclasses.dataclass(frozen=True)
class SimilarityTest:
    """Mean within-group cosine similarity of users' histories, observed and under random regrouping."""

    observed: float
    random_mean: float
    random_std: float
    p_value: float          # share of random regroupings at least as similar as observed (add-one smoothed)

    @property
    def z_score(self) -> float:
        return (self.observed - self.random_mean) / max(self.random_std, 1e-12)


def cosine_matrix(vectors: np.ndarray) -> np.ndarray:
    """``(U, F)`` per-user vectors -> ``(U, U)`` cosine similarities."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = vectors / np.clip(norms, 1e-12, None)
    return unit @ unit.T


def within_group_similarity(similarity: np.ndarray, groups: np.ndarray) -> float:
    """Mean over users of their mean similarity to the *other* members of their group (singletons skipped)."""
    groups = np.asarray(groups)
    onehot = (groups[:, None] == np.unique(groups)[None, :]).astype(np.float64)     # (U, G)
    same_sum = ((similarity @ onehot) * onehot).sum(1) - np.diag(similarity)        # sum over same-group others
    sizes = onehot.sum(0)[np.searchsorted(np.unique(groups), groups)] - 1
    keep = sizes > 0
    return float((same_sum[keep] / sizes[keep]).mean())


def group_similarity_test(similarity: np.ndarray, groups: np.ndarray, permutations: int = 1000, seed: int = 0) -> SimilarityTest:
    rng = np.random.default_rng(seed)
    observed = within_group_similarity(similarity, groups)
    random = np.array([within_group_similarity(similarity, rng.permutation(groups)) for _ in range(permutations)])
    p_value = (1 + (random >= observed).sum()) / (1 + permutations)
    return SimilarityTest(observed, float(random.mean()), float(random.std()), float(p_value))


def normalized_mutual_information(a, b) -> float:
    """NMI (arithmetic normalisation) between two labelings of the same users; 0 independent, 1 identical."""
    a, b = list(map(str, a)), list(map(str, b))
    n = len(a)
    joint = Counter(zip(a, b))
    pa, pb = Counter(a), Counter(b)
    mi = sum(c / n * np.log(c * n / (pa[x] * pb[y])) for (x, y), c in joint.items())
    ha = -sum(c / n * np.log(c / n) for c in pa.values())
    hb = -sum(c / n * np.log(c / n) for c in pb.values())
    return float(2 * mi / (ha + hb)) if ha + hb > 0 else 0.0


def kmeans_ids(vectors: np.ndarray, k: int, iterations: int = 50, seed: int = 0, standardise: bool = True) -> np.ndarray:
    """k-means (k-means++ start, dead-code restart) over ``(U, F)`` vectors; the cheap baselines' IDs ``(U,)``."""
    x = torch.as_tensor(vectors, dtype=torch.float32)
    if standardise:
        x = (x - x.mean(0)) / x.std(0).clamp(min=1e-6)
    codebook = ProfileCodebook(k, x.shape[1])
    assignment, _ = codebook.fit(x, iterations, torch.Generator().manual_seed(seed))
    return assignment.numpy()


def training_histories(config, users: list[str]):
    """Per-user item incidence ``(U, I)`` and genre-like histogram ``(U, F)`` of the training split, rows in
    ``users`` order. The histogram counts the values of every token_seq/token field of ``.item`` except titles."""
    from recbole_uip.data.behaviour import build_training_split

    dataset, train = build_training_split(config)
    uid, iid = dataset.uid_field, dataset.iid_field
    row_of = {u: r for r, u in enumerate(users)}
    user_tokens = dataset.id2token(uid, train.inter_feat[uid].numpy())
    items = train.inter_feat[iid].numpy()
    incidence = np.zeros((len(users), dataset.item_num), dtype=np.float32)
    for user, item in zip(user_tokens, items):
        if user in row_of:
            incidence[row_of[user], item] = 1.0
    return incidence, dataset


def attribute_histogram(incidence: np.ndarray, dataset, field: str) -> np.ndarray:
    """``(U, V)``: how often each value of the item token_seq field ``field`` occurs in a user's history."""
    values = dataset.item_feat[field].numpy()                          # (I, L) padded token ids
    n_values = len(dataset.field2id_token[field])
    item_hist = np.zeros((values.shape[0], n_values), dtype=np.float32)
    for item, row in enumerate(values):
        for v in np.atleast_1d(row):
            if v > 0:
                item_hist[item, v] += 1
    return incidence @ item_hist
