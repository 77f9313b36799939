"""MovieLens (GroupLens): 100k (``u.data``/``u.item``/``u.user``), 1M and 10M (``*.dat``, latin-1), 20M/25M/latest (CSV).

Field names follow RecSysDatasets: ml-100k as RecBole's bundled files (``movie_title:token_seq``,
``release_year:token``, ``class:token_seq``); ml-1m/10m ``movie_title``, ``release_year``, ``genre``; the CSV releases
``movie_name``, ``release_year``, ``type`` (RecSysDatasets' ml-20m names, used for 25M and latest too). Titles are
``token_seq`` everywhere (the words reach the behaviour text). The year is the last ``(YYYY)`` of the title, which is
removed from it.
"""

from __future__ import annotations

import re
from pathlib import Path

from recbole_uip.convert.base import Converter
from recbole_uip.convert.common import (
    Column, ConversionError, add_interaction, ConversionReport, InterFields, Interactions, TableWriter, as_float, clean_text,
    iter_csv, iter_delimited,
)

ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
                 "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]
_YEAR = re.compile(r"\((\d{4})(?:[-\u2013]\d{0,4})?\)")


def split_title(raw: str) -> tuple[str, str]:
    """``"Toy Story (1995)"`` -> ``("Toy Story", "1995")``: the last ``(YYYY)`` (or ``(YYYY-YYYY)``) group is the year
    and is removed; a title without one keeps an empty year. Text is cleaned (:func:`clean_text`)."""
    title = clean_text(raw)
    matches = list(_YEAR.finditer(title))
    if not matches:
        return title, ""
    last = matches[-1]
    return clean_text(title[:last.start()] + " " + title[last.end():]), last.group(1)


class _MovieLens(Converter):
    fields = InterFields("user_id", "item_id", "rating", "timestamp")
    release = ""

    def folder_file(self, name: str, required: bool = True) -> Path | None:
        path = self.options.input / name
        if path.is_file():
            return path
        if required:
            raise ConversionError(f"{path}: file not found (--input is the extracted MovieLens folder, which holds "
                                  f"{name}).")
        return None

    def check_inputs(self) -> None:
        if not self.options.input.is_dir():
            raise ConversionError(f"{self.options.input}: not a folder (--input is the extracted {self.release} folder).")

    def default_name(self) -> str:
        return self.release

    def read_delimited_ratings(self, path: Path, separator: str, report: ConversionReport,
                               encoding: str = "utf-8") -> Interactions:
        """The interactions of a ``user, item, rating, time`` file without a header (``u.data``, ``ratings.dat``)."""
        inter = Interactions()
        for values in iter_delimited(path, report, path.name, separator, 4, encoding=encoding,
                                     progress=self.options.progress):
            add_interaction(inter, report, path.name, values[0], values[1], as_float(values[2]), as_float(values[3]))
        return inter

    def write_user_file(self, path: Path | None, missing_name: str, separator: str, order: tuple[int, ...],
                        folder: Path, name: str, inter: Interactions, users, report: ConversionReport) -> None:
        """``<name>.user`` with RecSysDatasets' columns ``age gender occupation zip_code``, taken from the columns
        ``order`` of each line of the latin-1 user file ``path`` (None: ``missing_name`` is absent, noted)."""
        if path is None:
            report.notes.append(f"no {missing_name}: no .user file written")
            return
        columns = [Column(c, "token") for c in ("age", "gender", "occupation", "zip_code")]
        writer = TableWriter(folder / f"{name}.user", "user_id:token", columns, inter.users, users)
        for values in iter_delimited(path, report, path.name, separator, 5, encoding="latin-1",
                                     progress=self.options.progress):
            writer.write(values[0], [clean_text(values[i]) for i in order])
        writer.finish(fill_missing=True)


class MovieLens100K(_MovieLens):
    """ml-100k: ``u.data`` (tab), ``u.item`` and ``u.user`` (``|``, latin-1); reproduces RecBole's bundled files."""

    format = "ml-100k"
    release = "ml-100k"
    description = "MovieLens 100K: the folder with u.data, u.item, u.user"
    example = "python -m recbole_uip convert ml-100k --input=ml-100k/ --output_dir=dataset"
    preset = "ml-100k"

    def check_inputs(self) -> None:
        super().check_inputs()
        self.data = self.folder_file("u.data")
        self.item = self.folder_file("u.item")
        self.user = self.folder_file("u.user", required=False)

    def read_interactions(self, report: ConversionReport) -> Interactions:
        return self.read_delimited_ratings(self.data, "\t", report)

    def write_sides(self, folder, name, inter, users, items, report) -> None:
        columns = [Column("movie_title", "token_seq"), Column("release_year", "token"), Column("class", "token_seq")]
        writer = TableWriter(folder / f"{name}.item", "item_id:token", columns, inter.items, items)
        for values in iter_delimited(self.item, report, "u.item", "|", 5 + len(ML100K_GENRES), encoding="latin-1",
                                     progress=self.options.progress):
            title, year = split_title(values[1])
            if not year:                      # the release date, e.g. 01-Jan-1995, where the title has no year
                year = values[2][-4:] if re.fullmatch(r"\d{2}-\w{3}-\d{4}", values[2]) else ""
            genres = " ".join(g for g, flag in zip(ML100K_GENRES, values[5:]) if flag.strip() == "1")
            writer.write(values[0], [title, year, genres])
        report.items_without_metadata = writer.finish(fill_missing=True)
        # u.user is user id|age|gender|occupation|zip code
        self.write_user_file(self.user, "u.user", "|", (1, 2, 3, 4), folder, name, inter, users, report)


class MovieLensDat(_MovieLens):
    """ml-1m and ml-10m: ``ratings.dat``, ``movies.dat``, ``users.dat`` (1M only), ``::``-separated, latin-1."""

    format = "ml-1m"
    release = "ml-1m"
    description = "MovieLens 1M/10M: the folder with ratings.dat, movies.dat[, users.dat]"
    example = "python -m recbole_uip convert ml-1m --input=ml-1m/ --output_dir=dataset"
    preset = "movielens"

    def check_inputs(self) -> None:
        super().check_inputs()
        self.ratings = self.folder_file("ratings.dat")
        self.movies = self.folder_file("movies.dat")
        self.user = self.folder_file("users.dat", required=False)

    def read_interactions(self, report: ConversionReport) -> Interactions:
        return self.read_delimited_ratings(self.ratings, "::", report, encoding="latin-1")

    def write_sides(self, folder, name, inter, users, items, report) -> None:
        columns = [Column("movie_title", "token_seq"), Column("release_year", "token"), Column("genre", "token_seq")]
        writer = TableWriter(folder / f"{name}.item", "item_id:token", columns, inter.items, items)
        for values in iter_delimited(self.movies, report, "movies.dat", "::", 3, encoding="latin-1",
                                     progress=self.options.progress):
            title, year = split_title(values[1])
            writer.write(values[0], [title, year, _genres(values[2])])
        report.items_without_metadata = writer.finish(fill_missing=True)
        # users.dat is UserID::Gender::Age::Occupation::Zip-code; written under RecSysDatasets' column order
        self.write_user_file(self.user, "users.dat", "::", (2, 1, 3, 4), folder, name, inter, users, report)


class MovieLens10M(MovieLensDat):
    format = "ml-10m"
    release = "ml-10m"
    description = "MovieLens 10M: the folder with ratings.dat, movies.dat"
    example = "python -m recbole_uip convert ml-10m --input=ml-10M100K/ --output_dir=dataset"


def _genres(text: str) -> str:
    """``Action|Sci-Fi`` -> ``Action Sci-Fi``; ``(no genres listed)`` -> ``''``."""
    return " ".join(g for g in (clean_text(x) for x in text.split("|")) if g and g != "(no genres listed)")


class MovieLensCSV(_MovieLens):
    """ml-20m, ml-25m, ml-latest(-small): ``ratings.csv`` and ``movies.csv`` with headers (no user file)."""

    format = "ml-20m"
    release = "ml-20m"
    description = "MovieLens 20M: the folder with ratings.csv, movies.csv"
    example = "python -m recbole_uip convert ml-20m --input=ml-20m/ --output_dir=dataset"
    preset = "movielens-csv"

    def check_inputs(self) -> None:
        super().check_inputs()
        self.ratings = self.folder_file("ratings.csv")
        self.movies = self.folder_file("movies.csv")

    def read_interactions(self, report: ConversionReport) -> Interactions:
        inter = Interactions()
        columns = ("userId", "movieId", "rating", "timestamp")
        for row in iter_csv(self.ratings, report, "ratings.csv", columns, progress=self.options.progress):
            add_interaction(inter, report, "ratings.csv", row["userId"], row["movieId"], as_float(row["rating"]),
                            as_float(row["timestamp"]), user_key="userId", item_key="movieId")
        report.notes.append("MovieLens CSV releases have no user file: no .user file written")
        return inter

    def write_sides(self, folder, name, inter, users, items, report) -> None:
        columns = [Column("movie_name", "token_seq"), Column("release_year", "token"), Column("type", "token_seq")]
        writer = TableWriter(folder / f"{name}.item", "item_id:token", columns, inter.items, items)
        for row in iter_csv(self.movies, report, "movies.csv", ("movieId", "title", "genres"),
                            progress=self.options.progress):
            title, year = split_title(row["title"])
            writer.write(row["movieId"], [title, year, _genres(row["genres"])])
        report.items_without_metadata = writer.finish(fill_missing=True)


class MovieLens25M(MovieLensCSV):
    format = "ml-25m"
    release = "ml-25m"
    description = "MovieLens 25M: the folder with ratings.csv, movies.csv"
    example = "python -m recbole_uip convert ml-25m --input=ml-25m/ --output_dir=dataset"


class MovieLensLatest(MovieLensCSV):
    format = "ml-latest"
    release = "ml-latest"
    description = "MovieLens latest / latest-small: the folder with ratings.csv, movies.csv"
    example = "python -m recbole_uip convert ml-latest --input=ml-latest-small/ --name=ml-latest-small"
