"""Readers for interaction logs in the formats recommender data comes in.

Every reader returns the same frame: one row per interaction with columns
``user`` and ``item`` (raw ids as strings), ``timestamp`` (float, NaN when the
format has none), ``order`` (position in the file, the tie-breaker and the
clock when there are no timestamps) and, when the data names it, ``site``.

Line-based formats are parsed line by line on purpose: a malformed line must be
reported with its file and line number, never silently skipped or coerced.

One module per file format; this one detects the format and dispatches.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from common.data.readers.movielens import read_movielens_lines
from common.data.readers.parquet import read_parquet
from common.data.readers.parsing import ASCII_INTEGER, Rows, numbered_lines
from common.data.readers.sequences import read_pairs, read_sequences
from common.data.readers.table import ColumnNames, read_table
from common.errors import DataError

__all__ = ["FORMATS", "ColumnNames", "detect_format", "read_interactions"]

FORMATS: dict[str, str] = {
    "movielens-raw": "MovieLens 100K u.data: user<TAB>item<TAB>rating<TAB>unix_time",
    "movielens-dat": "MovieLens 1M/10M ratings.dat: user::item::rating::unix_time",
    "movielens-csv": "MovieLens CSV with header userId,movieId,rating,timestamp",
    "csv": "comma-separated with a header naming user/item[/timestamp][/site] columns",
    "tsv": "tab-separated with a header naming user/item[/timestamp][/site] columns",
    "parquet": "Parquet table with user/item[/timestamp][/site] columns",
    "sequences": "one user per line: user item1 item2 ... (oldest first)",
    "pairs": "one interaction per line: user item (in time order)",
}
_DIRECTORY_FILES: dict[str, str] = {
    "u.data": "movielens-raw",
    "ratings.dat": "movielens-dat",
    "ratings.csv": "movielens-csv",
}


def read_interactions(
    path: str | Path, fmt: str | None = None, columns: ColumnNames = ColumnNames(), allow_empty: bool = False
) -> pd.DataFrame:
    """Read one interaction log; ``fmt=None`` detects the format from name and content.

    ``allow_empty``: an empty file, or one that holds no interactions, gives an empty frame instead of an error (a
    site's own file: a site of no users trains like any other).
    """
    path = Path(path)
    if not path.exists():
        raise DataError("no such file or directory", path)
    if path.is_dir():
        path, detected = _resolve_directory(path)
        fmt = fmt or detected
    if allow_empty and _holds_nothing(path, fmt):
        return Rows().frame()
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise DataError(f"unknown format '{fmt}'; known formats: {', '.join(FORMATS)}", path)
    if path.stat().st_size == 0:
        raise DataError("the file is empty", path)
    readers: dict[str, Callable[[Path, ColumnNames], pd.DataFrame]] = {
        "movielens-raw": lambda p, _c: read_movielens_lines(p, "\t"),
        "movielens-dat": lambda p, _c: read_movielens_lines(p, "::"),
        "movielens-csv": lambda p, _c: read_table(
            p, ",", ColumnNames("userId", "movieId", "timestamp"), integer_ids=True
        ),
        "csv": lambda p, c: read_table(p, ",", c),
        "tsv": lambda p, c: read_table(p, "\t", c),
        "parquet": read_parquet,
        "sequences": lambda p, _c: read_sequences(p),
        "pairs": lambda p, _c: read_pairs(p),
    }
    frame = readers[fmt](path, columns)
    if frame.empty and not allow_empty:
        raise DataError("the file holds no interactions", path)
    return frame


def detect_format(path: Path) -> str:
    """Guess the format from the file name, then from its first lines; fail loudly when unsure."""
    name = path.name.lower()
    if name == "u.data":
        return "movielens-raw"
    if name.endswith(".parquet"):
        return "parquet"
    first_lines = _first_lines(path, 200)
    if not first_lines:
        raise DataError("the file is empty", path)
    first = first_lines[0]
    if name.endswith(".dat") or "::" in first:
        if len(first.split("::")) == 4:
            return "movielens-dat"
    if name.endswith(".csv"):
        header = [h.strip().lower() for h in first.split(",")]
        if "userid" in header and "movieid" in header:
            return "movielens-csv"
        return "csv"
    if name.endswith(".tsv"):
        return "tsv"
    fields = first.split("\t")
    if len(fields) == 4 and all(ASCII_INTEGER.fullmatch(f.strip()) for f in fields):
        return "movielens-raw"
    token_counts = {len(line.split()) for line in first_lines}
    if token_counts == {2}:
        return "pairs"
    if token_counts and min(token_counts) >= 2 and max(token_counts) > 2:
        return "sequences"
    raise DataError(
        "cannot detect the format; name it as FORMAT:PATH with FORMAT one of " + ", ".join(FORMATS),
        path,
    )


def _resolve_directory(path: Path) -> tuple[Path, str]:
    for file_name, fmt in _DIRECTORY_FILES.items():
        if (path / file_name).is_file():
            return path / file_name, fmt
    raise DataError(
        "is a directory without a known interaction file (" + ", ".join(_DIRECTORY_FILES) + "); name the file itself",
        path,
    )


def _holds_nothing(path: Path, fmt: str | None) -> bool:
    """An empty file, or a text file of blank lines only."""
    if path.stat().st_size == 0:
        return True
    if fmt == "parquet" or path.name.lower().endswith(".parquet"):
        return False
    try:
        return not _first_lines(path, 1)
    except DataError:  # not UTF-8 text: the reader says what is wrong
        return False


def _first_lines(path: Path, count: int) -> list[str]:
    lines: list[str] = []
    for _, line in numbered_lines(path):
        lines.append(line)
        if len(lines) >= count:
            break
    return lines
