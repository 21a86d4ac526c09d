"""Whitespace-separated text: one user's items per line (sequences) or one user-item pair per line (pairs)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from common.data.readers.parsing import Rows, numbered_lines
from common.errors import DataError


def read_sequences(path: Path) -> pd.DataFrame:
    rows = Rows()
    for number, line in numbered_lines(path):
        tokens = line.split()
        if len(tokens) < 2:
            raise DataError("expected 'user item1 item2 ...', found a user with no items", path, number)
        user = tokens[0]
        for item in tokens[1:]:
            rows.add(user, item)
    return rows.frame()


def read_pairs(path: Path) -> pd.DataFrame:
    rows = Rows()
    for number, line in numbered_lines(path):
        tokens = line.split()
        if len(tokens) != 2:
            raise DataError(f"expected 'user item', found {len(tokens)} fields", path, number)
        rows.add(tokens[0], tokens[1])
    return rows.frame()
