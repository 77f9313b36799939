"""Is a profile informative? Measures on the leak-free training split, shared by benchmarks and reports.

* :func:`group_similarity_test`: do users who share an ID have more similar training histories than random
  groups of the same sizes? (a permutation test over the IDs: group sizes stay fixed).
* :func:`normalized_mutual_information`: agreement between profile IDs and any other user attribute.
* :func:`explained_variance`: how much of a per-user quantity (e.g. the mean training rating,
  :func:`training_sequences`) a grouping explains (eta squared).
* :func:`kmeans_ids`: the cheap baselines' IDs (k-means over any per-user vectors, e.g. genre histograms or
  the LLM's pooled hidden states without prompt tuning).
* :func:`profile_report` / :func:`render_profile_report`: what each ID means, per inference run: code usage and
  perplexity (:func:`usage_and_perplexity`), NMI with every other user attribute against shuffled IDs
  (:func:`nmi_permutation_test`, :func:`user_attribute_labels`), and the items and item attribute values most
  over-represented among each ID's users (:func:`lift_table`).
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import torch

from recbole_uip.inference.codebook import ProfileCodebook
from recbole_uip.inference.ctr_proxy import format_ctr_auc
from recbole_uip.inference.gradient_agreement import format_step_z


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


def explained_variance(values: np.ndarray, groups: np.ndarray) -> float:
    """Share of the variance of ``values (U,)`` explained by the group means of ``groups (U,)`` (eta squared)."""
    total = ((values - values.mean()) ** 2).sum()
    within = sum(((values[groups == g] - values[groups == g].mean()) ** 2).sum() for g in np.unique(groups))
    return float(1 - within / total)


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


def training_sequences(dataset, train, users: list[str]) -> tuple[list[list[int]], np.ndarray | None]:
    """One pass over the training split ``train`` of ``dataset`` (``build_training_split``): per user (rows in
    ``users`` order) the item ids, oldest first, and ``(U,)`` the user's mean rating (``None`` without a rating
    field)."""
    inter = train.inter_feat
    user_tokens = dataset.id2token(dataset.uid_field, inter[dataset.uid_field].numpy())
    items = inter[dataset.iid_field].numpy()
    times = inter[dataset.time_field].numpy() if dataset.time_field in inter else np.arange(len(items))
    rating_field = dataset.config["RATING_FIELD"]
    ratings = inter[rating_field].numpy().astype(np.float64) if rating_field in inter else None
    row_of = {u: r for r, u in enumerate(users)}
    sequences: list[list[int]] = [[] for _ in users]
    total, count = np.zeros(len(users)), np.zeros(len(users))
    for k in np.lexsort((np.arange(len(items)), times, user_tokens)):   # per user, oldest first
        row = row_of.get(user_tokens[k])
        if row is not None:
            sequences[row].append(int(items[k]))
            count[row] += 1
            if ratings is not None:
                total[row] += ratings[k]
    return sequences, (total / np.clip(count, 1, None) if ratings is not None else None)


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


def attribute_shares(histogram: np.ndarray) -> np.ndarray:
    """``(U, V)``: each row of an attribute histogram as shares of that user's attribute mentions."""
    return histogram / np.clip(histogram.sum(1, keepdims=True), 1, None)


def rating_statistics(config, settings, users: list[str]) -> np.ndarray:
    """The user vector's single statistics alone, no item at all: generosity, spread of ratings and activity
    (:class:`UserFeatureMap`'s last columns), standardised over the training users. ``(U, 3)`` (``(U, 1)``:
    activity, where the text has no rating), rows in ``users`` order (zeros for users without history)."""
    from recbole_uip.data.behaviour import collect_training_histories, resolve_text_fields
    from recbole_uip.inference.user_features import UserFeatureMap
    from recbole_uip.recbole_config import check_dataset_files

    histories = collect_training_histories(config, settings, resolve_text_fields(config, settings, check_dataset_files(config)))
    items = torch.zeros(len(histories.item_ids), 1)          # no item information
    feature_map = UserFeatureMap.fit(items, histories.items, histories.ratings, 1, settings.history_prior)
    x = feature_map.raw(items, histories.items, histories.ratings)[:, -feature_map.num_scalars:]
    x = ((x - x.mean(0)) / x.std(0).clamp(min=1e-6)).numpy()
    return _in_user_order(x, histories.users, users)


def _in_user_order(values: np.ndarray, owners: list[str], users: list[str]) -> np.ndarray:
    """Rows of ``values (len(owners), F)`` reordered to ``users``; zeros for a user ``owners`` lacks (no history)."""
    row_of = {user: r for r, user in enumerate(owners)}
    return np.stack([values[row_of[u]] if u in row_of else np.zeros(values.shape[1], dtype=values.dtype) for u in users])


def attribute_user_vectors(config, settings, users: list[str]) -> np.ndarray:
    """The no-LLM twin of the encoder's input: each user's ``z`` built exactly as :class:`UserFeatureMap` builds
    it (items, ratings, prior, standardisation, whitening), from multi-hot item-attribute vectors (ml-100k: the
    genres) instead of the LLM's item embeddings. ``(U, k)``, rows in ``users`` order. Quantised, it isolates what
    the LLM adds to the profile IDs.

    Raises:
        ValueError: the dataset has no item attribute field besides the title.
    """
    from recbole_uip.data.atomic import read_atomic
    from recbole_uip.data.behaviour import collect_training_histories, resolve_text_fields
    from recbole_uip.inference.user_features import UserFeatureMap
    from recbole_uip.recbole_config import check_dataset_files

    files = check_dataset_files(config)
    fields = resolve_text_fields(config, settings, files)
    table = read_atomic(files["item"], config["field_separator"], config["encoding"])
    attribute = next((f for f in fields.item_fields[1:] if table.field_type(f).startswith("token")), None)
    if attribute is None:
        raise ValueError(f"{config['dataset']}: no item attribute field besides the title for the no-LLM user vectors.")
    histories = collect_training_histories(config, settings, fields)
    values_of = dict(zip(table.column(config["ITEM_ID_FIELD"]), table.column(attribute)))
    tokens = [str(values_of.get(item, "")).split(config["seq_separator"]) for item in histories.item_ids]
    vocabulary = {v: i for i, v in enumerate(sorted({v for t in tokens for v in t if v}))}
    items = torch.zeros(len(tokens), len(vocabulary))
    for row, values in enumerate(tokens):
        for value in values:
            if value:
                items[row, vocabulary[value]] = 1.0
    feature_map = UserFeatureMap.fit(items, histories.items, histories.ratings, settings.encoder_dims, settings.history_prior)
    z = feature_map(items, histories.items, histories.ratings).numpy()
    return _in_user_order(z, histories.users, users)


# --------------------------------------------------------------------------------------------------------------
# Profile report: what does each ID mean? (code usage, agreement with user attributes, typical items/attributes)
# --------------------------------------------------------------------------------------------------------------


def usage_and_perplexity(ids, num_codes: int) -> tuple[np.ndarray, float]:
    """How many users hold each of ``num_codes`` IDs, and the perplexity ``exp(entropy)`` of that usage.

    The perplexity is the effective number of IDs in use: ``num_codes`` when every ID is equally common, 1 when
    one ID holds every user.

    Example:
        >>> usage_and_perplexity([0, 0, 1, 1], 3)
        (array([2, 2, 0]), 2.0)
    """
    counts = np.bincount(np.asarray(ids, dtype=np.int64), minlength=num_codes)
    share = counts[counts > 0] / counts.sum()
    return counts, float(np.exp(-(share @ np.log(share))))


@dataclasses.dataclass(frozen=True)
class NMITest:
    """NMI between IDs and an attribute, with the reference of the same IDs shuffled across users."""

    nmi: float
    shuffled_mean: float    # mean NMI over random permutations of the IDs (what chance alone gives)
    shuffled_std: float
    p_value: float          # share of permutations with NMI >= observed (add-one smoothed)


def nmi_permutation_test(ids, values, permutations: int = 200, seed: int = 0) -> NMITest:
    """NMI of ``ids`` with ``values`` (same users, same order) against the IDs permuted across users.

    NMI is biased upwards for small groups and many values; the shuffled reference keeps the group sizes and
    the value counts, so ``nmi - shuffled_mean`` is what the IDs share with the attribute beyond chance.
    """
    ids = np.asarray([str(v) for v in ids])
    values = [str(v) for v in values]
    if len(ids) != len(values):
        raise ValueError(f"ids ({len(ids)}) and values ({len(values)}) must describe the same users.")
    rng = np.random.default_rng(seed)
    observed = normalized_mutual_information(ids, values)
    shuffled = np.array([normalized_mutual_information(rng.permutation(ids), values) for _ in range(permutations)])
    p_value = (1 + (shuffled >= observed - 1e-12).sum()) / (1 + permutations)
    return NMITest(observed, float(shuffled.mean()), float(shuffled.std()), float(p_value))


def bucket_numeric(values, edges) -> list[str]:
    """Labels of numeric ``values`` by the half-open buckets ``[edges[i], edges[i+1])``.

    Values below the first edge go to ``<e0``, values at or above the last to ``>=eN``; values that are not
    numbers (missing, free text) are labelled ``unknown``.

    Example:
        >>> bucket_numeric(["17", "18", "30", "61", ""], [18, 25, 60])
        ['<18', '18-24', '25-59', '>=60', 'unknown']
    """
    edges = sorted(float(e) for e in edges)
    labels = []
    for value in values:
        try:
            number = float(value)
        except (TypeError, ValueError):
            labels.append("unknown")
            continue
        if np.isnan(number):
            labels.append("unknown")
        elif number < edges[0]:
            labels.append(f"<{edges[0]:g}")
        elif number >= edges[-1]:
            labels.append(f">={edges[-1]:g}")
        else:
            i = int(np.searchsorted(edges, number, side="right")) - 1
            upper = edges[i + 1]
            top = f"{upper - 1:g}" if float(upper).is_integer() and float(edges[i]).is_integer() else f"{upper:g}"
            labels.append(f"{edges[i]:g}-{top}")
    return labels


def quantile_edges(values, buckets: int = 5) -> list[float]:
    """Inner edges that cut numeric ``values`` into about ``buckets`` equally populated buckets (integers when
    the values are integers); non-numeric values are ignored."""
    numbers = []
    for value in values:
        try:
            numbers.append(float(value))
        except (TypeError, ValueError):
            continue
    numbers = np.array([n for n in numbers if not np.isnan(n)])
    if len(numbers) == 0:
        return []
    edges = np.quantile(numbers, np.linspace(0, 1, buckets + 1)[1:-1])
    if np.all(numbers == np.round(numbers)):
        edges = np.ceil(edges)
    return sorted(set(float(e) for e in edges))


def user_attribute_labels(table, user_field: str, users: list[str], max_values: int = 50, buckets: int = 5) -> dict:
    """Every other user attribute of a ``.user`` table as one label per user in ``users`` order.

    * token fields with at most ``max_values`` distinct values are used as they are (gender, occupation);
    * fields whose values are all numbers and that have more values (age) are cut into ``buckets`` quantile
      buckets of the whole file, labelled by range;
    * other fields (zip codes, free text) are skipped: their NMI would only measure how finely they split users.

    Returns:
        ``{field: (labels, how)}`` where ``how`` says what was done (``"as is"``, ``"quantile buckets ..."``), and
        ``{field: reason}`` under the key ``"_skipped"``.
    """
    row_of = {row[table.fields.index(user_field)]: row for row in table.rows}
    out: dict = {"_skipped": {}}
    for index, field in enumerate(table.fields):
        if field == user_field or field.startswith("uip_"):
            continue
        column = [row[index] for row in table.rows]           # the attribute's nature: judged on the whole file
        values = [row_of[u][index] if u in row_of else "" for u in users]
        distinct = set(column)
        numeric = all(_is_number(v) for v in distinct if v != "")
        if table.types[index] == "token" and len(distinct) <= max_values:
            out[field] = (values, "as is")
        elif numeric and table.types[index] in ("token", "float"):
            edges = quantile_edges(column, buckets)
            out[field] = (bucket_numeric(values, edges) if edges else values,
                          f"{len(edges) + 1} quantile buckets (edges {', '.join(f'{e:g}' for e in edges)})")
        else:
            out["_skipped"][field] = f"{len(distinct)} distinct {table.types[index]} values"
    return out


def _is_number(value: str) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


@dataclasses.dataclass(frozen=True)
class TypicalValue:
    """One item or attribute value that is typical of an ID group."""

    label: str
    count: int             # interactions of the group's users with it (training split)
    group_share: float     # its share of the group's interactions
    overall_share: float   # its share of all users' interactions
    lift: float            # group_share / overall_share: > 1 means over-represented in the group


def lift_table(ids, counts: np.ndarray, labels: list[str], top: int = 5, min_count: int = 5,
               min_lift: float = 1.0) -> dict[int, list[TypicalValue]]:
    """Per ID, the columns of ``counts`` most over-represented among the users holding that ID.

    Args:
        ids: ``(U,)`` the ID of each user.
        counts: ``(U, F)`` per-user counts (item incidence, or a genre histogram) from the training split.
        labels: ``F`` names of the columns (item titles, genre names).
        top: how many values to keep per ID.
        min_count: ignore values the group touched fewer than this many times (a lift from 1 or 2
            interactions is noise).
        min_lift: keep only values whose lift exceeds this (1.0: over-represented in the group).

    Returns:
        ``{id: [TypicalValue, ...]}`` ordered by lift (then count), for every ID that holds at least one user.
    """
    ids = np.asarray(ids)
    counts = np.asarray(counts, dtype=np.float64)
    if counts.shape != (len(ids), len(labels)):
        raise ValueError(f"counts has shape {counts.shape}, expected ({len(ids)}, {len(labels)}).")
    overall = counts.sum(0)
    overall_share = overall / max(overall.sum(), 1e-12)
    table = {}
    for group in np.unique(ids):
        group_counts = counts[ids == group].sum(0)
        total = group_counts.sum()
        if total <= 0:
            table[int(group)] = []
            continue
        share = group_counts / total
        lift = np.divide(share, overall_share, out=np.zeros_like(share), where=overall_share > 0)
        eligible = np.flatnonzero((group_counts >= min_count) & (lift > min_lift))
        order = eligible[np.lexsort((-group_counts[eligible], -lift[eligible]))][:top]
        table[int(group)] = [TypicalValue(labels[i], int(group_counts[i]), float(share[i]), float(overall_share[i]),
                                          float(lift[i])) for i in order]
    return table


def item_labels(dataset, item_table=None, title_field: str | None = None) -> list[str]:
    """A readable name for every internal item id: the ``title_field`` value from the ``.item`` file when given,
    else the raw item token."""
    tokens = [str(t) for t in dataset.field2id_token[dataset.iid_field]]
    if item_table is None or title_field not in item_table.fields or dataset.iid_field not in item_table.fields:
        return tokens
    title_of = dict(zip(item_table.column(dataset.iid_field), item_table.column(title_field)))
    return [title_of.get(token, token) for token in tokens]


def item_attribute_field(dataset, item_text_fields) -> str | None:
    """The item field used for attribute histograms: the first token/token_seq text field after the title
    (``class``, the genres, on ml-100k), or None when the dataset has none."""
    fields = [f for f in (item_text_fields or []) if f in dataset.item_feat and
              dataset.field2type[f].value.startswith("token")]
    title = (item_text_fields or [None])[0]
    return next((f for f in fields if f != title), None)


def encoder_column_weights(weights: np.ndarray) -> np.ndarray:
    """How much each column of ``z`` counts in the distances between users' offsets, per profile.

    Args:
        weights: the encoder ``A`` ``(P, D, k)``; a user's offset is ``A[p] @ z (D,)``.

    Returns:
        ``(P, k)``: the diagonal of ``A[p]^T A[p]`` over its mean. The Euclidean distance between two users'
        offsets is ``|A[p] (z - z')|``, so a column with weight 4 counts twice as far as one with weight 1. The
        untrained encoder's columns are orthonormal (times one scale): every weight is 1.
    """
    a = np.asarray(weights, dtype=np.float64)
    diagonal = np.einsum("pdk,pdk->pk", a, a)                                      # (P, k)
    return diagonal / diagonal.mean(axis=1, keepdims=True).clip(min=1e-300)


def profile_report(config, settings, bank, user_table=None, item_table=None, groupings: dict | None = None,
                   top: int = 8, permutations: int = 200) -> dict:
    """Everything a person needs to read what the profile IDs of one inference run mean.

    Args:
        config: the RecBole ``Config`` the bank was inferred with (its training split is used).
        settings: the run's ``UIPSettings``.
        bank: the ``FeatureBank``.
        user_table: the dataset's ``.user`` file as an ``AtomicTable`` (None when the dataset has none).
        item_table: the dataset's ``.item`` file as an ``AtomicTable``: items are named by their first text field
            (the title) even when the run does not load it; None names them by their ID.
        groupings: optional extra ``{name: (ids (U,), num_codes)}`` (e.g. the cheap baselines) for the usage and
            NMI tables, so UIP can be read next to them.
        top: typical items and attribute values kept per ID.
        permutations: shuffles behind each NMI reference.

    Returns:
        a JSON-serialisable dict; :func:`render_profile_report` turns it into Markdown.
    """
    incidence, dataset = training_histories(config, bank.users)
    sizes = settings.codebook_sizes
    profiles = {f"UIP {name}": (bank.codes[:, p], sizes[name]) for p, name in enumerate(bank.profiles)}
    all_groupings = {**profiles, **(groupings or {})}
    report: dict = {"dataset": config["dataset"], "users": len(bank.users), "llm": settings.llm,
                    "profiles": list(bank.profiles), "codebook_sizes": dict(sizes), "fingerprint": bank.fingerprint,
                    "inference_seconds": bank.metadata.get("seconds"), "usage": {}, "nmi": {}, "typical": {}}
    for name, (ids, k) in all_groupings.items():
        counts, perplexity = usage_and_perplexity(ids, k)
        report["usage"][name] = {"counts": counts.tolist(), "perplexity": perplexity, "num_codes": k}
    if bank.encoder is not None and settings.quantiser_metric == "euclidean":    # whitened: every direction alike
        column_weights = encoder_column_weights(bank.encoder.weights)
        report["encoder_weights"] = {"columns": bank.encoder.feature_map.column_names,
                                     "profiles": {name: column_weights[p].tolist()
                                                  for p, name in enumerate(bank.profiles)}}
    steps = encoder_steps(bank.metadata.get("history", []))
    if steps:
        report["encoder_steps"] = steps
    if len(bank.profiles) > 1:
        report["nmi_between_profiles"] = normalized_mutual_information(bank.codes[:, 0], bank.codes[:, 1])
    if user_table is not None:
        attributes = user_attribute_labels(user_table, config["USER_ID_FIELD"], bank.users)
        report["attributes_skipped"] = attributes.pop("_skipped")
        report["attributes"] = {field: how for field, (_, how) in attributes.items()}
        for field, (labels, _) in attributes.items():
            report["nmi"][field] = {name: dataclasses.asdict(nmi_permutation_test(ids, labels, permutations))
                                    for name, (ids, _) in all_groupings.items()}
    item_names = item_labels(dataset, item_table, (settings.item_text_fields or [None])[0])
    attr_field = item_attribute_field(dataset, settings.item_text_fields)
    report["attribute_field"] = attr_field
    attr_hist = attribute_histogram(incidence, dataset, attr_field) if attr_field else None
    attr_names = [str(t) for t in dataset.field2id_token[attr_field]] if attr_field else []
    for name, (ids, _) in profiles.items():
        items = lift_table(ids, incidence, item_names, top=top, min_count=10)
        attrs = lift_table(ids, attr_hist, attr_names, top=top, min_count=20) if attr_hist is not None else {}
        counts = np.bincount(ids, minlength=sizes[name.split(" ", 1)[1]])
        report["typical"][name] = {
            str(code): {"users": int(counts[code]),
                        "items": [dataclasses.asdict(v) for v in items.get(code, [])],
                        "attributes": [dataclasses.asdict(v) for v in attrs.get(code, [])]}
            for code in range(len(counts)) if counts[code] > 0}
    return report


def best_gain_along_step(tried: dict) -> float | None:
    """The most the validation objective could fall along a line search's direction, from the quadratic
    ``f(t) - f(0) = -g t + a t^2`` through its two shortest non-zero candidate lengths: ``g^2 / 4a`` where the
    direction descends (``g > 0``) and curves up (``a > 0``), else 0; None with fewer than two candidates. On ml-100k
    the candidates 0.003 and 0.01 sit where the objective is already nearly quadratic, so this says whether a
    shorter step than any tried could have helped, and by how much."""
    values = {float(t): v for t, v in tried.items()}       # a bank's JSON history keys them by strings
    lengths = sorted(t for t in values if t > 0)[:2]
    if len(lengths) < 2:
        return None
    (t1, t2), (f1, f2) = lengths, (values[lengths[0]] - values[0.0], values[lengths[1]] - values[0.0])
    slope, curvature = np.linalg.solve(np.array([[-t1, t1 * t1], [-t2, t2 * t2]]), np.array([f1, f2]))
    return float(slope * slope / (4 * curvature)) if slope > 0 and curvature > 0 else 0.0


def encoder_steps(history: list[dict]) -> list[dict]:
    """From an inference's round records (``bank.metadata["history"]``), per round with a line search: the step
    taken (a dict of one per profile with ``uip_line_search: per_profile``), its validation gain, the most a step
    along its direction could gain (:func:`best_gain_along_step`; per profile, their sum), how many standard errors
    its gain stands above 0 (``z``, as :func:`~recbole_uip.inference.gradient_agreement.format_step_z` prints it;
    ``?`` for banks made before it was recorded), the held-out AUC of the IDs at the step and without one where
    ``uip_line_search_criterion: ctr`` chose it (``ids_auc``, else None) and per profile the
    split-half agreement of the gradient it followed (:mod:`recbole_uip.inference.gradient_agreement`; empty for
    banks made before it was recorded)."""
    def best(search: dict):
        tried = search.get("tried")
        if not tried:
            return None
        if "steps" in search:                              # per profile: each profile's direction in turn
            return sum(best_gain_along_step(t) or 0.0 for t in tried.values())
        return best_gain_along_step(tried)

    return [{"round": h["round"], "step": h["line_search"].get("steps", h["line_search"]["step"]),
             "gain": h["line_search"].get("gain", 0.0), "best_gain": best(h["line_search"]),
             "z": format_step_z(h["line_search"].get("steps", h["line_search"]["step"]), h["line_search"]["gain_z"],
                                h["line_search"]["best_z"]) if "gain_z" in h["line_search"] else "?",
             "agreement": {name: {k: a[k] for k in ("cosine", "signal_share")}
                           for name, a in (h["line_search"].get("gradient_agreement") or {}).items()},
             "ids_auc": format_ctr_auc(h["line_search"].get("steps", h["line_search"]["step"]),
                                       h["line_search"]["ctr_auc"]) if "ctr_auc" in h["line_search"] else None}
            for h in history if h.get("line_search")]


def render_profile_report(report: dict, header: str = "") -> str:
    """Markdown of :func:`profile_report`'s dict."""
    lines = [f"# Profile report ({report['dataset']})", ""]
    if header:
        lines += [header, ""]
    lines += [f"LLM `{report['llm']}`, profiles {report['profiles']}, codebook sizes {report['codebook_sizes']}, "
              f"{report['users']} users with training history, bank fingerprint `{report['fingerprint'][:12]}`"
              + (f", inferred in {report['inference_seconds']} s" if report.get("inference_seconds") else "")
              + ". Every measure uses the training split only.", "",
              "## Code usage", "", "Users per ID; perplexity = exp(entropy of the usage), the effective number of IDs "
              "in use (the maximum is the number of IDs).", "", "| grouping | IDs | users per ID | perplexity |",
              "|---|---|---|---|"]
    for name, usage in report["usage"].items():
        lines.append(f"| {name} | {usage['num_codes']} | {usage['counts']} | {usage['perplexity']:.2f} |")
    if report.get("nmi_between_profiles") is not None:
        lines += ["", f"NMI between the profiles' IDs: {report['nmi_between_profiles']:.3f}."]
    if report.get("nmi"):
        fields = list(report["nmi"])
        lines += ["", "## Mutual information with the dataset's own user attributes", "",
                  "NMI (arithmetic normalisation) between the IDs and each attribute; in parentheses the mean NMI of "
                  "the same IDs shuffled across users (chance level for these group sizes) and the permutation p-value. "
                  "Attributes: " + "; ".join(f"{f}: {how}" for f, how in report["attributes"].items())
                  + (". Skipped: " + "; ".join(f"{f} ({why})" for f, why in report["attributes_skipped"].items())
                     if report.get("attributes_skipped") else "") + ".", "",
                  "| grouping | " + " | ".join(fields) + " |", "|---|" + "---|" * len(fields)]
        for name in report["nmi"][fields[0]]:
            cells = [f"{report['nmi'][f][name]['nmi']:.4f} ({report['nmi'][f][name]['shuffled_mean']:.4f}, "
                     f"p={report['nmi'][f][name]['p_value']:.3f})" for f in fields]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if report.get("encoder_weights"):
        columns = report["encoder_weights"]["columns"]
        lines += ["", "## What the codebooks weigh", "",
                  "How much each column of the encoder input `z` counts in the distances the codebooks measure: the "
                  "diagonal of `A^T A` over its mean, `A` the encoder (`pc1`, ...: the principal directions of the "
                  "user's item embeddings and rating-weighted item embeddings; then the rating statistics). The "
                  "untrained encoder weighs every column 1; only the likelihood training's encoder steps change "
                  "that.", "", "| profile | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        for name, values in report["encoder_weights"]["profiles"].items():
            lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    if report.get("encoder_steps"):
        names = report["profiles"]
        lines += ["", "## The encoder's steps", "",
                  "Per EM round, the step the line search took along the encoder's gradient accumulated over the "
                  "M-step (relative to the mean token-embedding norm; 0: none) and what it gained on the validation "
                  "users' objective, and the most a step along that direction could have gained (a quadratic "
                  "through the two shortest lengths tried: `g^2 / 4a`); per profile, the cosine between the "
                  "gradients of the pass's odd and even batches and, in parentheses, the share of the whole gradient "
                  "that is systematic, `2c / (1 + c)` (near 0: the step's direction is mostly noise; `-`: not "
                  "recorded, banks before 2026-12-03). Agreement is necessary, not sufficient: what both halves "
                  "share need not help users the pass did not see (the \"at best\" column says whether it did). "
                  "z: the step's gain over its standard error across the validation users (paired; "
                  "`uip_line_search_min_z` steps only above it); where no step was taken, in parentheses, the z of "
                  "the best length tried; `-`: no length beat 0; `?`: not recorded, banks before 2026-12-04."]
        by_ctr = any(entry.get("ids_auc") for entry in report["encoder_steps"])
        if by_ctr:
            lines[-1] += (" The step's length was chosen by the held-out AUC of the IDs it gives (`uip_line_search_"
                          "criterion: ctr`, training split only: IDs from 80% of each user's training interactions "
                          "predict the rest), shown at the step taken and, in parentheses, without a step.")
        lines += ["", "| round | step | validation objective gain | z | at best | "
                  + ("held-out AUC of the IDs | " if by_ctr else "") + " | ".join(names) + " |",
                  "|---|---|---|---|---|" + "---|" * (len(names) + by_ctr)]
        for entry in report["encoder_steps"]:
            cells = []
            for name in names:
                a = entry["agreement"].get(name)
                cells.append("-" if a is None or a["cosine"] is None
                             else f"{a['cosine']:.3f} ({a['signal_share']:.2f})")
            step = entry["step"]                   # one length for every profile, or one per profile
            step = ", ".join(f"{n} {v:g}" for n, v in step.items()) if isinstance(step, dict) else f"{step:g}"
            best = "-" if entry.get("best_gain") is None else f"{entry['best_gain']:.2g}"
            z = entry.get("z", "?")
            auc = f"{entry.get('ids_auc') or '-'} | " if by_ctr else ""
            lines.append(f"| {entry['round']} | {step} | {entry['gain']:+.4f} | {z} | {best} | {auc}"
                         + " | ".join(cells) + " |")
    lines += ["", "## What each ID means", "",
              "Per ID, the items and item attribute values (`" + str(report.get("attribute_field")) + "`) most "
              "over-represented in its users' training interactions. lift = the value's share of the group's "
              "interactions / its share of all interactions; n = the group's interactions with it (items need n >= 10, "
              "attribute values n >= 20)."]
    for name, codes in report["typical"].items():
        lines += ["", f"### {name}", "", "| ID | users | typical attribute values (lift, n) | typical items (lift, n) |",
                  "|---|---|---|---|"]
        for code, entry in codes.items():
            attrs = ", ".join(f"{v['label']} ({v['lift']:.2f}, {v['count']})" for v in entry["attributes"]) or "-"
            items = ", ".join(f"{v['label']} ({v['lift']:.2f}, {v['count']})" for v in entry["items"]) or "-"
            lines.append(f"| {code} | {entry['users']} | {attrs} | {items.replace('|', '/')} |")
    return "\n".join(lines) + "\n"
