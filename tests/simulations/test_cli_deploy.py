"""`fedtail deploy catalog`, `fedtail deploy bundle-hash` and `fedtail data sites`: the steps a trial federation
takes from nothing, each with its output checked."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from common.data.catalog import Catalog
from common.flower.runtime import bundle_sha256
from common.utils.processes import APP_DIR
from simulations.cli import main
from simulations.cli_deploy import default_bundle_folder


def test_catalog_from_a_product_list_prints_the_fingerprint_and_never_overwrites_another(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    items = tmp_path / "products.txt"
    items.write_text("# our products\n10\n2\n\nshoe\n")
    out = tmp_path / "catalog.json"
    assert main(["deploy", "catalog", "--items", str(items), "--out", str(out)]) == 0
    catalog = Catalog.load(out)
    assert catalog.items == ("2", "10", "shoe")
    assert f"fingerprint {catalog.fingerprint()}" in capsys.readouterr().out
    assert main(["deploy", "catalog", "--items", str(items), "--out", str(out)]) == 0  # the same: fine
    items.write_text("2\n10\n")
    assert main(["deploy", "catalog", "--items", str(items), "--out", str(out)]) == 2
    assert "is never overwritten" in capsys.readouterr().err
    assert Catalog.load(out).items == ("2", "10", "shoe")
    items.write_text("2\n10\n2\n")
    assert main(["deploy", "catalog", "--items", str(items), "--out", str(tmp_path / "other.json")]) == 2
    assert "line 3: item '2' is listed already on line 1" in capsys.readouterr().err


def test_catalog_from_public_data_and_site_files_from_the_same_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = "synthetic:users=60,items=80,seed=3"
    assert main(["data", "sites", data, "--sites", "north,south", "--out", str(tmp_path / "data")]) == 0
    assert main(["deploy", "catalog", "--dataset", data, "--out", str(tmp_path / "catalog.json")]) == 0
    assert Catalog.load(tmp_path / "catalog.json").num_items == 80
    north, south = (tmp_path / "data" / f"{site}.csv" for site in ("north", "south"))
    users = [{line.split(",")[0] for line in path.read_text().splitlines()[1:]} for path in (north, south)]
    assert users[0] and users[1] and not users[0] & users[1]
    assert main(["data", "sites", data, "--sites", "north,north", "--out", str(tmp_path / "x")]) == 2
    assert "name each site once" in capsys.readouterr().err


def test_bundle_hash_without_a_path_hashes_the_app_in_the_current_folder(tmp_path: Path) -> None:
    app = tmp_path / "app"
    shutil.copytree(APP_DIR, app, ignore=shutil.ignore_patterns(".*", "runs", "tests", "docs", "__pycache__"))
    (app / "client" / "extra.py").write_text("CHANGED = True\n")
    assert default_bundle_folder(app) == app
    assert bundle_sha256(default_bundle_folder(app)) != bundle_sha256(APP_DIR)
    assert default_bundle_folder(tmp_path) == APP_DIR  # not an app folder: the installed fedtail
