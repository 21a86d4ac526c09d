"""Parquet tables (needs pyarrow: ``pip install 'fedtail[parquet]'``), columns picked as for CSV."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from common.data.readers.parsing import Rows, parse_timestamp
from common.data.readers.table import ColumnNames, pick_column
from common.errors import DataError


def read_parquet(path: Path, columns: ColumnNames) -> pd.DataFrame:
    try:
        table = pd.read_parquet(path)
    except ImportError:
        raise DataError("reading Parquet needs pyarrow: pip install 'fedtail[parquet]'", path) from None
    except Exception as error:  # pyarrow raises many types for a corrupt file
        raise DataError(f"cannot read as Parquet: {error}", path) from None
    header = [str(name) for name in table.columns]
    picked = {
        role: pick_column(header, role, getattr(columns, role), path, required=role in ("user", "item"))
        for role in ("user", "item", "timestamp", "site")
    }
    rows = Rows(with_site=picked["site"] is not None)
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
                    timestamp = parse_timestamp(str(stamp), None, None)
                except DataError as error:
                    raise DataError(f"row {row + 1}: {error}", path) from None
        site = str(values["site"][row]) if "site" in values else None
        rows.add(str(user).strip(), str(item).strip(), timestamp, site)
    return rows.frame()
