"""The conversion driver every format shares: read interactions, filter, write the atomic files, report.

A format is a :class:`Converter` subclass: it names its ``.inter`` fields, streams its interactions into an
:class:`~recbole_uip.convert.common.Interactions`, and writes its ``.item`` (and ``.user``) rows for the ids that
survive the filters. :func:`convert` runs one, publishing the folder atomically.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from recbole_uip.convert.common import (
    ConversionError, ConversionReport, InterFields, Interactions, apply_filters, check_name, publish_dataset,
    used_ids, write_inter,
)


@dataclasses.dataclass
class ConvertOptions:
    """What the user asked for.

    Attributes:
        input: the raw interactions (a file, or the extracted folder for MovieLens and Yelp).
        meta: item metadata (Amazon ``meta_*.json[l][.gz]``, Yelp business JSON); found beside ``input`` if None.
        users: user records (Yelp user JSON); optional.
        output_dir: the folder that receives ``<name>/`` (RecBole's ``data_path``).
        name: the dataset name; None: the format's default (``ml-1m``, ``Amazon_Video_Games``, ``yelp``).
        k_core: keep only users and items with at least this many interactions (repeated until stable); 0/1: off.
        min_rating: drop interactions rated below this.
        description_chars: add a ``description:token_seq`` item field cut to this many characters (Amazon); 0: none.
        progress: show progress bars (only on a terminal).
    """

    input: Path
    meta: Path | None = None
    users: Path | None = None
    output_dir: Path = Path("dataset")
    name: str | None = None
    k_core: int = 0
    min_rating: float | None = None
    description_chars: int = 0
    progress: bool = True

    def __post_init__(self):
        self.input = Path(self.input).expanduser()
        self.meta = Path(self.meta).expanduser() if self.meta else None
        self.users = Path(self.users).expanduser() if self.users else None
        self.output_dir = Path(self.output_dir).expanduser()
        if not isinstance(self.k_core, int) or isinstance(self.k_core, bool) or self.k_core < 0:
            raise ConversionError(f"--k_core must be an integer >= 0, got {self.k_core!r}.")
        if not isinstance(self.description_chars, int) or isinstance(self.description_chars, bool) \
                or self.description_chars < 0:
            raise ConversionError(f"--description_chars must be an integer >= 0, got {self.description_chars!r}.")
        if self.min_rating is not None:
            try:
                self.min_rating = float(self.min_rating)
            except (TypeError, ValueError):
                raise ConversionError(f"--min_rating must be a number, got {self.min_rating!r}.") from None


@dataclasses.dataclass
class ConversionResult:
    """A finished conversion: the dataset folder, its name, the report and the preset that fits its files."""

    folder: Path
    name: str
    report: ConversionReport
    preset: str


class Converter:
    """One raw format. Subclasses set the class attributes and implement the four methods below.

    Attributes:
        format: the name on the command line (``amazon2018``).
        description: one line for ``--help``; ``example``: a command for ``--help``.
        fields: the ``.inter`` header names.
        preset: the ``properties/dataset/<preset>.yaml`` that fits the files written.
        has_description: whether ``--description_chars`` applies.
    """

    format: str = ""
    description: str = ""
    example: str = ""
    fields: InterFields = InterFields()
    preset: str = ""
    has_description: bool = False

    def __init__(self, options: ConvertOptions):
        self.options = options

    def check_inputs(self) -> None:
        """Resolve and check every input path before anything is read (raise :class:`ConversionError`)."""
        raise NotImplementedError

    def default_name(self) -> str:
        raise NotImplementedError

    def read_interactions(self, report: ConversionReport) -> Interactions:
        """Stream the interactions (pass 1)."""
        raise NotImplementedError

    def write_sides(self, folder: Path, name: str, inter: Interactions, users, items, report: ConversionReport) -> None:
        """Write ``<name>.item`` (and ``<name>.user``) into ``folder`` for the wanted ids (bool arrays ``users``,
        ``items`` over the interned ids)."""
        raise NotImplementedError


def convert(converter: Converter) -> ConversionResult:
    """Run ``converter``: inputs checked, interactions read and filtered, the folder published in one rename.

    Raises:
        ConversionError: a missing input, a bad option, nothing left after the filters (nothing is written).
    """
    options = converter.options
    start = time.perf_counter()
    if options.description_chars and not converter.has_description:
        raise ConversionError(f"--description_chars: the {converter.format} format has no item description.")
    converter.check_inputs()
    name = check_name(options.name or converter.default_name())
    report = ConversionReport(format=converter.format, name=name)
    inter = converter.read_interactions(report)
    if not len(inter):
        raise ConversionError(f"{options.input}: no interaction could be read ({sum(report.lines.values())} lines, "
                              f"{sum(report.malformed.values())} malformed). Is it the right file and format?")
    keep, fields = apply_filters(inter, converter.fields, report, options.min_rating, options.k_core, options.input)
    users, items = used_ids(inter, keep)
    report.interactions, report.users, report.items = int(keep.sum()), int(users.sum()), int(items.sum())

    def build(folder: Path) -> None:
        write_inter(folder / f"{name}.inter", inter, fields, keep)
        converter.write_sides(folder, name, inter, users, items, report)

    folder = publish_dataset(options.output_dir, name, build)
    report.seconds = round(time.perf_counter() - start, 2)
    from recbole_uip.utils import write_json_atomic

    write_json_atomic(options.output_dir / f"{name}.convert.json", report.as_dict())
    return ConversionResult(folder=folder, name=name, report=report, preset=converter.preset)
