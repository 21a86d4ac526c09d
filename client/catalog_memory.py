"""A site remembers the catalogue it last trained on, and refuses one that does not extend it.

Over a model's lifetime the catalogue grows (``common.data.catalog.Catalog.extend``): items are appended, old
indices never move. A coordinator that reorders, drops or renames items would make the site's users' learned
rows belong to other items without any error, so each site keeps the last catalogue it trained on next to its
ledger and checks every later one against it, before training. The catalogue is public input, so the check and
its message say nothing about the site's users.
"""

from __future__ import annotations

from pathlib import Path

from common.data.catalog import Catalog


def trained_catalog_path(ledger_path: Path) -> Path:
    """Beside the site's ledger: ``site-<id>.catalog.json``."""
    return ledger_path.with_suffix(".catalog.json")


def check_extends_trained(ledger_path: Path, catalog: Catalog) -> None:
    """Raise (DataError) unless ``catalog`` keeps every index of the catalogue this site last trained on."""
    path = trained_catalog_path(ledger_path)
    if path.exists():
        catalog.check_extends(Catalog.load(path), f"the run's catalogue (checked against {path})")


def remember_trained(ledger_path: Path, catalog: Catalog) -> None:
    """Record ``catalog`` as the one this site trained on (written atomically, only when it changed)."""
    path = trained_catalog_path(ledger_path)
    if not path.exists() or Catalog.load(path).fingerprint() != catalog.fingerprint():
        path.parent.mkdir(parents=True, exist_ok=True)  # a non-private site may have no ledger yet
        catalog.save(path)
