"""The item catalogue: raw item ids <-> dense model indices (0 is padding).

A model is meaningless without the catalogue it was trained with, so the
catalogue is saved next to every model and checked when the model is loaded.
In a deployment it is public input (the product list), identical at every site.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.errors import DataError
from common.utils.files import write_json

PADDING_INDEX = 0
CATALOG_FORMAT = "fedtail-catalog/1"


def _natural_key(raw_id: str) -> tuple[int, int | str]:
    """Numeric ids in numeric order, then everything else in text order: stable and readable."""
    return (0, int(raw_id)) if raw_id.isascii() and raw_id.isdigit() else (1, raw_id)


@dataclass(frozen=True)
class Catalog:
    """Items in index order: ``items[i - 1]`` is the raw id of model index ``i``."""

    items: tuple[str, ...]
    source: str = ""
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index = {raw: position + 1 for position, raw in enumerate(self.items)}
        if len(index) != len(self.items):
            raise DataError("the catalogue lists an item id more than once")
        object.__setattr__(self, "_index", index)

    @classmethod
    def from_items(cls, raw_ids: Iterable[str], source: str = "") -> Catalog:
        return cls(tuple(sorted(set(raw_ids), key=_natural_key)), source)

    @property
    def num_items(self) -> int:
        """Real items, padding excluded; the model's output width is ``num_items + 1``."""
        return len(self.items)

    def index_of(self, raw_id: str) -> int | None:
        return self._index.get(str(raw_id))

    def indices(self, raw_ids: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """Known items' indices (order kept) and the raw ids that are not in the catalogue."""
        known: list[int] = []
        unknown: list[str] = []
        for raw in raw_ids:
            position = self._index.get(str(raw))
            if position is None:
                unknown.append(str(raw))
            else:
                known.append(position)
        return np.asarray(known, dtype=np.int64), unknown

    def raw_id(self, index: int) -> str:
        if not 1 <= index <= len(self.items):
            raise IndexError(f"item index {index} is outside the catalogue (1..{len(self.items)})")
        return self.items[index - 1]

    def fingerprint(self) -> str:
        """sha256 of the item ids in index order: equal fingerprints, equal model indices."""
        return hashlib.sha256("\n".join(self.items).encode("utf-8")).hexdigest()

    def save(self, path: str | Path) -> None:
        payload = {
            "format": CATALOG_FORMAT, "source": self.source, "num_items": self.num_items, "items": list(self.items)
        }
        write_json(Path(path), payload)

    @classmethod
    def load(cls, path: str | Path) -> Catalog:
        path = Path(path)
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError("catalogue file not found", path) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise DataError(f"catalogue is not valid JSON: {error}", path) from None
        if not isinstance(payload, dict) or payload.get("format") != CATALOG_FORMAT:
            raise DataError(f"not a fedtail catalogue (expected format {CATALOG_FORMAT!r})", path)
        items = payload.get("items")
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise DataError("catalogue 'items' must be a list of strings", path)
        return cls(tuple(items), str(payload.get("source", "")))
