"""Raw public datasets to RecBole atomic files with item text: MovieLens, Amazon Reviews 2018/2023, Yelp.

Python API::

    from recbole_uip.convert import convert_dataset
    result = convert_dataset("amazon2018", input="Video_Games.json.gz", meta="meta_Video_Games.json.gz",
                             output_dir="dataset", k_core=5)
    result.folder      # dataset/Amazon_Video_Games (holds Amazon_Video_Games.inter/.item)
    print(result.report.summary())

Command line: ``python -m recbole_uip convert FORMAT --input=... [--uip=true]`` (``recbole_uip.convert.cli``).
Formats, field names and how each dataset finds its preset: docs/datasets.md.
"""

from __future__ import annotations

from recbole_uip.convert.amazon import Amazon2018, Amazon2023
from recbole_uip.convert.base import ConversionResult, ConvertOptions, Converter, convert
from recbole_uip.convert.common import ConversionError, ConversionReport
from recbole_uip.convert.movielens import (
    MovieLens10M, MovieLens100K, MovieLens25M, MovieLensCSV, MovieLensDat, MovieLensLatest,
)
from recbole_uip.convert.yelp import Yelp

FORMATS: dict[str, type[Converter]] = {
    cls.format: cls for cls in (MovieLens100K, MovieLensDat, MovieLens10M, MovieLensCSV, MovieLens25M, MovieLensLatest,
                                Amazon2018, Amazon2023, Yelp)
}


def convert_dataset(format: str, input, **options) -> ConversionResult:
    """Convert raw files of ``format`` (a key of :data:`FORMATS`) to ``<output_dir>/<name>/``.

    Args:
        input: the raw interactions file, or the extracted folder (MovieLens, Yelp).
        **options: the fields of :class:`ConvertOptions` (``meta``, ``users``, ``output_dir``, ``name``, ``k_core``,
            ``min_rating``, ``description_chars``, ``progress``).

    Raises:
        ConversionError: unknown format, missing input, bad option, nothing left after the filters.
    """
    if format not in FORMATS:
        raise ConversionError(f"unknown format {format!r}; formats: {', '.join(FORMATS)}.")
    return convert(FORMATS[format](ConvertOptions(input=input, **options)))


__all__ = ["FORMATS", "convert_dataset", "ConversionError", "ConversionReport", "ConversionResult", "ConvertOptions"]
