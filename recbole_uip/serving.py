"""Serving a feature bank: profile IDs for users it does not hold, or whose behaviour changed, from atomic files.

A bank inferred with the amortised encoder (``uip_encoder: linear``) keeps everything a history needs to become
IDs: the items' LLM embeddings, the map from a history to ``z``, the encoder and the codebooks
(:meth:`FeatureBank.assign`). Assigning runs no LLM and no optimisation: it is a few matrix products per batch.

An item the bank never embedded (in no training history) is embedded by :func:`embed_new_items`: the frozen LLM
runs once per such item, with the bank's own LLM, layer, fields and template. Items without text are left out
and counted.
"""

from __future__ import annotations

import dataclasses
import time
from logging import getLogger
from pathlib import Path

import numpy as np
from tqdm import tqdm

from recbole_uip.bank import CONTROL_CODES, BankError, FeatureBank
from recbole_uip.data.atomic import iter_numbered_rows, read_header
from recbole_uip.data.behaviour import TextFields, finite_value
from recbole_uip.utils import sha256_json


@dataclasses.dataclass
class Histories:
    """Every user's interactions in an ``.inter`` file, oldest first.

    Attributes:
        items: raw item tokens per user.
        ratings: the ratings aligned with ``items`` per user, or None where the file has no rating field.
    """

    items: dict[str, list[str]]
    ratings: dict[str, list[float]] | None


def read_histories(inter: Path, user_field: str, item_field: str, fields: TextFields, separator: str = "\t",
                   encoding: str = "utf-8") -> Histories:
    """Every interaction of ``inter`` grouped by user, ordered by ``fields.time`` (file order for ties and without
    a time field).

    Raises:
        AtomicFileError: a rating or time that is not a finite number (file, line, field and value), as
            :func:`recbole_uip.data.behaviour.check_text_values` says it."""
    _, header, _ = read_header(inter, separator, encoding)
    user, item = header.index(user_field), header.index(item_field)
    rating = header.index(fields.rating) if fields.rating else None
    when = header.index(fields.time) if fields.time else None
    rows: dict[str, list[tuple[float, int, str, float]]] = {}
    for line, values in iter_numbered_rows(inter, len(header), separator, encoding):
        score = finite_value(inter, line, fields.rating, values[rating]) if rating is not None else 0.0
        time = finite_value(inter, line, fields.time, values[when]) if when is not None else 0.0
        rows.setdefault(values[user], []).append((time, line, values[item], score))
    for history in rows.values():
        history.sort()
    return Histories(items={u: [r[2] for r in h] for u, h in rows.items()},
                     ratings=None if rating is None else {u: [r[3] for r in h] for u, h in rows.items()})


@dataclasses.dataclass
class Assignment:
    """The outcome of :func:`assign_histories`.

    Attributes:
        users: the users assigned, row order of ``codes``.
        codes: int64 ``(B, P)``.
        offsets: float32 ``(B, P, D)``.
        skipped_items: interactions with an item the bank has not embedded (left out of the history).
        without_known_items: users none of whose items the bank knows (not assigned: they keep ``none``).
        seconds: wall time of the assignment (no file reading).
    """

    users: list[str]
    codes: np.ndarray
    offsets: np.ndarray
    skipped_items: int
    without_known_items: list[str]
    seconds: float


def assign_histories(bank: FeatureBank, histories: Histories, users: list[str], batch_size: int = 4096,
                     show_progress: bool = False) -> Assignment:
    """IDs for ``users`` from their ``histories`` with the bank's encoder and codebooks (no LLM)."""
    encoder = bank.require_encoder()
    needs_ratings = encoder.feature_map.rating_mean is not None
    if needs_ratings and histories.ratings is None:
        raise BankError("This bank's behaviour text wrote ratings, but the interactions have no rating field "
                        "(RATING_FIELD): the encoder needs each item's rating.")
    known = set(encoder.item_ids)
    kept_items, kept_ratings, assigned, empty, skipped = [], [], [], [], 0
    for user in users:
        items = histories.items.get(user, [])
        keep = [i for i, item in enumerate(items) if item in known]
        skipped += len(items) - len(keep)
        if not keep:
            empty.append(user)
            continue
        assigned.append(user)
        kept_items.append([items[i] for i in keep])
        if needs_ratings:
            kept_ratings.append([histories.ratings[user][i] for i in keep])
    start = time.perf_counter()
    codes, offsets = [], []
    for begin in tqdm(range(0, len(assigned), batch_size), desc="UIP assign", ncols=100, disable=not show_progress):
        end = begin + batch_size
        offset = encoder.offsets(kept_items[begin:end], kept_ratings[begin:end] if needs_ratings else None)
        offsets.append(offset)
        codes.append(bank.quantise(offset))
    profiles, dim = len(bank.profiles), bank.codebooks[0].shape[1]
    return Assignment(
        users=assigned,
        codes=np.concatenate(codes) if codes else np.zeros((0, profiles), np.int64),
        offsets=np.concatenate(offsets).astype(np.float32) if offsets else np.zeros((0, profiles, dim), np.float32),
        skipped_items=skipped, without_known_items=empty, seconds=time.perf_counter() - start)


def with_assignment(bank: FeatureBank, assignment: Assignment, source: str) -> FeatureBank:
    """A bank holding ``bank``'s users plus the assigned ones (an assigned user already in the bank is replaced).

    Its fingerprint is derived from the original's and from ``source`` (e.g. the hash of the files assigned from),
    so it is never taken for the bank of an inference run."""
    rows = {user: row for row, user in enumerate(bank.users)}
    users = list(bank.users)
    codes = bank.codes.copy()
    offsets = None if bank.offsets is None else bank.offsets.copy()
    replaced = [u for u in assignment.users if u in rows]
    new = [u for u in assignment.users if u not in rows]
    index = {user: i for i, user in enumerate(assignment.users)}
    for user in replaced:
        codes[rows[user]] = assignment.codes[index[user]]
        if offsets is not None:
            offsets[rows[user]] = assignment.offsets[index[user]]
    take = [index[u] for u in new]
    users += new
    codes = np.concatenate([codes, assignment.codes[take]]) if new else codes
    if offsets is not None and new:
        offsets = np.concatenate([offsets, assignment.offsets[take]])
    metadata = {**bank.metadata, "assigned": {"from_bank": bank.fingerprint, "source": source, "new_users": len(new),
                                              "refreshed_users": len(replaced)}}
    return dataclasses.replace(
        bank, fingerprint=sha256_json({"assigned_from": bank.fingerprint, "source": source}), users=users,
        codes=codes, offsets=offsets, initial_codes=None, random_step_codes=None, summaries=None, metadata=metadata)


def embed_new_items(bank: FeatureBank, items: list[str], item_file: Path, item_field: str, config,
                    cache_dir: Path | None = None) -> tuple[FeatureBank, int]:
    """``bank`` whose encoder also knows those of ``items`` that ``item_file`` describes, embedded by the frozen LLM
    exactly as the bank embedded its own (the LLM, dtype, layer, text fields and template it recorded). Returns the
    bank and the number of items embedded (0: the LLM was not loaded)."""
    from recbole_uip.data.behaviour import ItemTexts
    from recbole_uip.inference.llm import load_frozen_llm
    from recbole_uip.inference.user_features import embed_items

    recorded = bank.metadata.get("inputs", {})
    settings, fields = recorded.get("uip"), recorded.get("text_fields")
    if not settings or not fields:
        raise BankError("This bank does not record how it embedded items (uip settings and text fields): "
                        "it cannot embed new items. Infer the bank again with this version.")
    texts = ItemTexts(item_file, item_field, fields["item_fields"], settings["item_template"], config["field_separator"],
                      config["seq_separator"], config["encoding"])
    described = [item for item in items if texts.get(item) is not None]
    if not described:
        return bank, 0
    llm = load_frozen_llm(settings["llm"], config["device"], settings["llm_dtype"], cache_dir, getLogger())
    expected = recorded.get("llm", {}).get("identity")
    if expected and llm.identity != expected:
        raise BankError(f"The LLM '{settings['llm']}' loaded now is not the one this bank was inferred with (weights "
                        f"{llm.identity[:12]} vs {expected[:12]}): its item embeddings would not match the encoder.")
    embeddings = embed_items(llm, [texts.get(item) for item in described], settings["item_embedding_layer"],
                             show_progress=config["show_progress"])
    return dataclasses.replace(bank, encoder=bank.encoder.with_items(described, embeddings.numpy())), len(described)


def assign_dataset(config, bank_dir: str | Path, refresh: bool = False) -> Path:
    """``python -m recbole_uip assign``: give IDs from ``bank_dir`` to the users of ``config``'s dataset that the bank
    does not hold (with ``refresh``: to every user of the dataset, from all their interactions in its files), and
    write ``<uip_output_dir>/<dataset>-uip/`` with the extended bank. Returns that folder."""
    from recbole_uip.config import UIPSettings
    from recbole_uip.data.atomic import check_writable
    from recbole_uip.data.behaviour import resolve_text_fields
    from recbole_uip.locking import output_lock
    from recbole_uip.augmented import augmented_dir, write_augmented_dataset
    from recbole_uip.recbole_config import check_dataset_files
    from recbole_uip.utils import sha256_file

    logger = getLogger()
    bank = FeatureBank.load(bank_dir)
    settings = UIPSettings.from_config(config)
    if list(settings.profile_names) != list(bank.profiles):
        raise BankError(f"The bank's profiles are {bank.profiles}, the run's uip_profiles {settings.profile_names}: "
                        f"give the run the bank's uip_profiles.")
    files = check_dataset_files(config)
    fields = resolve_text_fields(config, settings, files)
    # read_histories refuses non-finite ratings and times with check_text_values' message
    histories = read_histories(files["inter"], config["USER_ID_FIELD"], config["ITEM_ID_FIELD"], fields,
                               config["field_separator"], config["encoding"])
    target = augmented_dir(config, settings)
    check_writable(target.parent)                    # before the LLM may load for unseen items
    stored = set(bank.users)
    users = [u for u in histories.items if refresh or u not in stored]
    if bank.encoder is not None and "item" in files:
        known = set(bank.encoder.item_ids)
        new_items = sorted({item for user in users for item in histories.items[user] if item not in known})
        bank, embedded = embed_new_items(bank, new_items, files["item"], config["ITEM_ID_FIELD"], config,
                                         settings.llm_cache_dir)
        if new_items:
            logger.info(f"UIP assign: {embedded} of {len(new_items)} items the bank had not embedded were embedded by "
                        f"the LLM (the others have no text).")
    assignment = assign_histories(bank, histories, users, show_progress=config["show_progress"])
    per_user = assignment.seconds / max(len(assignment.users), 1)
    logger.info(f"UIP assign: {len(assignment.users)} users given IDs from the bank's encoder in "
                f"{assignment.seconds:.3f}s ({per_user * 1e6:.1f} us per user, no LLM); "
                f"{len(assignment.without_known_items)} users with no item the bank knows keep "
                f"'{bank.no_history_token}'; {assignment.skipped_items} interactions with items the bank never "
                f"embedded left out; {len(stored & set(histories.items)) if not refresh else 0} users kept their "
                f"bank IDs.")
    source = sha256_json({suffix: sha256_file(path) for suffix, path in sorted(files.items())} | {"refresh": refresh})
    extended = with_assignment(bank, assignment, source)
    with output_lock(target.parent, target.name, settings.lock_timeout):
        write_augmented_dataset(config, settings, files, extended, target)
    logger.info(f"UIP assign: augmented dataset written to {target}.")
    return target


def align_codes(bank: FeatureBank, previous: FeatureBank) -> tuple[FeatureBank, dict[str, float]]:
    """``bank`` with each profile's code numbers permuted to match ``previous`` where they can: the permutation
    maximises the users (held by both banks) who keep their number (Hungarian matching on the contingency table).

    A rebuild (another seed, more interactions) otherwise numbers the same profiles arbitrarily, and a model
    trained on the old bank would read every ID wrong. Codes, the controls' codes and codebooks are permuted together,
    so the IDs' meaning is unchanged. Returns the aligned bank and, per profile, the share of shared users whose
    ID stays the same (1.0 where nothing changed; nan without shared users)."""
    from scipy.optimize import linear_sum_assignment

    if list(bank.profiles) != list(previous.profiles):
        raise BankError(f"cannot align banks with other profiles ({bank.profiles} vs {previous.profiles}).")
    old_row = {user: row for row, user in enumerate(previous.users)}
    shared = [(row, old_row[user]) for row, user in enumerate(bank.users) if user in old_row]
    new_rows = np.array([r for r, _ in shared], dtype=np.int64)
    old_rows = np.array([r for _, r in shared], dtype=np.int64)
    codes = bank.codes.copy()
    controls = {key: getattr(bank, key).copy() for key in CONTROL_CODES if getattr(bank, key) is not None}
    codebooks, kept = [], {}
    for p, name in enumerate(bank.profiles):
        size = bank.codebooks[p].shape[0]
        table = np.zeros((size, max(size, previous.codebooks[p].shape[0])), dtype=np.int64)
        if len(shared):
            np.add.at(table, (bank.codes[new_rows, p], previous.codes[old_rows, p]), 1)
        source, target = linear_sum_assignment(-table)       # new code source[i] takes the number target[i]
        number = np.empty(size, dtype=np.int64)
        number[source] = target
        if number.max() >= size:                              # the previous bank had more codes: renumber densely
            number = np.argsort(np.argsort(number))
        codes[:, p] = number[bank.codes[:, p]]
        for key, control in controls.items():
            control[:, p] = number[getattr(bank, key)[:, p]]
        codebook = np.empty_like(bank.codebooks[p])
        codebook[number] = bank.codebooks[p]
        codebooks.append(codebook)
        kept[name] = float((codes[new_rows, p] == previous.codes[old_rows, p]).mean()) if len(shared) else float("nan")
    return dataclasses.replace(bank, codes=codes, **controls, codebooks=codebooks,
                               metadata={**bank.metadata, "aligned_to": previous.fingerprint, "ids_kept": kept}), kept
