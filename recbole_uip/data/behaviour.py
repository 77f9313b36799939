"""Per-user training histories, built from RecBole's own training split only, and the fields that describe them.

The split is made by RecBole with the run's own config, seed and ``eval_args``, so a profile sees exactly the
interactions the downstream model trains on and nothing from validation or test. Value transforms that do not
move rows between splits (``threshold``, normalisation, discretisation) are switched off here so the raw rating
can be written into the text.

The behaviour text needs fields the run may not load: RecBole's default ``load_col`` loads only the user and item
ids, and only ml-100k's preset widens it. :func:`resolve_text_fields` finds the fields by their role (RecBole's
``RATING_FIELD`` and ``TIME_FIELD``; the ``.item`` text fields from ``uip_item_text_fields`` or inferred), and the
split made for the text loads them whatever ``load_col`` says. The downstream run keeps the user's ``load_col``.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from recbole_uip.data.atomic import AtomicFileError, iter_numbered_rows, read_atomic, read_header


class BehaviourTextError(ValueError):
    """The dataset cannot give a behaviour text (no item text field, unknown field, bad template)."""


@dataclasses.dataclass(frozen=True)
class TextFields:
    """Which atomic-file fields build the behaviour text.

    Attributes:
        item_fields: ``.item`` fields written for each item, in template order.
        rating: the ``.inter`` field written after each item (RecBole's ``RATING_FIELD``), or None.
        time: the ``.inter`` field that orders each history oldest first (``TIME_FIELD``), or None: then the
            order of the training split (RecBole's shuffled order for a random split, file order otherwise).
        notes: why a role has no field (for the log).
    """

    item_fields: tuple[str, ...]
    rating: str | None
    time: str | None
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line for the log: which fields built the text and what is missing."""
        text = (f"item text from .item {', '.join(self.item_fields)}; rating from .inter "
                f"{self.rating or '(none)'}; order by .inter {self.time or '(none: split order)'}")
        return text + (f" ({'; '.join(self.notes)})" if self.notes else "")

    def as_dict(self) -> dict:
        return {"item_fields": list(self.item_fields), "rating": self.rating, "time": self.time}


def default_item_fields(fields: Sequence[str], types: Sequence[str], item_field: str) -> list[str]:
    """The ``.item`` fields that can describe an item: every token/token_seq field except the item id."""
    return [f for f, t in zip(fields, types) if f != item_field and t in ("token", "token_seq")]


def resolve_text_fields(config, settings, files: dict[str, Path]) -> TextFields:
    """Resolve the text's fields by role from the atomic files' headers (no data is read).

    Raises:
        BehaviourTextError: no ``.item`` file, no usable text field, or ``uip_item_text_fields`` names a field the
            file does not have.
    """
    separator, encoding = config["field_separator"], config["encoding"]
    item_field = config["ITEM_ID_FIELD"]
    if "item" not in files:
        raise BehaviourTextError(
            f"recbole-uip writes behaviour as item text, but {Path(config['data_path']) / (config['dataset'] + '.item')} "
            f"does not exist. Add a .item file with at least one text field (e.g. title:token_seq)."
        )
    _, item_header, item_types = read_header(files["item"], separator, encoding)
    available = default_item_fields(item_header, item_types, item_field)
    if settings.item_text_fields is None:
        if not available:
            raise BehaviourTextError(
                f"{files['item']} has no text field to describe items (fields: {', '.join(item_header)}; types: "
                f"{', '.join(item_types)}). Add a token or token_seq field, or set uip_item_text_fields."
            )
        item_fields = tuple(available)
    else:
        unknown = [f for f in settings.item_text_fields if f not in item_header]
        if unknown:
            raise BehaviourTextError(f"uip_item_text_fields names {', '.join(unknown)}, not in {files['item']} "
                                     f"(fields: {', '.join(item_header)}).")
        item_fields = tuple(settings.item_text_fields)
    _, inter_header, inter_types = read_header(files["inter"], separator, encoding)
    types = dict(zip(inter_header, inter_types))
    notes = []

    def numeric(role: str, key: str) -> str | None:
        name = config[key]
        if not name:
            notes.append(f"{key} is not set")
            return None
        if name not in types:
            notes.append(f"{key} '{name}' is not a field of {files['inter'].name}")
            return None
        if types[name] != "float":
            notes.append(f"{key} '{name}' is of type {types[name]}, not float")
            return None
        return name

    rating = numeric("rating", "RATING_FIELD")
    if rating is not None and not settings.rating_template:
        notes.append("uip_rating_template is empty")
        rating = None
    time = numeric("time", "TIME_FIELD")
    if time is None and "oldest first" in getattr(settings, "behaviour_prefix", ""):
        notes.append("without a time field 'oldest first' in uip_behaviour_prefix is not true: each history is in "
                     "the training split's order (docs/datasets.md); consider a prefix without it")
    return TextFields(item_fields, rating, time, tuple(notes))


def check_text_values(files: dict[str, Path], fields: TextFields, separator: str = "\t", encoding: str = "utf-8") -> None:
    """Every value of the ``.inter`` fields the text uses is a finite number.

    Raises:
        AtomicFileError: naming the file, the line, the field and the value, and how to fix it.
    """
    numeric = [f for f in (fields.rating, fields.time) if f]
    if not numeric:
        return
    _, header, _ = read_header(files["inter"], separator, encoding)
    columns = [(name, header.index(name)) for name in numeric]
    for line_number, values in iter_numbered_rows(files["inter"], len(header), separator, encoding):
        for name, index in columns:
            finite_value(files["inter"], line_number, name, values[index])


def finite_value(path: Path, line_number: int, name: str, value: str) -> float:
    """``value`` (field ``name`` on line ``line_number`` of ``path``) as a finite float.

    Raises:
        AtomicFileError: naming the file, the line, the field and the value, and how to fix it.
    """
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise AtomicFileError(
            f"{path}:{line_number}: field '{name}' has the value {value!r}, not a finite number. "
            f"The behaviour text writes this field; correct the value or drop the line."
        )
    return number


def recbole_dataset_class(config):
    """The class RecBole's ``create_dataset`` would use (without its on-disk cache, which can be stale)."""
    from recbole.utils import ModelType

    module = importlib.import_module("recbole.data.dataset")
    if hasattr(module, config["model"] + "Dataset"):
        return getattr(module, config["model"] + "Dataset")
    names = {ModelType.SEQUENTIAL: "SequentialDataset", ModelType.KNOWLEDGE: "KnowledgeBasedDataset"}
    return getattr(module, names.get(config["MODEL_TYPE"], "Dataset"))


def _split(config):
    from recbole.utils import init_seed

    init_seed(config["seed"], config["reproducibility"])
    dataset = recbole_dataset_class(config)(config)
    return dataset, dataset.build()[0]


def build_training_split(config, fields: TextFields | None = None):
    """Run RecBole's own split; return ``(dataset, train_dataset)`` with raw (untransformed) values.

    The seed is reset exactly as ``run_recbole`` does before it creates the dataset, so the permutation of an
    ``RO`` split is the one the downstream run will draw. With ``fields``, the ``.inter`` fields the text uses are
    loaded even where the run's ``load_col`` leaves them out; if that changes which interactions are in the training
    split (RecBole's ``rm_dup_inter`` keeps duplicates by time, for example), :class:`BehaviourTextError` says so
    rather than let the profiles see other interactions than the model.
    """
    split_config = copy.deepcopy(config)
    final = split_config.final_config_dict
    for key in ("threshold", "normalize_field", "discretization"):
        final[key] = None
    final["normalize_all"] = False
    widened = _widen_load_col(final, [f for f in (fields.rating, fields.time) if f] if fields else [])
    dataset, train = _split(split_config)
    if widened:
        final["load_col"], final["unload_col"] = widened
        plain_dataset, plain_train = _split(split_config)
        if not _same_rows(dataset, train, plain_dataset, plain_train):
            raise BehaviourTextError(
                f"Loading the .inter fields the behaviour text uses ({', '.join(f for f in (fields.rating, fields.time) if f)}) "
                f"changes which interactions RecBole puts in the training split (e.g. rm_dup_inter keeps duplicates by "
                f"time). Add them to load_col['inter'] so the model trains on the same split the profiles see."
            )
    return dataset, train


def _widen_load_col(final: dict, names: list[str]):
    """Load ``names`` from ``.inter`` in ``final``; return the original ``(load_col, unload_col)`` if that changed
    anything, else None."""
    load_col, unload_col = final.get("load_col"), final.get("unload_col")
    new_load = copy.deepcopy(load_col)
    if isinstance(new_load, dict) and "inter" in new_load and new_load["inter"] != "*":
        new_load["inter"] = list(new_load["inter"]) + [n for n in names if n not in new_load["inter"]]
    new_unload = copy.deepcopy(unload_col)
    if isinstance(new_unload, dict) and new_unload.get("inter"):
        new_unload["inter"] = [n for n in new_unload["inter"] if n not in names]
    if new_load == load_col and new_unload == unload_col:
        return None
    final["load_col"], final["unload_col"] = new_load, new_unload
    return load_col, unload_col


def _same_rows(dataset_a, train_a, dataset_b, train_b) -> bool:
    """Whether two training splits hold the same (user, item) interactions in the same order."""
    if len(train_a.inter_feat) != len(train_b.inter_feat):
        return False
    for field in (dataset_a.uid_field, dataset_a.iid_field):
        a = dataset_a.field2id_token[field][train_a.inter_feat[field].numpy()]
        b = dataset_b.field2id_token[field][train_b.inter_feat[field].numpy()]
        if not np.array_equal(a, b):
            return False
    return True


MAX_ITEM_TEXT_CHARS = 256


class ItemTexts:
    """Renders one item as text from the ``.item`` file, e.g. ``Toy Story (Animation Children's Comedy)``.

    A text longer than :data:`MAX_ITEM_TEXT_CHARS` characters is cut there at a word boundary, with one warning
    (a description field would otherwise fill a user's whole behaviour budget with one item); :attr:`cut` counts
    them and :attr:`longest` holds the longest one's length and item id."""

    def __init__(self, item_file: Path, item_field: str, fields: Sequence[str], template: str | None,
                 separator: str = "\t", seq_separator: str = " ", encoding: str = "utf-8"):
        table = read_atomic(item_file, separator, encoding)
        if item_field not in table.fields:
            raise AtomicFileError(f"{item_file}: no item id field '{item_field}' (fields: {', '.join(table.fields)}).")
        self.fields = list(fields)
        default = template is None
        if default:   # the first field, the others in parentheses; empty fields are left out item by item
            template = "{" + self.fields[0] + "}"
            if len(self.fields) > 1:
                template += " (" + "; ".join("{" + f + "}" for f in self.fields[1:]) + ")"
        self.template = template
        columns = {f: table.column(f) for f in self.fields}
        seq_fields = {f for f in self.fields if table.field_type(f).endswith("_seq")}
        self._text: dict[str, str] = {}
        self.cut, self.longest = 0, (0, "")
        for row, item in enumerate(table.column(item_field)):
            values = {f: (" ".join(columns[f][row].split(seq_separator)) if f in seq_fields else columns[f][row])
                      for f in self.fields}
            if not any(value.strip() for value in values.values()):
                continue                                  # every field empty: no text (not the template's "()")
            try:
                text = _default_text(values, self.fields) if default else template.format_map(values).strip()
            except (KeyError, IndexError, ValueError) as error:
                raise BehaviourTextError(
                    f"uip_item_template {template!r} cannot be filled from fields {self.fields}: {error!r}."
                ) from error
            if len(text) > MAX_ITEM_TEXT_CHARS:
                self.cut += 1
                self.longest = max(self.longest, (len(text), item))
                text = text[:MAX_ITEM_TEXT_CHARS].rsplit(" ", 1)[0].rstrip()
            if text:
                self._text[item] = text
        if self.cut:
            logging.getLogger().warning(
                f"{item_file}: {self.cut} item texts are longer than {MAX_ITEM_TEXT_CHARS} characters and were cut "
                f"(the longest: item '{self.longest[1]}', {self.longest[0]} characters). Pick shorter fields with "
                f"uip_item_text_fields or uip_item_template.")

    def get(self, item: str) -> str | None:
        """The item's text, or None for an item missing from ``.item`` or with no text."""
        return self._text.get(item)


def _default_text(values: dict[str, str], fields: Sequence[str]) -> str:
    """The default rendering: the first non-empty field, then the other non-empty ones in parentheses, ``"; "``
    between them (``Title (Video Games; Nintendo)``; ``Title (Nintendo)`` where the categories are empty)."""
    parts = [values[f].strip() for f in fields if values[f].strip()]
    return parts[0] + (" (" + "; ".join(parts[1:]) + ")" if len(parts) > 1 else "")


@dataclasses.dataclass
class TrainingHistories:
    """Every user's training interactions with a described item, oldest first.

    Attributes:
        users: raw user tokens (as in the atomic files), sorted; row order of every per-user structure downstream.
        item_ids: raw item tokens of the items in any history, sorted; ``items`` index into it.
        item_texts: the text of each of those items, aligned with ``item_ids``.
        items: per user, int64 ``(n_u,)`` indices into ``item_ids``, oldest first.
        ratings: per user, float32 ``(n_u,)`` raw ratings aligned with ``items``; None without a rating field.
        users_without_history: raw tokens of users known to the dataset with no described training interaction.
        interaction_counts: per user, training interactions (items without text included).
        fields: the fields the text uses.
        skipped: training interactions whose item has no text (missing from ``.item``, or empty).
        times: per user, float64 ``(n_u,)`` timestamps aligned with ``items``, as RecBole loads them (float32: at
            ml-100k's 8.8e8 seconds, steps of 64 s, so ratings less than a minute apart can tie and then keep the
            split's order); None without a time field. No profile reads them (the order is in ``items``); the
            benchmarks that ask when an item was rated do.
    """

    users: list[str]
    item_ids: list[str]
    item_texts: list[str]
    items: list[np.ndarray]
    ratings: list[np.ndarray] | None
    users_without_history: list[str]
    interaction_counts: list[int]
    fields: TextFields
    skipped: int = 0
    times: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.users)

    def truncated(self, keep: Sequence[int]) -> "TrainingHistories":
        """The same histories cut to their oldest ``keep[u]`` interactions (``keep[u] >= 1``), with only the items
        that remain in some history (so nothing fitted on the items sees the ones cut off)."""
        cut = [items[:k] for items, k in zip(self.items, keep)]
        used = np.unique(np.concatenate(cut)) if cut else np.zeros(0, dtype=np.int64)
        new_row = np.full(len(self.item_ids), -1, dtype=np.int64)
        new_row[used] = np.arange(len(used))
        ratings = None if self.ratings is None else [r[:k] for r, k in zip(self.ratings, keep)]
        times = None if self.times is None else [t[:k] for t, k in zip(self.times, keep)]
        return dataclasses.replace(self, items=[new_row[items] for items in cut], ratings=ratings, times=times,
                                   item_ids=[self.item_ids[i] for i in used], item_texts=[self.item_texts[i] for i in used])


def collect_training_histories(config, settings, fields: TextFields, logger=None) -> TrainingHistories:
    """Per-user histories from the training split (see module docstring). Needs no tokenizer and no LLM."""
    dataset, train = build_training_split(config, fields)
    uid_field, iid_field = dataset.uid_field, dataset.iid_field
    item_texts = ItemTexts(
        Path(dataset.dataset_path) / f"{dataset.dataset_name}.item", iid_field, fields.item_fields,
        settings.item_template, config["field_separator"], config["seq_separator"], config["encoding"],
    )
    inter = train.inter_feat
    uids = inter[uid_field].numpy()
    iids = inter[iid_field].numpy()
    times = inter[fields.time].numpy() if fields.time else np.zeros(len(uids))
    ratings = inter[fields.rating].numpy().astype(np.float32) if fields.rating else None
    order = np.lexsort((np.arange(len(uids)), times, uids))   # by user, then time, then split order (stable)
    item_tokens = dataset.field2id_token[iid_field]
    user_tokens = dataset.field2id_token[uid_field]

    text_of = np.array([item_texts.get(str(token)) is not None for token in item_tokens])
    row_of_item = np.full(len(item_tokens), -1, dtype=np.int64)
    described = np.unique(iids[text_of[iids]]) if len(iids) else np.zeros(0, dtype=np.int64)
    # Users and items are ordered by their raw tokens, not by RecBole's internal ids: those follow the order of first
    # appearance in the atomic files, validation and test rows included, and the order decides the item embeddings'
    # batches and every sum over users, so IDs would otherwise vary in the last bits with rows they must not see.
    described = described[np.argsort(np.asarray([str(item_tokens[i]) for i in described]), kind="stable")]
    row_of_item[described] = np.arange(len(described))
    users, items, user_ratings, user_times, counts = [], [], [], [], []
    skipped = 0
    for rows in np.split(order, np.flatnonzero(np.diff(uids[order])) + 1) if len(order) else []:
        keep = rows[text_of[iids[rows]]]
        skipped += len(rows) - len(keep)
        if not len(keep):
            continue
        users.append(str(user_tokens[uids[rows[0]]]))
        items.append(row_of_item[iids[keep]])
        if ratings is not None:
            user_ratings.append(ratings[keep])
        if fields.time:
            user_times.append(times[keep].astype(np.float64))
        counts.append(len(rows))
    by_token = sorted(range(len(users)), key=users.__getitem__)
    users, items, counts = [users[i] for i in by_token], [items[i] for i in by_token], [counts[i] for i in by_token]
    if ratings is not None:
        user_ratings = [user_ratings[i] for i in by_token]
    if fields.time:
        user_times = [user_times[i] for i in by_token]
    with_history = set(users)
    without = sorted(str(t) for t in user_tokens[1:] if str(t) not in with_history)
    histories = TrainingHistories(
        users=users, item_ids=[str(item_tokens[i]) for i in described],
        item_texts=[item_texts.get(str(item_tokens[i])) for i in described], items=items,
        ratings=user_ratings if ratings is not None else None, users_without_history=without,
        interaction_counts=counts, fields=fields, skipped=skipped, times=user_times if fields.time else None,
    )
    if logger:
        logger.info(f"UIP behaviour text: {fields.describe()}.")
        logger.info(
            f"Training histories: {len(users)} users, {sum(map(len, items))} interactions with "
            f"{len(described)} described items, {len(without)} users without training history"
            + (f", {skipped} interactions with items missing from .item skipped" if skipped else "") + "."
        )
    if not users:
        raise BehaviourTextError(
            f"No user has a training interaction with a described item: {Path(dataset.dataset_path) / dataset.dataset_name}"
            f".item gives no text (fields {', '.join(fields.item_fields)}) for any item of the training split. Fill "
            f"those fields, or name others with uip_item_text_fields.")
    return histories
