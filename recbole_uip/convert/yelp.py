"""Yelp Open Dataset: ``yelp_academic_dataset_review.json``, ``..._business.json`` and (optional) ``..._user.json``.

Field names follow RecSysDatasets' ``yelp``: ``.inter`` ``user_id:token business_id:token stars:float
useful:float funny:float cool:float date:float``; ``.item`` ``business_id:token item_name:token_seq address:token_seq
city:token_seq state:token postal_code:token latitude:float longitude:float item_stars:float
item_review_count:float is_open:float categories:token_seq``; ``.user`` ``user_id:token user_review_count:float
yelping_since:float user_useful:float user_funny:float user_cool:float elite:token_seq fans:float
average_stars:float``. Differences: ``review_id`` is left out of ``.inter`` (one token per row, no use as a feature),
and the user's name and ``compliment_*`` counts out of ``.user``; dates are read as UTC (RecSysDatasets uses the
converting machine's local time zone); ``elite`` years are a ``token_seq``; categories are words, not one token.
"""

from __future__ import annotations

import calendar
import time
from pathlib import Path

from recbole_uip.convert.base import Converter
from recbole_uip.convert.common import (
    Column, ConversionError, InterFields, Interactions, TableWriter, add_interaction, as_float, clean_list,
    clean_text, count_empty, first_existing, format_number, iter_json_lines, kept_id, require_file,
)

REVIEW, BUSINESS, USER = ("yelp_academic_dataset_review.json", "yelp_academic_dataset_business.json",
                          "yelp_academic_dataset_user.json")


def parse_date(value) -> float | None:
    """``"2016-03-09 00:44:42"`` (or ``"2016-03-09"``) as UTC seconds since the epoch; None if unreadable."""
    if not isinstance(value, str):
        return None
    for pattern in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d"):
        try:
            return float(calendar.timegm(time.strptime(value.strip(), pattern)))
        except ValueError:
            continue
    return None


def _number(value) -> str:
    number = as_float(value)
    return "" if number is None else format_number(number)


class Yelp(Converter):
    """The Yelp Open Dataset (any release with the academic-dataset JSON files)."""

    format = "yelp"
    description = "Yelp Open Dataset: --input=<folder with yelp_academic_dataset_*.json> (or the review file)"
    example = "python -m recbole_uip convert yelp --input=yelp_dataset/ --k_core=10"
    fields = InterFields("user_id", "business_id", "stars", "date", extras=("useful", "funny", "cool"))
    preset = "yelp"

    def check_inputs(self) -> None:
        source = self.options.input
        folder = source if source.is_dir() else source.parent
        if source.is_dir():
            found = first_existing(source, [REVIEW])
            if found is None:
                raise ConversionError(f"{source / REVIEW}: file not found (--input is the Yelp folder or its review "
                                      f"file).")
            source = found
        self.reviews = require_file(source, "--input, the Yelp review file")
        meta = self.options.meta or first_existing(folder, [BUSINESS])
        if meta is None:
            raise ConversionError(f"{folder / BUSINESS}: file not found; pass --meta=<business file>.")
        self.business = require_file(meta, "--meta, the Yelp business file")
        self.user = self.options.users or first_existing(folder, [USER])
        if self.user is not None:
            self.user = require_file(self.user, "--users, the Yelp user file")

    def default_name(self) -> str:
        return "yelp"

    def read_interactions(self, report) -> Interactions:
        inter = Interactions(extras=self.fields.extras)
        for record in iter_json_lines(self.reviews, report, "reviews", self.options.progress):
            date = record.get("date")
            when = parse_date(date)
            if date is not None and when is None:
                report.missing["reviews.date (unreadable)"] += 1
            add_interaction(inter, report, "reviews", record.get("user_id"), record.get("business_id"),
                            as_float(record.get("stars")), when,
                            [as_float(record.get(key)) for key in self.fields.extras],
                            user_key="user_id", item_key="business_id")
        return inter

    def write_sides(self, folder, name, inter, users, items, report) -> None:
        text = [("item_name", "token_seq", "name"), ("address", "token_seq", "address"), ("city", "token_seq", "city"),
                ("state", "token", "state"), ("postal_code", "token", "postal_code")]
        numbers = [("latitude", "latitude"), ("longitude", "longitude"), ("item_stars", "stars"),
                   ("item_review_count", "review_count"), ("is_open", "is_open")]
        columns = ([Column(n, t) for n, t, _ in text] + [Column(n, "float") for n, _ in numbers]
                   + [Column("categories", "token_seq")])
        writer = TableWriter(folder / f"{name}.item", "business_id:token", columns, inter.items, items)
        for record in iter_json_lines(self.business, report, "business", self.options.progress):
            business = kept_id(record, "business_id", inter.items, report, "business")
            if business is None:
                continue
            values = [clean_text(record.get(key)) for _, _, key in text]
            values += [_number(record.get(key)) for _, key in numbers]
            values.append(clean_list(record.get("categories")))
            count_empty(report, "business", (("name", values[0]), ("categories", values[-1])))
            writer.write(business, values)
        report.items_without_metadata = writer.finish(fill_missing=True)
        if self.user is None:
            report.notes.append("no Yelp user file: no .user file written")
            return
        self._write_users(folder / f"{name}.user", inter, users, report)

    def _write_users(self, path: Path, inter, users, report) -> None:
        numbers = [("user_review_count", "review_count"), ("yelping_since", "yelping_since"),
                   ("user_useful", "useful"), ("user_funny", "funny"), ("user_cool", "cool")]
        tail = [("fans", "fans"), ("average_stars", "average_stars")]
        columns = ([Column(n, "float") for n, _ in numbers] + [Column("elite", "token_seq")]
                   + [Column(n, "float") for n, _ in tail])
        writer = TableWriter(path, "user_id:token", columns, inter.users, users)
        for record in iter_json_lines(self.user, report, "users", self.options.progress):
            user = kept_id(record, "user_id", inter.users, report, "users")
            if user is None:
                continue
            since = parse_date(record.get("yelping_since"))
            values = [_number(record.get("review_count")), "" if since is None else format_number(since)]
            values += [_number(record.get(key)) for _, key in numbers[2:]]
            # newer releases write the year 2020 as "20,20" inside the comma-separated list
            values.append(clean_list(str(record.get("elite") or "").replace("20,20", "2020")))
            values += [_number(record.get(key)) for _, key in tail]
            writer.write(user, values)
        writer.finish(fill_missing=True)
