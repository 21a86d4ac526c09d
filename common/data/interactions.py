"""From a raw interaction frame to clean, chronological per-user item sequences."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from common.data.catalog import Catalog
from common.errors import DataError


@dataclass(frozen=True)
class CleanReport:
    """What cleaning changed, so that reports can say it instead of hiding it."""

    duplicates_dropped: int
    kcore_removed_interactions: int


def clean_interactions(
    frame: pd.DataFrame, source: str, kcore: int = 0, allow_few_users: bool = False
) -> tuple[pd.DataFrame, CleanReport]:
    """Drop exact duplicate (user, item, time) rows, apply k-core, order chronologically.

    Rows without a timestamp are never duplicates of each other: without a clock
    two identical lines may well be two real interactions. A dataset to train a
    recommender on needs 2 users; with ``allow_few_users`` (a site's own file) 0
    or 1 will do: the site trains like any other, its release DP whatever its users.
    """
    if frame.empty and not allow_few_users:
        raise DataError("the data holds no interactions", source)
    has_time = frame["timestamp"].notna()
    duplicated = frame[has_time].duplicated(subset=["user", "item", "timestamp"], keep="first")
    duplicate_rows = duplicated[duplicated].index
    frame = frame.drop(index=duplicate_rows)
    before_kcore = len(frame)
    if kcore > 0:
        frame = _kcore(frame, kcore)
    if frame.empty and not allow_few_users:
        raise DataError(f"no interactions left after {kcore}-core filtering", source)
    if frame["user"].nunique() == 1 and not allow_few_users:
        raise DataError(
            f"holds only one user ({frame['user'].iloc[0]}); a recommender needs interactions from at least 2 users",
            source,
        )
    # Missing timestamps sort by file order: "order" is the clock for those formats.
    frame = frame.sort_values(["user", "timestamp", "order"], na_position="first", kind="stable")
    frame = frame.reset_index(drop=True)
    return frame, CleanReport(len(duplicate_rows), before_kcore - len(frame))


def _kcore(frame: pd.DataFrame, k: int) -> pd.DataFrame:
    """Repeatedly drop users and items with fewer than k interactions until none is left."""
    while True:
        user_counts = frame["user"].map(frame["user"].value_counts())
        item_counts = frame["item"].map(frame["item"].value_counts())
        keep = (user_counts >= k) & (item_counts >= k)
        if keep.all():
            return frame
        frame = frame[keep]


def user_sequences(frame: pd.DataFrame, catalog: Catalog) -> tuple[list[str], list[np.ndarray]]:
    """Chronological item-index sequences, one per user; every item must be in the catalogue."""
    if frame.empty:
        return [], []
    indices = frame["item"].map(lambda raw: catalog.index_of(raw) or 0).to_numpy(dtype=np.int64)
    if (indices == 0).any():
        unknown = frame["item"][indices == 0].unique()[:5].tolist()
        raise DataError(f"{int((indices == 0).sum())} interactions name items outside the catalogue, e.g. {unknown}")
    users = frame["user"].to_numpy()
    # frame is sorted by user, so each user's rows are one contiguous run.
    boundaries = np.flatnonzero(users[1:] != users[:-1]) + 1
    starts = np.concatenate([[0], boundaries])
    sequences = np.split(indices, boundaries)
    return [str(users[start]) for start in starts], sequences


@dataclass(frozen=True)
class DataStats:
    users: int
    items: int
    interactions: int
    history_length_quantiles: dict[str, float]
    top20_item_share: float
    duplicates_dropped: int
    kcore_removed_interactions: int

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def data_stats(frame: pd.DataFrame, report: CleanReport) -> DataStats:
    lengths = frame.groupby("user", sort=False).size().to_numpy()
    item_counts = np.sort(frame["item"].value_counts().to_numpy())[::-1]
    top = max(1, int(np.ceil(0.2 * len(item_counts))))
    quantiles = {f"p{q}": float(np.percentile(lengths, q)) for q in (0, 10, 25, 50, 75, 90, 99, 100)}
    return DataStats(
        users=int(frame["user"].nunique()),
        items=int(frame["item"].nunique()),
        interactions=len(frame),
        history_length_quantiles=quantiles,
        top20_item_share=float(item_counts[:top].sum() / item_counts.sum()),
        duplicates_dropped=report.duplicates_dropped,
        kcore_removed_interactions=report.kcore_removed_interactions,
    )
