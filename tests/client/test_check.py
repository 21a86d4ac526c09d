"""`fedtail deploy check`: what a site learns before joining, with each problem named."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.check import check_site
from common.data.catalog import Catalog
from common.privacy.ledger import Ledger, Spend
from simulations.cli import main


@pytest.fixture
def site(tmp_path: Path) -> dict[str, Path]:
    data = tmp_path / "north.csv"
    rows = [f"u{u},i{(u * 7 + k) % 30},{k}" for u in range(40) for k in range(5)] + ["u0,unknown-item,9"]
    data.write_text("user,item,timestamp\n" + "\n".join(rows) + "\n")
    Catalog.from_items([f"i{i}" for i in range(30)]).save(tmp_path / "catalog.json")
    return {"data": data, "catalog": tmp_path / "catalog.json", "ledger": tmp_path / "ledger"}


def test_a_ready_site_sees_its_users_catalogue_budget_and_device(site: dict[str, Path]) -> None:
    check = check_site(site["data"], site["catalog"], site["ledger"], 8.0, 1e-3, 10)
    text = check.format()
    assert check.ready, text
    assert "201 interactions, 40 users; 40 with a training pair" in text
    assert "1 of 201 interactions name items outside the catalogue" in text
    fingerprint = Catalog.load(site["catalog"]).fingerprint()
    assert f"30 items, fingerprint {fingerprint[:16]} (the sha256 of its item ids, not of the file" in text
    assert "delta 0.001 < 1/users = 1/40: holds" in text
    assert "8 left" not in text and "8.000 left" in text
    assert "GPU" in text and "flwr" in text


def test_a_spent_budget_a_too_large_delta_and_a_missing_catalogue_are_problems(
    site: dict[str, Path], tmp_path: Path
) -> None:
    ledger = Ledger(site["ledger"] / "site-north.jsonl")
    ledger.append(Spend("old-run", 1, "north", 1.0, 0.6, 1.0, 50, 1e-3, "rdp", {}, 40))
    check = check_site(site["data"], site["catalog"], site["ledger"], 0.5, 0.1, 10)
    assert not check.ready
    problems = "\n".join(check.problems)
    assert "delta=0.1 is not below 1/users = 1/40" in problems
    assert "0.000 left" in problems and "max-epsilon 0.5" in problems
    missing = check_site(site["data"], tmp_path / "nope.json", site["ledger"], 8.0, 1e-3, 10)
    assert any("catalogue file not found" in problem for problem in missing.problems)


def test_the_command_exits_1_when_the_site_is_not_ready(
    site: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["deploy", "check", "--data", str(site["data"]), "--catalog", str(site["catalog"]),
              "--ledger-dir", str(site["ledger"]), "--delta", "1e-3"]
    assert main([*common, "--max-epsilon", "8"]) == 0
    assert "ready to join" in capsys.readouterr().out
    assert main([*common, "--max-epsilon", "0"]) == 1
    assert "NOT ready" in capsys.readouterr().out
