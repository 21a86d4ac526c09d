"""Readers for interaction logs in the formats recommender data comes in.

Every reader returns the same frame: one row per interaction with columns
``user`` and ``item`` (raw ids as strings), ``timestamp`` (float, NaN when the
format has none), ``order`` (position in the file, the tie-breaker and the
clock when there are no timestamps) and, when the data names it, ``site``.

Line-based formats are parsed line by line on purpose: a malformed line must be
reported with its file and line number, never silently skipped or coerced.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pandas as pd

from common.errors import DataError

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

COLUMN_CANDIDATES: dict[str, tuple[str, ...]] = {
    "user": ("user", "user_id", "userid", "uid", "customer_id", "visitorid"),
    "item": ("item", "item_id", "itemid", "iid", "movieid", "movie_id", "product_id", "asin"),
    "timestamp": ("timestamp", "time", "ts", "datetime", "date", "unix_time"),
    "site": ("site", "site_id", "siteid"),
}

_DIRECTORY_FILES: dict[str, str] = {
    "u.data": "movielens-raw",
    "ratings.dat": "movielens-dat",
    "ratings.csv": "movielens-csv",
}

_ASCII_INTEGER = re.compile(r"[0-9]+", re.ASCII)


@dataclass(frozen=True)
class ColumnNames:
    """Column names for the generic table formats; ``None`` means detect from common names."""

    user: str | None = None
    item: str | None = None
    timestamp: str | None = None
    site: str | None = None


class _Rows:
    """Column-wise accumulator: far cheaper than a list of dicts on 10^6 lines."""

    def __init__(self, with_site: bool = False) -> None:
        self.user: list[str] = []
        self.item: list[str] = []
        self.timestamp: list[float] = []
        self.site: list[str] | None = [] if with_site else None

    def add(self, user: str, item: str, timestamp: float = math.nan, site: str | None = None) -> None:
        self.user.append(user)
        self.item.append(item)
        self.timestamp.append(timestamp)
        if self.site is not None:
            self.site.append(site if site is not None else "")

    def frame(self) -> pd.DataFrame:
        columns: dict[str, object] = {
            "user": pd.array(self.user, dtype="string"),
            "item": pd.array(self.item, dtype="string"),
            "timestamp": pd.array(self.timestamp, dtype="float64"),
            "order": range(len(self.user)),
        }
        if self.site is not None:
            columns["site"] = pd.array(self.site, dtype="string")
        return pd.DataFrame(columns)


def read_interactions(path: str | Path, fmt: str | None = None, columns: ColumnNames = ColumnNames()) -> pd.DataFrame:
    """Read one interaction log; ``fmt=None`` detects the format from name and content."""
    path = Path(path)
    if not path.exists():
        raise DataError("no such file or directory", path)
    if path.is_dir():
        path, detected = _resolve_directory(path)
        fmt = fmt or detected
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise DataError(f"unknown format '{fmt}'; known formats: {', '.join(FORMATS)}", path)
    if path.stat().st_size == 0:
        raise DataError("the file is empty", path)
    readers: dict[str, Callable[[Path, ColumnNames], pd.DataFrame]] = {
        "movielens-raw": lambda p, _c: _read_movielens_lines(p, "\t"),
        "movielens-dat": lambda p, _c: _read_movielens_lines(p, "::"),
        "movielens-csv": lambda p, _c: _read_table(
            p, ",", ColumnNames("userId", "movieId", "timestamp"), integer_ids=True
        ),
        "csv": lambda p, c: _read_table(p, ",", c),
        "tsv": lambda p, c: _read_table(p, "\t", c),
        "parquet": _read_parquet,
        "sequences": lambda p, _c: _read_sequences(p),
        "pairs": lambda p, _c: _read_pairs(p),
    }
    frame = readers[fmt](path, columns)
    if frame.empty:
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
    if len(fields) == 4 and all(_ASCII_INTEGER.fullmatch(f.strip()) for f in fields):
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


def _first_lines(path: Path, count: int) -> list[str]:
    lines: list[str] = []
    for _, line in _numbered_lines(path):
        lines.append(line)
        if len(lines) >= count:
            break
    return lines


def _numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Non-blank lines with their 1-based numbers; undecodable bytes are an error, not a guess."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError("is not valid UTF-8 text", path, number) from None
            line = line.strip()
            if line:
                yield number, line


def _integer_id(token: str, what: str, path: Path, line: int) -> str:
    token = token.strip()
    if not _ASCII_INTEGER.fullmatch(token):
        raise DataError(f"{what} id '{token}' is not a non-negative integer", path, line)
    return str(int(token))


def _number(token: str, what: str, path: Path | None, line: int | None) -> float:
    try:
        value = float(token)
    except ValueError:
        raise DataError(f"{what} '{token.strip()}' is not a number", path, line) from None
    if not math.isfinite(value):
        raise DataError(f"{what} '{token.strip()}' is not a finite number", path, line)
    return value


def _timestamp(token: str, path: Path | None, line: int | None) -> float:
    """A number (unix time or any sortable clock) or an ISO-8601 date-time."""
    token = token.strip()
    try:
        return _number(token, "timestamp", path, line)
    except DataError:
        pass
    try:
        return datetime.fromisoformat(token).timestamp()
    except ValueError:
        raise DataError(f"timestamp '{token}' is neither a number nor an ISO-8601 date-time", path, line) from None


def _read_movielens_lines(path: Path, separator: str) -> pd.DataFrame:
    rows = _Rows()
    for number, line in _numbered_lines(path):
        fields = line.split(separator)
        if len(fields) != 4:
            raise DataError(
                f"expected 4 fields (user, item, rating, time) separated by {separator!r}, found {len(fields)}",
                path,
                number,
            )
        user = _integer_id(fields[0], "user", path, number)
        item = _integer_id(fields[1], "item", path, number)
        _number(fields[2], "rating", path, number)
        timestamp = _integer_id(fields[3], "timestamp", path, number)
        rows.add(user, item, float(timestamp))
    return rows.frame()


def _read_sequences(path: Path) -> pd.DataFrame:
    rows = _Rows()
    for number, line in _numbered_lines(path):
        tokens = line.split()
        if len(tokens) < 2:
            raise DataError("expected 'user item1 item2 ...', found a user with no items", path, number)
        user = tokens[0]
        for item in tokens[1:]:
            rows.add(user, item)
    return rows.frame()


def _read_pairs(path: Path) -> pd.DataFrame:
    rows = _Rows()
    for number, line in _numbered_lines(path):
        tokens = line.split()
        if len(tokens) != 2:
            raise DataError(f"expected 'user item', found {len(tokens)} fields", path, number)
        rows.add(tokens[0], tokens[1])
    return rows.frame()


def _pick_column(header: list[str], role: str, wanted: str | None, path: Path, required: bool) -> int | None:
    lowered = [name.strip().lower() for name in header]
    if wanted is not None:
        if wanted.lower() in lowered:
            return lowered.index(wanted.lower())
        raise DataError(f"has no column '{wanted}' for the {role}; its columns are {header}", path, 1)
    for candidate in COLUMN_CANDIDATES[role]:
        if candidate in lowered:
            return lowered.index(candidate)
    if required:
        raise DataError(
            f"no {role} column found among {header}; name it with --{role}-col",
            path,
            1,
        )
    return None


def _read_table(path: Path, delimiter: str, columns: ColumnNames, integer_ids: bool = False) -> pd.DataFrame:
    with path.open(newline="", encoding="utf-8", errors="strict") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError("the file is empty", path) from None
        except UnicodeDecodeError:
            raise DataError("is not valid UTF-8 text", path, 1) from None
        user_col = _pick_column(header, "user", columns.user, path, required=True)
        item_col = _pick_column(header, "item", columns.item, path, required=True)
        time_col = _pick_column(header, "timestamp", columns.timestamp, path, required=False)
        site_col = _pick_column(header, "site", columns.site, path, required=False)
        assert user_col is not None and item_col is not None
        rows = _Rows(with_site=site_col is not None)
        try:
            for fields in reader:
                number = reader.line_num
                if not fields or all(not f.strip() for f in fields):
                    continue
                if len(fields) != len(header):
                    raise DataError(f"expected {len(header)} fields like the header, found {len(fields)}", path, number)
                user, item = fields[user_col].strip(), fields[item_col].strip()
                if not user or not item:
                    raise DataError("empty user or item id", path, number)
                if integer_ids:
                    user = _integer_id(user, "user", path, number)
                    item = _integer_id(item, "item", path, number)
                timestamp = math.nan if time_col is None else _timestamp(fields[time_col], path, number)
                site = None if site_col is None else fields[site_col].strip()
                rows.add(user, item, timestamp, site)
        except UnicodeDecodeError:
            raise DataError("is not valid UTF-8 text", path, reader.line_num + 1) from None
        except csv.Error as error:
            raise DataError(f"malformed CSV: {error}", path, reader.line_num) from None
    return rows.frame()


def _read_parquet(path: Path, columns: ColumnNames) -> pd.DataFrame:
    try:
        table = pd.read_parquet(path)
    except ImportError:
        raise DataError("reading Parquet needs pyarrow: pip install 'fedtail[parquet]'", path) from None
    except Exception as error:  # pyarrow raises many types for a corrupt file
        raise DataError(f"cannot read as Parquet: {error}", path) from None
    header = [str(name) for name in table.columns]
    picked = {
        role: _pick_column(header, role, getattr(columns, role), path, required=role in ("user", "item"))
        for role in ("user", "item", "timestamp", "site")
    }
    rows = _Rows(with_site=picked["site"] is not None)
    values = {role: table.iloc[:, index].tolist() for role, index in picked.items() if index is not None}
    for row in range(len(table)):
        user, item = values["user"][row], values["item"][row]
        if pd.isna(user) or pd.isna(item) or str(user).strip() == "" or str(item).strip() == "":
            raise DataError(f"row {row + 1}: empty user or item id", path)
        timestamp = math.nan
        if "timestamp" in values:
            stamp = values["timestamp"][row]
            if isinstance(stamp, pd.Timestamp):
                timestamp = stamp.timestamp()
            elif pd.isna(stamp):
                raise DataError(f"row {row + 1}: missing timestamp", path)
            else:
                try:
                    timestamp = _timestamp(str(stamp), None, None)
                except DataError as error:
                    raise DataError(f"row {row + 1}: {error}", path) from None
        site = str(values["site"][row]) if "site" in values else None
        rows.add(str(user).strip(), str(item).strip(), timestamp, site)
    return rows.frame()
