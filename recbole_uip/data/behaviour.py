"""Per-user behaviour text, built from RecBole's own training split only.

The split is made by RecBole with the run's own config, seed and ``eval_args``, so a profile sees exactly the
interactions the downstream model trains on and nothing from validation or test. Value transforms that do not
move rows between splits (``threshold``, normalisation, discretisation) are switched off here so the raw rating
can be written into the text.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
from pathlib import Path
from typing import Sequence

import numpy as np

from recbole_uip.data.atomic import AtomicFileError, read_atomic


class BehaviourTextError(ValueError):
    """The dataset cannot give a behaviour text (no item text field, unknown field, bad template)."""


@dataclasses.dataclass
class BehaviourCorpus:
    """Behaviour of every user with training interactions.

    Attributes:
        users: raw user tokens (as in the atomic files), one per row of every per-user tensor downstream.
        token_ids: per user, the behaviour token ids (most recent items that fit the budget, oldest first).
        texts: per user, the behaviour text those ids encode (for reports and debugging).
        items: per user, the raw item tokens written in the text, oldest first.
        users_without_history: raw tokens of users known to the dataset with no training interaction.
        item_count: per user, how many training interactions they have (before the token budget).
        summary_token_ids: per user, the ids the forward-only summary reads: the most recent items within
            ``uip_summary_max_tokens`` (a longer stretch of the same training history, ending with
            ``token_ids``); equal to ``token_ids`` when that budget is 0 or not larger.
        rating_mask: per user, aligned with ``token_ids``: whether a token writes the item's rating (the
            ``uip_rating_template`` part); only built when ``uip_rating_weight`` is not 1 and the text writes
            ratings (a rating field, a template and a fast tokenizer), else ``None``.
    """

    users: list[str]
    token_ids: list[list[int]]
    texts: list[str]
    items: list[list[str]]
    users_without_history: list[str]
    item_count: list[int]
    summary_token_ids: list[list[int]] | None = None
    rating_mask: list[list[bool]] | None = None

    def __post_init__(self):
        if self.summary_token_ids is None:
            self.summary_token_ids = self.token_ids

    def __len__(self) -> int:
        return len(self.users)

    @property
    def num_tokens(self) -> int:
        return sum(len(ids) for ids in self.token_ids)


def recbole_dataset_class(config):
    """The class RecBole's ``create_dataset`` would use (without its on-disk cache, which can be stale)."""
    from recbole.utils import ModelType

    module = importlib.import_module("recbole.data.dataset")
    if hasattr(module, config["model"] + "Dataset"):
        return getattr(module, config["model"] + "Dataset")
    names = {ModelType.SEQUENTIAL: "SequentialDataset", ModelType.KNOWLEDGE: "KnowledgeBasedDataset"}
    return getattr(module, names.get(config["MODEL_TYPE"], "Dataset"))


def build_training_split(config):
    """Run RecBole's own split; return ``(dataset, train_dataset)`` with raw (untransformed) values.

    The seed is reset exactly as ``run_recbole`` does before it creates the dataset, so the permutation of an
    ``RO`` split is the one the downstream run will draw.
    """
    from recbole.utils import init_seed

    split_config = copy.deepcopy(config)
    for key in ("threshold", "normalize_field", "discretization"):
        split_config.final_config_dict[key] = None
    split_config.final_config_dict["normalize_all"] = False
    init_seed(split_config["seed"], split_config["reproducibility"])
    dataset = recbole_dataset_class(split_config)(split_config)
    train_dataset = dataset.build()[0]
    return dataset, train_dataset


def default_item_fields(fields: Sequence[str], types: Sequence[str], item_field: str) -> list[str]:
    return [f for f, t in zip(fields, types) if f != item_field and t in ("token", "token_seq")]


class ItemTexts:
    """Renders one item as text from the ``.item`` file, e.g. ``Toy Story (Animation Children's Comedy)``."""

    def __init__(self, item_file: Path, item_field: str, fields: Sequence[str] | None, template: str | None,
                 separator: str = "\t", seq_separator: str = " ", encoding: str = "utf-8"):
        if not Path(item_file).is_file():
            raise BehaviourTextError(
                f"recbole-uip writes behaviour as item text, but {item_file} does not exist. Add a .item file with "
                f"at least one text field (e.g. title:token_seq)."
            )
        table = read_atomic(item_file, separator, encoding)
        if item_field not in table.fields:
            raise AtomicFileError(f"{item_file}: no item id field '{item_field}' (fields: {', '.join(table.fields)}).")
        available = default_item_fields(table.fields, table.types, item_field)
        if fields is None:
            fields = available
            if not fields:
                raise BehaviourTextError(
                    f"{item_file} has no text field to describe items (fields: {', '.join(table.fields)}; types: "
                    f"{', '.join(table.types)}). Add a token or token_seq field, or set uip_item_text_fields."
                )
        unknown = [f for f in fields if f not in table.fields]
        if unknown:
            raise BehaviourTextError(
                f"uip_item_text_fields names {', '.join(unknown)}, not in {item_file} (fields: {', '.join(table.fields)})."
            )
        self.fields = list(fields)
        if template is None:
            template = "{" + self.fields[0] + "}"
            if len(self.fields) > 1:
                template += " (" + "; ".join("{" + f + "}" for f in self.fields[1:]) + ")"
        self.template = template
        columns = {f: table.column(f) for f in self.fields}
        seq_fields = {f for f in self.fields if table.field_type(f).endswith("_seq")}
        self._text: dict[str, str] = {}
        for row, item in enumerate(table.column(item_field)):
            values = {f: (" ".join(columns[f][row].split(seq_separator)) if f in seq_fields else columns[f][row])
                      for f in self.fields}
            try:
                self._text[item] = template.format_map(values).strip()
            except (KeyError, IndexError, ValueError) as error:
                raise BehaviourTextError(
                    f"uip_item_template {template!r} cannot be filled from fields {self.fields}: {error!r}."
                ) from error

    def get(self, item: str) -> str | None:
        return self._text.get(item)


def build_behaviour_corpus(config, settings, tokenizer, logger=None) -> BehaviourCorpus:
    """Per-user behaviour token ids from the training split (see module docstring)."""
    dataset, train = build_training_split(config)
    uid_field, iid_field = dataset.uid_field, dataset.iid_field
    time_field = dataset.time_field if dataset.time_field in train.inter_feat else None
    rating_field = config["RATING_FIELD"]
    has_rating = bool(settings.rating_template) and rating_field in train.inter_feat

    item_texts = ItemTexts(
        Path(dataset.dataset_path) / f"{dataset.dataset_name}.item", iid_field, settings.item_text_fields,
        settings.item_template, config["field_separator"], config["seq_separator"], config["encoding"],
    )
    inter = train.inter_feat
    uids = inter[uid_field].numpy()
    iids = inter[iid_field].numpy()
    times = inter[time_field].numpy() if time_field else np.arange(len(uids), dtype=np.float64)
    ratings = inter[rating_field].numpy() if has_rating else None
    order = np.lexsort((np.arange(len(uids)), times, uids))  # by user, then time, then split order (stable)

    item_tokens = dataset.field2id_token[iid_field]
    user_tokens = dataset.field2id_token[uid_field]
    piece_cache: dict[tuple[int, float], list[int] | None] = {}
    flag_cache: dict[tuple[int, float], list[bool]] = {}
    mark_ratings = settings.rating_weight != 1.0 and has_rating and getattr(tokenizer, "is_fast", False)
    if settings.rating_weight != 1.0 and not mark_ratings and logger:
        reason = ("'uip_rating_template' is empty" if not settings.rating_template else
                  f"the training interactions have no rating field '{rating_field}'" if not has_rating else
                  "the tokenizer is not a fast one (no character offsets to find the rating tokens)")
        logger.warning(f"UIP: uip_rating_weight={settings.rating_weight:g} has no effect: {reason}; every behaviour "
                       f"token weighs 1 in the M-step.")

    def piece_ids(item_id: int, rating: float) -> list[int] | None:
        key = (item_id, rating)
        if key not in piece_cache:
            text = item_texts.get(str(item_tokens[item_id]))
            if text is None:
                piece_cache[key] = None
            else:
                head = " " + text
                if ratings is not None:
                    text += settings.rating_template.format(rating=rating)
                encoded = tokenizer(" " + text + settings.item_separator, add_special_tokens=False,
                                    return_offsets_mapping=mark_ratings)
                piece_cache[key] = list(encoded["input_ids"])
                if mark_ratings:  # tokens overlapping the characters the rating template wrote
                    end = len(" " + text)
                    flag_cache[key] = [start < end and stop > len(head) for start, stop in encoded["offset_mapping"]]
        return piece_cache[key]

    summary_budget = max(settings.summary_max_tokens, settings.max_behaviour_tokens)
    users, token_ids, texts, items, counts, summary_ids, rating_mask = [], [], [], [], [], [], []
    missing_items = 0
    boundaries = np.flatnonzero(np.diff(uids[order])) + 1
    for rows in np.split(order, boundaries) if len(order) else []:
        budget = settings.max_behaviour_tokens
        chosen: list[list[int]] = []        # the M-step's text: newest items within the behaviour budget
        chosen_items: list[str] = []
        chosen_keys: list[tuple[int, float, int]] = []   # (item, rating, tokens kept): to look up rating flags
        earlier: list[list[int]] = []       # older items that only the summary reads, newest first
        summary_left = summary_budget
        for row in rows[::-1]:                                   # newest first, until the budgets are spent
            item, rating = int(iids[row]), float(ratings[row]) if ratings is not None else 0.0
            ids = piece_ids(item, rating)
            if ids is None:
                missing_items += 1
                continue
            if budget is not None and len(ids) > budget:
                budget_was, budget = budget, None                # the behaviour text is complete
                if not chosen:                                   # one long item: keep its first tokens
                    chosen.append(ids[:budget_was])
                    chosen_items.append(str(item_tokens[item]))
                    chosen_keys.append((item, rating, budget_was))
                    summary_left -= budget_was
                    continue
                if summary_budget == settings.max_behaviour_tokens:
                    break
            if len(ids) > summary_left:
                break
            if budget is not None:
                chosen.append(ids)
                chosen_items.append(str(item_tokens[item]))
                chosen_keys.append((item, rating, len(ids)))
                budget -= len(ids)
            else:
                earlier.append(ids)
            summary_left -= len(ids)
        if not chosen:
            continue
        chosen.reverse()
        chosen_items.reverse()
        chosen_keys.reverse()
        if mark_ratings:
            rating_mask.append([flag for item, rating, kept in chosen_keys for flag in flag_cache[(item, rating)][:kept]])
        flat = [t for ids in chosen for t in ids]
        users.append(str(user_tokens[uids[rows[0]]]))
        token_ids.append(flat)
        summary_ids.append([t for ids in earlier[::-1] for t in ids] + flat if earlier else flat)
        texts.append(tokenizer.decode(flat))
        items.append(chosen_items)
        counts.append(len(rows))
    with_history = set(users)
    without = [str(t) for t in user_tokens[1:] if str(t) not in with_history]
    if logger:
        logger.info(
            f"Behaviour text from the training split: {len(users)} users, {sum(map(len, token_ids))} tokens "
            f"(mean {np.mean([len(t) for t in token_ids]) if users else 0:.1f}/user, budget "
            f"{settings.max_behaviour_tokens}), {len(without)} users without training history"
            + (f"; the summaries read {np.mean([len(t) for t in summary_ids]):.1f} tokens/user (budget "
               f"{summary_budget})" if summary_budget > settings.max_behaviour_tokens else "")
            + (f", {missing_items} interactions with items missing from .item skipped" if missing_items else "") + "."
        )
    if not users:
        raise BehaviourTextError("No user has a training interaction with a described item: nothing to infer from.")
    return BehaviourCorpus(users, token_ids, texts, items, without, counts, summary_ids,
                            rating_mask if mark_ratings else None)
