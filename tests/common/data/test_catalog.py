"""Catalogue versions: appending keeps old indices, a catalogue that does not extend is refused, files round-trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.data.catalog import Catalog
from common.errors import DataError


def test_extend_appends_new_items_and_keeps_old_indices() -> None:
    first = Catalog.from_items(["3", "1", "2"])
    second = first.extend(["10", "2", "b", "4"])
    assert second.items[: first.num_items] == first.items
    for raw in first.items:
        assert second.index_of(raw) == first.index_of(raw)
    assert second.items[3:] == ("4", "10", "b")
    assert (second.version, second.previous_fingerprint) == (2, first.fingerprint())
    second.check_extends(first)
    second.check_extends(second)
    assert first.extend(["1", "2"]) is first


def test_a_catalogue_that_reorders_or_drops_items_is_refused() -> None:
    trained = Catalog.from_items(["1", "2", "3"])
    reordered = Catalog(("1", "3", "2", "4"), version=2, previous_fingerprint=trained.fingerprint())
    with pytest.raises(DataError, match=r"does not extend .* index 2 is '3', was '2'"):
        reordered.check_extends(trained)
    with pytest.raises(DataError, match="drops the last 1"):
        Catalog(("1", "2")).check_extends(trained)


def test_version_and_fingerprints_round_trip_through_the_file(tmp_path: Path) -> None:
    first = Catalog.from_items(["1", "2"])
    second = first.extend(["5"])
    second.save(tmp_path / "catalog.json")
    payload = json.loads((tmp_path / "catalog.json").read_text())
    assert payload["version"] == 2
    assert payload["fingerprint"] == second.fingerprint()
    assert payload["previous_fingerprint"] == first.fingerprint()
    assert Catalog.load(tmp_path / "catalog.json") == second
    first.save(tmp_path / "first.json")
    assert json.loads((tmp_path / "first.json").read_text())["previous_fingerprint"] is None


def test_an_old_catalogue_file_without_version_loads_as_version_one(tmp_path: Path) -> None:
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps({"format": "fedtail-catalog/1", "items": ["1", "2"]}))
    assert Catalog.load(path).version == 1


def test_a_hand_edited_catalogue_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "catalog.json"
    Catalog.from_items(["1", "2"]).save(path)
    payload = json.loads(path.read_text())
    payload["items"] = ["2", "1"]
    path.write_text(json.dumps(payload))
    with pytest.raises(DataError, match="does not match its items"):
        Catalog.load(path)
