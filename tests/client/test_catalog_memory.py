"""A site refuses a catalogue that does not extend the one it last trained on; an extension is accepted."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.catalog_memory import check_extends_trained, remember_trained, trained_catalog_path
from common.data.catalog import Catalog
from common.errors import DataError


def test_a_site_accepts_an_extension_and_refuses_a_reordered_catalogue(tmp_path: Path) -> None:
    ledger = tmp_path / "site-0.jsonl"
    first = Catalog.from_items(["1", "2", "3"])
    check_extends_trained(ledger, first)  # nothing trained yet: any catalogue
    remember_trained(ledger, first)
    assert trained_catalog_path(ledger).name == "site-0.catalog.json"
    extended = first.extend(["4"])
    check_extends_trained(ledger, extended)
    remember_trained(ledger, extended)
    assert Catalog.load(trained_catalog_path(ledger)) == extended
    with pytest.raises(DataError, match=r"does not extend the one trained on \(version 2.* index 1 is '2', was '1'"):
        check_extends_trained(ledger, Catalog(("2", "1", "3", "4", "5")))
    with pytest.raises(DataError, match="drops the last 1"):
        check_extends_trained(ledger, first)
