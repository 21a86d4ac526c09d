"""Delimited tables with a header (CSV, TSV, MovieLens' ratings.csv): the user, item, time and site columns, by name."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from common.data.readers.parsing import Rows, integer_id, parse_timestamp
from common.errors import DataError

COLUMN_CANDIDATES: dict[str, tuple[str, ...]] = {
    "user": ("user", "user_id", "userid", "uid", "customer_id", "visitorid"),
    "item": ("item", "item_id", "itemid", "iid", "movieid", "movie_id", "product_id", "asin"),
    "timestamp": ("timestamp", "time", "ts", "datetime", "date", "unix_time"),
    "site": ("site", "site_id", "siteid"),
}


@dataclass(frozen=True)
class ColumnNames:
    """Column names for the generic table formats; ``None`` means detect from common names."""

    user: str | None = None
    item: str | None = None
    timestamp: str | None = None
    site: str | None = None


def pick_column(header: list[str], role: str, wanted: str | None, path: Path, required: bool) -> int | None:
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


def read_table(path: Path, delimiter: str, columns: ColumnNames, integer_ids: bool = False) -> pd.DataFrame:
    with path.open(newline="", encoding="utf-8", errors="strict") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError("the file is empty", path) from None
        except UnicodeDecodeError:
            raise DataError("is not valid UTF-8 text", path, 1) from None
        user_col = pick_column(header, "user", columns.user, path, required=True)
        item_col = pick_column(header, "item", columns.item, path, required=True)
        time_col = pick_column(header, "timestamp", columns.timestamp, path, required=False)
        site_col = pick_column(header, "site", columns.site, path, required=False)
        assert user_col is not None and item_col is not None
        rows = Rows(with_site=site_col is not None)
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
                    user = integer_id(user, "user", path, number)
                    item = integer_id(item, "item", path, number)
                timestamp = math.nan if time_col is None else parse_timestamp(fields[time_col], path, number)
                site = None if site_col is None else fields[site_col].strip()
                rows.add(user, item, timestamp, site)
        except UnicodeDecodeError:
            raise DataError("is not valid UTF-8 text", path, reader.line_num + 1) from None
        except csv.Error as error:
            raise DataError(f"malformed CSV: {error}", path, reader.line_num) from None
    return rows.frame()
