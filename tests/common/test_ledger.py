"""The site ledger: append-only, hash-chained, the sole source of a site's epsilon."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.errors import DataError
from common.ledger import Ledger, Spend
from common.privacy import calibrate_noise, epsilon_from_history


def _spend(round_number: int, sigma: float = 1.1) -> Spend:
    return Spend("run", round_number, "3", 0.1, sigma, 1.0, 20, 1e-5, "rdp", {"opacus": "1.6.0"})


def _ledger(tmp_path: Path, rounds: int = 3) -> Ledger:
    ledger = Ledger(tmp_path / "site-3.jsonl")
    for number in range(1, rounds + 1):
        ledger.append(_spend(number))
    return ledger


def test_epsilon_so_far_composes_every_line(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    entries = ledger.entries()
    assert [e["round"] for e in entries] == [1, 2, 3]
    for count, entry in enumerate(entries, start=1):
        assert entry["epsilon_so_far"] == pytest.approx(epsilon_from_history([(1.1, 0.1, 20)] * count, 1e-5))
    assert ledger.epsilon(1e-5) == pytest.approx(entries[-1]["epsilon_so_far"])
    assert {"privacy_unit", "neighbouring", "sampling", "accountant", "library_versions", "run_id"} <= set(entries[0])


@pytest.mark.parametrize("tamper", ["delete", "edit", "reorder"])
def test_a_deleted_edited_or_reordered_line_breaks_the_chain(tmp_path: Path, tamper: str) -> None:
    ledger = _ledger(tmp_path)
    lines = ledger.path.read_text().splitlines()
    if tamper == "delete":
        del lines[1]
    elif tamper == "edit":
        entry = json.loads(lines[1])
        entry["noise_multiplier"] = 5.0  # pretend more noise was used: lowers epsilon
        lines[1] = json.dumps(entry, sort_keys=True)
    else:
        lines[1], lines[2] = lines[2], lines[1]
    ledger.path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="hash chain broken") as error:
        ledger.entries()
    assert "line 2" in str(error.value) or "line 3" in str(error.value)


def test_a_truncated_last_line_is_reported(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path, rounds=2)
    text = ledger.path.read_text()
    ledger.path.write_text(text[:-20])
    with pytest.raises(DataError, match="line 2"):
        ledger.entries()


def test_calibrated_noise_meets_the_cumulative_target() -> None:
    sigma = calibrate_noise(4.0, 1e-5, 0.05, 500)
    spent = epsilon_from_history([(sigma, 0.05, 500)], 1e-5)
    assert spent <= 4.0 and spent == pytest.approx(4.0, abs=0.03)
    assert calibrate_noise(1.0, 1e-5, 0.05, 500) > sigma, "a smaller budget needs more noise"
