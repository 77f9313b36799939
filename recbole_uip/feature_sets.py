"""ID sets other than the bank's own (controls and cheap baselines), and the dataset copies that carry them.

A benchmark that asks "do the profile IDs help?" needs the same users with *other* IDs: random ones, the bank's
IDs permuted across users, k-means partitions of cheap per-user representations. Each such ID set is wrapped as a
:class:`~recbole_uip.bank.FeatureBank` (:func:`alternative_bank`) and written as its own augmented dataset copy
with :func:`recbole_uip.augmented.write_augmented_dataset` (:func:`write_id_set`). :func:`write_id_free_copy`
makes a variant of such a copy whose ``.inter`` carries the user columns, so a run can drop user_id and still see
the user features.

Shapes: ``U`` users (the bank's rows, in ``bank.users`` order), ``P`` profile columns; every ID array is
``(U, P)`` int64 with column ``p`` in ``[0, sizes[p])``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from recbole_uip.bank import FeatureBank
from recbole_uip.data.atomic import MANIFEST_NAME, manifest_fingerprint, publish_directory, read_atomic
from recbole_uip.report import (
    attribute_histogram, attribute_shares, item_attribute_field, kmeans_ids, training_histories,
)
from recbole_uip.utils import write_json_atomic

# Part of every alternative bank's fingerprint ("<bank>-zoo<format>-<tag>"): bump when the meaning of an ID set
# changes, so dataset copies written before are rewritten. The "zoo" in the string keeps existing copies valid.
ID_SET_FORMAT = 1
RANDOM_IDS_SEED = 0
SHUFFLE_SEED = 12345             # the shuffled control's permutation (kept from the first benchmarks, results/archive/)


def alternative_bank(bank: FeatureBank, codes: np.ndarray, tag: str, note: str, codebooks=None) -> FeatureBank:
    """A bank with the same users and profiles as ``bank`` but the IDs ``codes (U, P)`` (a control or a cheap
    baseline). Its fingerprint is ``<bank's>-zoo<ID_SET_FORMAT>-<tag>``; ``note`` is kept in its metadata."""
    return FeatureBank(fingerprint=id_set_fingerprint(bank, tag), profiles=bank.profiles,
                       users=bank.users, codes=np.asarray(codes, dtype=np.int64), codebooks=codebooks or bank.codebooks,
                       no_history_token=bank.no_history_token, metadata={"note": note, "source": bank.fingerprint})


def random_ids(bank: FeatureBank, sizes: list[int], seed: int = RANDOM_IDS_SEED) -> np.ndarray:
    """``(U, P)`` uniform random IDs, column ``p`` drawn from ``[0, sizes[p])``."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, k, size=len(bank.users)) for k in sizes], axis=1)


def shuffled_ids(bank: FeatureBank, seed: int = SHUFFLE_SEED) -> np.ndarray:
    """``(U, P)``: the bank's IDs with whole rows permuted across users (each profile keeps its usage and the
    pairs of a row stay together; only the link to the user is broken)."""
    return bank.codes[np.random.default_rng(seed).permutation(len(bank.users))]


def _kmeans_per_profile(vectors_of, sizes: list[int], first_seed: int, standardise: bool) -> np.ndarray:
    """``(U, P)``: for each profile column ``p``, :func:`~recbole_uip.report.kmeans_ids` over ``vectors_of(p)
    (U, F)`` with ``sizes[p]`` clusters and seed ``first_seed + p``."""
    return np.stack([kmeans_ids(vectors_of(column), k, seed=first_seed + column, standardise=standardise)
                     for column, k in enumerate(sizes)], axis=1)


def kmeans_columns(vectors: np.ndarray, sizes: list[int], first_seed: int = 0) -> np.ndarray:
    """``(U, P)``: one k-means per profile over the same per-user ``vectors (U, D)``, with seed ``first_seed`` +
    column index and ``sizes[p]`` clusters (the columns differ by their k-means++ start only)."""
    return _kmeans_per_profile(lambda column: vectors, sizes, first_seed, standardise=True)


def weighted_kmeans_columns(vectors: np.ndarray, column_weights: np.ndarray, sizes: list[int],
                            first_seed: int = 0) -> np.ndarray:
    """``(U, P)``: per profile ``p``, a k-means over ``vectors (U, k)`` standardised, then each column scaled by
    ``sqrt(column_weights[p] (k,))``, so that its squared distances weigh column ``j`` by ``column_weights[p, j]``
    (seed ``first_seed`` + column). With every weight 1 it is :func:`kmeans_columns`."""
    x = np.asarray(vectors, dtype=np.float64)
    standard = (x - x.mean(0)) / x.std(0, ddof=1).clip(min=1e-6)
    return _kmeans_per_profile(lambda column: standard * np.sqrt(np.asarray(column_weights[column], dtype=np.float64)),
                               sizes, first_seed, standardise=False)


def offset_kmeans_columns(offsets: np.ndarray, sizes: list[int], first_seed: int = 0) -> np.ndarray:
    """``(U, P)``: per profile ``p``, a k-means over the users' offsets ``offsets[:, p] (U, D)`` as they are (the
    Euclidean metric the bank's codebooks use; no standardising, which would reweigh the ``D`` coordinates), with
    seed ``first_seed`` + column: the bank's own construction, drawn again."""
    return _kmeans_per_profile(lambda column: np.asarray(offsets[:, column], dtype=np.float32), sizes, first_seed,
                               standardise=False)


def attribute_vectors(config, settings, bank: FeatureBank) -> tuple[np.ndarray, str]:
    """``((U, A), field)``: each user's item-attribute histogram over the training split (rows in ``bank.users``
    order), as shares of the user's attribute mentions, and the attribute field's name (the first token item field
    besides the title, see :func:`recbole_uip.report.item_attribute_field`)."""
    incidence, dataset = training_histories(config, bank.users)
    field = item_attribute_field(dataset, settings.item_text_fields)
    if field is None:
        raise ValueError(f"{config['dataset']}: no token item field besides the title for an attribute baseline.")
    return attribute_shares(attribute_histogram(incidence, dataset, field)), field


def is_current(folder: Path, fingerprint: str) -> bool:
    """Whether ``folder`` is a complete dataset copy written for ``fingerprint`` (its manifest says so)."""
    return manifest_fingerprint(folder) == fingerprint


def id_set_fingerprint(bank: FeatureBank, tag: str) -> str:
    """The fingerprint of the ID set ``tag`` derived from ``bank`` (that of :func:`alternative_bank`)."""
    return f"{bank.fingerprint}-zoo{ID_SET_FORMAT}-{tag}"


def write_id_set(config, settings, files: dict, bank: FeatureBank, tag: str, folder: Path, build) -> bool:
    """Make ``folder`` the augmented dataset copy of the ID set ``tag`` derived from ``bank``, unless it already is.

    ``build()`` returns ``(codes (U, P), note)``; it is called only when the copy is missing or was written for
    another bank or format. Written by :func:`recbole_uip.augmented.write_augmented_dataset` with
    :func:`alternative_bank`. Returns whether the copy was (re)written.
    """
    from recbole_uip.augmented import write_augmented_dataset

    if is_current(folder, id_set_fingerprint(bank, tag)):
        return False
    codes, note = build()
    write_augmented_dataset(config, settings, files, alternative_bank(bank, codes, tag, note), folder)
    return True


def own_user_fields(config) -> list[str]:
    """The dataset's own user features as its presets load them (ml-100k: age, gender, occupation)."""
    load_col = config["load_col"] or {}
    return [f for f in load_col.get("user", []) if f != config["USER_ID_FIELD"]]


def write_id_free_copy(config, source: Path, folder: Path) -> Path:
    """A variant of the dataset copy ``source`` whose ``.inter`` carries every ``.user`` column joined in (empty
    for a user without a ``.user`` row), and which has no ``.user`` file: a run can then drop user_id
    (``unused_col``) and still see the user features. Every other atomic file is copied unchanged.

    Rewritten only when ``source``'s manifest fingerprint changed (the copy's is that fingerprint + ``-idfree``);
    the new folder is published atomically. Returns ``folder``.
    """
    source_fingerprint = manifest_fingerprint(source)
    if source_fingerprint is None:
        raise FileNotFoundError(f"{source / MANIFEST_NAME}: no readable manifest; {source} is not a complete copy.")
    fingerprint = source_fingerprint + "-idfree"
    if is_current(folder, fingerprint):
        return folder
    separator, encoding = config["field_separator"], config["encoding"]
    user_field = config["USER_ID_FIELD"]
    name = folder.name

    def build(tmp: Path) -> None:
        inter = read_atomic(source / f"{source.name}.inter", separator, encoding)
        users = read_atomic(source / f"{source.name}.user", separator, encoding)
        extra = [f for f in users.fields if f != user_field and f not in inter.fields]
        row_of = {row[users.fields.index(user_field)]: row for row in users.rows}
        pick = [users.fields.index(f) for f in extra]
        inter_user = inter.fields.index(user_field)
        with open(tmp / f"{name}.inter", "w", encoding=encoding, newline="") as handle:
            handle.write(separator.join([inter.header] + [f"{f}:{users.field_type(f)}" for f in extra]) + "\n")
            for row in inter.rows:
                user_row = row_of.get(row[inter_user])
                handle.write(separator.join(row + [user_row[i] if user_row else "" for i in pick]) + "\n")
        for path in source.iterdir():
            suffix = path.name[len(source.name) + 1:]
            if path.is_file() and path.name.startswith(source.name + ".") and suffix not in ("inter", "user"):
                shutil.copyfile(path, tmp / f"{name}.{suffix}")
        write_json_atomic(tmp / MANIFEST_NAME, {"fingerprint": fingerprint, "source": str(source),
                                                "note": ".user columns joined into .inter; no .user file"})

    return publish_directory(build, folder)
