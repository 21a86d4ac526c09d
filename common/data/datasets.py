"""Name a dataset on the command line and get clean per-user sequences.

A dataset spec is one of:

- ``synthetic`` or ``synthetic:users=5000,items=3000,seed=7`` (built-in default);
- a path: file or MovieLens folder, format detected from name and content;
- ``FORMAT:PATH`` to name the format (see ``common.data.readers.FORMATS``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common.data.catalog import Catalog
from common.data.interactions import CleanReport, DataStats, clean_interactions, data_stats, user_sequences
from common.data.readers import FORMATS, ColumnNames, read_interactions
from common.data.synthetic import SyntheticConfig, generate
from common.errors import DataError

DEFAULT_DATASET = "synthetic"


@dataclass(frozen=True)
class Dataset:
    """A cleaned interaction log. ``frame`` is sorted by user, then time."""

    spec: str
    frame: pd.DataFrame
    report: CleanReport

    @property
    def is_synthetic(self) -> bool:
        return self.spec.split(":", 1)[0] == "synthetic"

    def stats(self) -> DataStats:
        return data_stats(self.frame, self.report)

    def catalog(self) -> Catalog:
        """A catalogue built from the data itself (fine for simulations; deployments use a public one)."""
        return Catalog.from_items(self.frame["item"].unique().tolist(), source=self.spec)

    def sequences(self, catalog: Catalog) -> tuple[list[str], list[np.ndarray]]:
        return user_sequences(self.frame, catalog)

    def restricted_to(self, catalog: Catalog, allow_empty: bool = False) -> tuple[Dataset, int]:
        """The interactions whose items the catalogue knows, and how many were dropped; ``allow_empty``: none may be
        left (a site's own file)."""
        known = self.frame["item"].map(lambda raw: catalog.index_of(raw) is not None).astype(bool)
        if not known.any() and not allow_empty:
            raise DataError(f"none of the items in {self.spec} is in the catalogue ({catalog.source or 'given'})")
        return Dataset(self.spec, self.frame[known], self.report), int((~known).sum())


def load_dataset(
    spec: str = DEFAULT_DATASET, columns: ColumnNames = ColumnNames(), kcore: int = 0, allow_few_users: bool = False
) -> Dataset:
    """``allow_few_users``: 0 or 1 user will do (a site's own file: ``clean_interactions``)."""
    if kcore < 0:
        raise DataError(f"k-core must be 0 (off) or positive, got {kcore}")
    frame = _read_spec(spec, columns, allow_few_users)
    clean, report = clean_interactions(frame, spec, kcore, allow_few_users)
    return Dataset(spec, clean, report)


def _read_spec(spec: str, columns: ColumnNames, allow_empty: bool) -> pd.DataFrame:
    kind, sep, rest = spec.partition(":")
    if kind == "synthetic":
        return generate(SyntheticConfig.parse(rest))
    if sep and kind in FORMATS:
        return read_interactions(Path(rest), kind, columns, allow_empty)
    if sep and not Path(spec).exists() and len(kind) > 1:
        raise DataError(f"unknown format '{kind}' in dataset '{spec}'; known formats: synthetic, {', '.join(FORMATS)}")
    return read_interactions(Path(spec), None, columns, allow_empty)
