"""Amazon Reviews (McAuley lab): the 2018 per-category reviews + metadata, and the 2023 reviews + metadata (JSON lines,
plain or gzipped).

Output fields follow RecSysDatasets' Amazon datasets: ``.inter`` ``user_id:token item_id:token rating:float
timestamp:float``; ``.item`` ``item_id:token title categories:token_seq brand:token`` (and ``description:token_seq``
with ``--description_chars``). We differ where text matters: ``title`` is ``token_seq`` (its words reach the behaviour
text, RecSysDatasets writes one ``token``), categories are the category phrases joined by spaces (RecSysDatasets writes
a Python set's repr), HTML entities are unescaped and tags removed, and price / sales rank are left out.

* 2018: reviews ``reviewerID, asin, overall, unixReviewTime`` (seconds); metadata ``asin, title, category (list),
  main_cat, brand, description (list)``.
* 2023: reviews ``user_id, parent_asin, rating, timestamp`` (milliseconds, written as seconds); metadata
  ``parent_asin, title, main_category, categories (list), store, details.Brand, description (list)``. Items are
  ``parent_asin`` (the product, not the variant), as the 2023 benchmark files.
"""

from __future__ import annotations

import re
from pathlib import Path

from recbole_uip.convert.base import Converter
from recbole_uip.convert.common import (
    Column, ConversionError, InterFields, Interactions, TableWriter, add_interaction, as_float, clean_list, clean_text,
    count_empty, iter_json_lines, kept_id, require_file,
)


class _Amazon(Converter):
    fields = InterFields("user_id", "item_id", "rating", "timestamp")
    preset = "amazon"
    has_description = True
    # record keys: review user, review item, rating, time, metadata item; time units per second
    user_key = item_key = rating_key = time_key = meta_key = ""
    time_units = 1

    def check_inputs(self) -> None:
        self.reviews = require_file(self.options.input, "--input, the reviews file")
        meta = self.options.meta
        if meta is None:
            meta = self._meta_beside(self.reviews)
            if meta is None:
                raise ConversionError(f"{self.reviews}: no metadata file given and none found beside it (looked for "
                                      f"meta_{self._category()}.json[l][.gz]); pass --meta=FILE.")
        self.meta = require_file(meta, "--meta, the metadata file")

    def _category(self) -> str:
        stem = self.reviews.name
        for suffix in (".gz", ".json", ".jsonl"):
            stem = stem[:-len(suffix)] if stem.endswith(suffix) else stem
        return re.sub(r"_5$", "", stem)

    def _meta_beside(self, reviews: Path) -> Path | None:
        for suffix in (".json.gz", ".json", ".jsonl.gz", ".jsonl"):
            candidate = reviews.parent / f"meta_{self._category()}{suffix}"
            if candidate.is_file():
                return candidate
        return None

    def default_name(self) -> str:
        return "Amazon_" + re.sub(r"[^A-Za-z0-9_\-]", "_", self._category())

    def read_interactions(self, report) -> Interactions:
        inter = Interactions()
        label = "reviews"
        units = self.time_units
        for record in iter_json_lines(self.reviews, report, label, self.options.progress):
            when = as_float(record.get(self.time_key))
            add_interaction(inter, report, label, record.get(self.user_key), self._review_item(record),
                            as_float(record.get(self.rating_key)), None if when is None else when / units,
                            user_key=self.user_key, item_key=self.item_key)
        return inter

    def _review_item(self, record: dict):
        return record.get(self.item_key)

    def write_sides(self, folder, name, inter, users, items, report) -> None:
        columns = [Column("title", "token_seq"), Column("categories", "token_seq"), Column("brand", "token")]
        chars = self.options.description_chars
        if chars:
            columns.append(Column("description", "token_seq"))
        writer = TableWriter(folder / f"{name}.item", "item_id:token", columns, inter.items, items)
        for record in iter_json_lines(self.meta, report, "metadata", self.options.progress):
            item = kept_id(record, self.meta_key, inter.items, report, "metadata")
            if item is None:
                continue
            values = [clean_text(record.get("title")), self._categories(record), self._brand(record)]
            if chars:
                values.append(clean_text(_joined(record.get("description")), chars))
            count_empty(report, "metadata", zip(("title", "categories", "brand"), values))
            writer.write(item, values)
        report.items_without_metadata = writer.finish(fill_missing=True)


def _joined(value) -> str:
    """A description: a list of paragraphs (2018, 2023) or a string."""
    if isinstance(value, list):
        return " ".join(v for v in value if isinstance(v, str))
    return value if isinstance(value, str) else ""


class Amazon2018(_Amazon):
    """Amazon Reviews 2018 (``Video_Games.json.gz`` + ``meta_Video_Games.json.gz``; the 5-core files too)."""

    format = "amazon2018"
    description = "Amazon Reviews 2018: --input=<Category>.json[.gz] --meta=meta_<Category>.json[.gz]"
    example = ("python -m recbole_uip convert amazon2018 --input=Video_Games.json.gz "
               "--meta=meta_Video_Games.json.gz --k_core=5")
    user_key, item_key, rating_key, time_key, meta_key = "reviewerID", "asin", "overall", "unixReviewTime", "asin"

    def _categories(self, record: dict) -> str:
        categories = record.get("category")
        return clean_list(categories) if categories else clean_list([record.get("main_cat")])

    def _brand(self, record: dict) -> str:
        return clean_text(record.get("brand"))


class Amazon2023(_Amazon):
    """Amazon Reviews 2023 (``Video_Games.jsonl.gz`` + ``meta_Video_Games.jsonl.gz``)."""

    format = "amazon2023"
    description = "Amazon Reviews 2023: --input=<Category>.jsonl[.gz] --meta=meta_<Category>.jsonl[.gz]"
    example = ("python -m recbole_uip convert amazon2023 --input=Video_Games.jsonl.gz "
               "--meta=meta_Video_Games.jsonl.gz --k_core=5")
    user_key, item_key, rating_key, time_key, meta_key = "user_id", "parent_asin", "rating", "timestamp", "parent_asin"
    time_units = 1000

    def _review_item(self, record: dict):
        return record.get("parent_asin") or record.get("asin")

    def _categories(self, record: dict) -> str:
        return clean_list([record.get("main_category")] + list(record.get("categories") or []))

    def _brand(self, record: dict) -> str:
        details = record.get("details")
        brand = details.get("Brand") if isinstance(details, dict) else None
        return clean_text(brand or record.get("store"))
