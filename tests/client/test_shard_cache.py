"""A deployed site's shard is cached across the rounds its warm runtime serves, and read again when a file changes."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from client.shard import deployed_shard
from common.data.catalog import Catalog


def _write(folder: Path, users: int) -> tuple[Path, Path]:
    catalog = folder / "catalog.json"
    Catalog.from_items([f"i{n}" for n in range(6)]).save(catalog)
    rows = [(f"u{user}", f"i{(user + step) % 6}", step) for user in range(users) for step in range(4)]
    data = folder / "site.csv"
    pd.DataFrame(rows, columns=["user", "item", "timestamp"]).to_csv(data, index=False)
    return data, catalog


def test_the_shard_is_reused_while_its_files_stay_the_same_and_reread_when_they_change(tmp_path: Path) -> None:
    data, catalog = _write(tmp_path, users=3)
    first = deployed_shard(str(data), str(catalog), 5)
    assert deployed_shard(str(data), str(catalog), 5) is first, "the same round after round"
    stat = data.stat()
    _write(tmp_path, users=5)  # the site updated its data between rounds
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # even within the clock's resolution
    second = deployed_shard(str(data), str(catalog), 5)
    assert second is not first and len(second.examples) > len(first.examples)
