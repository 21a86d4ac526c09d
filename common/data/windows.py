"""Cutting a timestamped interaction log into consecutive time windows, for lifelong runs.

Windows hold equal numbers of interactions (cut at the timestamps' quantiles). Each window is its own log: a
user's history inside a window starts at the window's start, and the usual leave-one-out split inside it gives
the window's held-out events (the last two of each user with three or more events there).

Users keep one site for the whole log (drawn once, from the seed, over every user of the log, and written as
the ``site`` column): the same users at the same site in every window, so a site's ledger composes the spend on
its users across windows.

Data without timestamps (Amazon Beauty's sequences: only the order of each user's items) has no shared clock:
one user's 5th item and another's 5th are not at the same time, so no cut is a point in time. Such data is
refused here rather than cut by per-user position, which would put every user in every window and call it time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common.data.catalog import Catalog
from common.errors import ConfigError, DataError

WINDOW_COLUMNS = ["user", "item", "timestamp", "site"]


@dataclass(frozen=True)
class Window:
    """One window's log (with the users' sites) and the catalogue version that covers every window so far."""

    number: int
    start: float
    end: float
    frame: pd.DataFrame
    catalog: Catalog


def cut_times(frame: pd.DataFrame, windows: int, source: str) -> list[float]:
    """The ``windows - 1`` inner cut points: timestamps' quantiles, so windows hold equal numbers of events."""
    if windows < 1:
        raise ConfigError(f"--windows {windows}: must be at least 1")
    if frame["timestamp"].isna().any():
        raise DataError(
            "time windows need a timestamp on every interaction; this data has only each user's order (no shared "
            "clock), so it cannot be cut into windows",
            source,
        )
    cuts = [float(c) for c in np.quantile(frame["timestamp"].to_numpy(), np.arange(1, windows) / windows)]
    if len(set(cuts)) != len(cuts):
        raise DataError(f"cannot cut the log into {windows} windows: too many interactions share a timestamp", source)
    return cuts


def user_sites(users: Sequence[str], sites: int, seed: int) -> dict[str, str]:
    """Each user's site for the whole log: equal shares at random (the seed's), names zero-padded so that the
    sorted names are the site indices."""
    names = sorted(set(users))
    if not 1 <= sites <= len(names):
        raise ConfigError(f"cannot split {len(names)} users into {sites} sites")
    order = np.random.default_rng(seed).permutation(len(names))
    width = len(str(sites - 1))
    return {names[i]: str(position % sites).zfill(width) for position, i in enumerate(order)}


def split_windows(frame: pd.DataFrame, windows: int, sites: int, seed: int, source: str) -> list[Window]:
    """The log cut into ``windows`` consecutive windows, each with every site present and its catalogue version.

    Catalogue version k is version k-1 extended by the items first seen in window k (old indices never move).
    """
    cuts = cut_times(frame, windows, source)
    site_of = user_sites(frame["user"].astype(str).tolist(), sites, seed)
    bounds = [-np.inf, *cuts, np.inf]
    out: list[Window] = []
    catalog: Catalog | None = None
    for number in range(1, windows + 1):
        start, end = bounds[number - 1], bounds[number]
        inside = frame[(frame["timestamp"] > start) & (frame["timestamp"] <= end)]
        part = inside.assign(site=inside["user"].astype(str).map(site_of))[WINDOW_COLUMNS].reset_index(drop=True)
        missing = sorted(set(site_of.values()) - set(part["site"]))
        if missing:
            raise DataError(f"window {number} has no user at site(s) {', '.join(missing)}; use fewer sites", source)
        items = part["item"].astype(str).unique().tolist()
        catalog = Catalog.from_items(items, source) if catalog is None else catalog.extend(items)
        out.append(Window(number, float(start), float(end), part, catalog))
    return out


def write_window(frame: pd.DataFrame, path: Path) -> Path:
    """A window (or several, concatenated) as CSV with a header the table reader detects."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False, columns=WINDOW_COLUMNS)
    return path
