"""What every reader shares: a column-wise accumulator of rows, and checked parsing of lines, ids, numbers and times.

A value that does not parse is an error naming its file and line, never skipped or coerced.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pandas as pd

from common.errors import DataError

ASCII_INTEGER = re.compile(r"[0-9]+", re.ASCII)


class Rows:
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


def numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
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


def integer_id(token: str, what: str, path: Path, line: int) -> str:
    token = token.strip()
    if not ASCII_INTEGER.fullmatch(token):
        raise DataError(f"{what} id '{token}' is not a non-negative integer", path, line)
    return str(int(token))


def finite_number(token: str, what: str, path: Path | None, line: int | None) -> float:
    try:
        value = float(token)
    except ValueError:
        raise DataError(f"{what} '{token.strip()}' is not a number", path, line) from None
    if not math.isfinite(value):
        raise DataError(f"{what} '{token.strip()}' is not a finite number", path, line)
    return value


def parse_timestamp(token: str, path: Path | None, line: int | None) -> float:
    """A number (unix time or any sortable clock) or an ISO-8601 date-time."""
    token = token.strip()
    try:
        return finite_number(token, "timestamp", path, line)
    except DataError:
        pass
    try:
        return datetime.fromisoformat(token).timestamp()
    except ValueError:
        raise DataError(f"timestamp '{token}' is neither a number nor an ISO-8601 date-time", path, line) from None
