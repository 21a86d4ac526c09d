"""The item catalogue: raw item ids <-> dense model indices (0 is padding).

A model is meaningless without the catalogue it was trained with, so the
catalogue is saved next to every model and checked when the model is loaded.
In a deployment it is public input (the product list), identical at every site.

A catalogue grows over a model's lifetime: new items are appended, old indices
never move (``extend``). Each version records the fingerprint of the one it
extends, so whoever holds version k (a site, a server) can check that version
k+1 keeps every index it learned (``check_extends``). catalog.json carries
``version``, ``fingerprint`` and ``previous_fingerprint`` (null for version 1).
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
    version: int = 1
    previous_fingerprint: str | None = None
    """The fingerprint of the version this one extends; None for a first version."""
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index = {raw: position + 1 for position, raw in enumerate(self.items)}
        if len(index) != len(self.items):
            raise DataError("the catalogue lists an item id more than once")
        if self.version < 1 or (self.version == 1) != (self.previous_fingerprint is None):
            raise DataError(
                f"catalogue version {self.version} with previous fingerprint {self.previous_fingerprint!r}: version 1 "
                "has none, every later version names the one it extends"
            )
        object.__setattr__(self, "_index", index)

    @classmethod
    def from_items(cls, raw_ids: Iterable[str], source: str = "") -> Catalog:
        return cls(tuple(sorted(set(raw_ids), key=_natural_key)), source)

    @classmethod
    def from_item_list(cls, path: str | Path) -> Catalog:
        """A first catalogue from a public product list: one raw item id per line (blank lines and ``#`` comments
        skipped). A repeated id is an error naming its line: a list that repeats items is probably not the list
        meant."""
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise DataError("item list not found", path) from None
        except (OSError, UnicodeDecodeError) as error:
            raise DataError(f"cannot read the item list: {error}", path) from None
        seen: dict[str, int] = {}
        for number, line in enumerate(lines, start=1):
            raw = line.strip()
            if not raw or raw.startswith("#"):
                continue
            if raw in seen:
                raise DataError(f"item {raw!r} is listed already on line {seen[raw]}", path, number)
            seen[raw] = number
        if not seen:
            raise DataError("the item list names no item", path)
        return cls.from_items(seen, source=path.name)

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

    def extend(self, raw_ids: Iterable[str]) -> Catalog:
        """This catalogue with the unknown ``raw_ids`` appended (natural order among themselves), as the next version.

        Old indices never move, so a model trained on this version keeps every learned row; with nothing new the
        catalogue itself is returned (same version: nothing to re-check downstream).
        """
        new = sorted({str(raw) for raw in raw_ids} - self._index.keys(), key=_natural_key)
        if not new:
            return self
        return Catalog(self.items + tuple(new), self.source, self.version + 1, self.fingerprint())

    def check_extends(self, earlier: Catalog, where: str = "the catalogue") -> None:
        """Raise unless this catalogue keeps every index of ``earlier`` (equal, or ``earlier`` plus appended items).

        Why: a model trained on ``earlier`` addresses items by index; a catalogue that reorders, drops or renames
        any of them would silently give learned rows to other items.
        """
        if self.items[: earlier.num_items] == earlier.items:
            return
        if self.num_items < earlier.num_items and earlier.items[: self.num_items] == self.items:
            raise DataError(
                f"{where} (version {self.version}, {self.num_items} items) is shorter than the one trained on "
                f"(version {earlier.version}, {earlier.num_items} items): it drops the last "
                f"{earlier.num_items - self.num_items}"
            )
        first = next(
            (i for i, (a, b) in enumerate(zip(self.items, earlier.items, strict=False)) if a != b), self.num_items
        )
        found = repr(self.items[first]) if first < self.num_items else "nothing"
        raise DataError(
            f"{where} (version {self.version}) does not extend the one trained on (version {earlier.version}, "
            f"fingerprint {earlier.fingerprint()[:12]}): index {first + 1} is {found}, was {earlier.items[first]!r}"
        )

    def save(self, path: str | Path) -> None:
        payload = {
            "format": CATALOG_FORMAT,
            "source": self.source,
            "version": self.version,
            "fingerprint": self.fingerprint(),
            "previous_fingerprint": self.previous_fingerprint,
            "num_items": self.num_items,
            "items": list(self.items),
        }
        write_json(Path(path), payload)

    def publish(self, path: str | Path) -> None:
        """Save as a deployment's public catalogue: never over another catalogue (sites may hold that one already);
        the same items again is a no-op."""
        path = Path(path)
        if path.exists():
            try:
                existing = Catalog.load(path)
            except DataError:
                existing = None
            if existing is None or existing.fingerprint() != self.fingerprint():
                raise DataError("exists and is not this catalogue; it is never overwritten (remove it or name "
                                "another file)", path)
            return
        self.save(path)

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
        version, previous = payload.get("version", 1), payload.get("previous_fingerprint")
        if not isinstance(version, int) or not (previous is None or isinstance(previous, str)):
            raise DataError("catalogue 'version' must be an integer and 'previous_fingerprint' a string or null", path)
        catalog = cls(tuple(items), str(payload.get("source", "")), version, previous)
        recorded = payload.get("fingerprint")
        if recorded is not None and recorded != catalog.fingerprint():
            raise DataError("catalogue 'fingerprint' does not match its items (edited by hand?)", path)
        return catalog
