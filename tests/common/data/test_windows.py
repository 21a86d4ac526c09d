"""Time windows: consecutive, covering the log, users at one site throughout, catalogue versions that extend."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from common.data.datasets import load_dataset
from common.data.synthetic import SyntheticConfig, generate
from common.data.windows import split_windows, write_window
from common.errors import DataError


def test_windows_cover_the_log_in_order_with_stable_sites_and_extending_catalogues(tmp_path: Path) -> None:
    frame = generate(SyntheticConfig(users=400, items=120, topics=10, seed=1, drift=1.0, new_items=0.3))
    windows = split_windows(frame, 4, sites=3, seed=0, source="test")
    assert sum(len(w.frame) for w in windows) == len(frame)
    pairs = list(zip(windows, windows[1:], strict=False))
    assert all(w.frame["timestamp"].max() <= v.frame["timestamp"].min() for w, v in pairs)
    sites = pd.concat([w.frame for w in windows]).groupby("user")["site"].nunique()
    assert (sites == 1).all(), "a user is at one site in every window"
    for earlier, later in pairs:
        later.catalog.check_extends(earlier.catalog)
        assert later.catalog.version == earlier.catalog.version + 1, "items enter in every window"
        assert later.catalog.previous_fingerprint == earlier.catalog.fingerprint()
    for window in windows:
        assert set(window.frame["item"]) <= set(window.catalog.items)
    path = write_window(windows[1].frame, tmp_path / "window-2.csv")
    reread = load_dataset(str(path))
    assert len(reread.frame) == len(windows[1].frame) and set(reread.frame["site"]) == {"0", "1", "2"}


def test_a_log_with_only_order_is_not_cut_into_windows() -> None:
    frame = pd.DataFrame({"user": ["1", "1", "2"], "item": ["a", "b", "a"], "timestamp": [float("nan")] * 3,
                          "order": [0, 1, 2]})
    with pytest.raises(DataError, match="only each user's order"):
        split_windows(frame, 2, sites=1, seed=0, source="beauty")
