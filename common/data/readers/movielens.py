"""MovieLens' line formats: 100K ``u.data`` (tab-separated) and 1M/10M ``ratings.dat`` (``::``-separated).

MovieLens' CSV (``ratings.csv``) is a table with fixed column names: ``table.read_table``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from common.data.readers.parsing import Rows, finite_number, integer_id, numbered_lines
from common.errors import DataError


def read_movielens_lines(path: Path, separator: str) -> pd.DataFrame:
    rows = Rows()
    for number, line in numbered_lines(path):
        fields = line.split(separator)
        if len(fields) != 4:
            raise DataError(
                f"expected 4 fields (user, item, rating, time) separated by {separator!r}, found {len(fields)}",
                path,
                number,
            )
        user = integer_id(fields[0], "user", path, number)
        item = integer_id(fields[1], "item", path, number)
        finite_number(fields[2], "rating", path, number)
        timestamp = integer_id(fields[3], "timestamp", path, number)
        rows.add(user, item, float(timestamp))
    return rows.frame()
