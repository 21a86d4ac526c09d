"""The audit of central-noise ledger lines: epsilon recomputed by two code bases' accountants, the trust stated."""

from __future__ import annotations

import json
from pathlib import Path

import dp_accounting
import pytest

from common.privacy.accounting import ACCOUNTANT, calibrate_noise
from common.privacy.ledger import Ledger, Spend
from common.privacy.mechanisms import CENTRAL_TRUST
from simulations.audit import audit
from simulations.audit.report import format_markdown

RATE, ROUNDS, DELTA, TARGET = 0.25, 200, 1e-5, 4.0


def _central_ledger(path: Path, rounds: int, placement: str = "central") -> float:
    """``rounds`` central lines as a site writes them: one step each, the multiplier of the total noise."""
    sigma = calibrate_noise(TARGET, DELTA, RATE, ROUNDS)
    ledger = Ledger(path)
    for number in range(1, rounds + 1):
        ledger.append(Spend("run-c", number, "2", RATE, sigma, 0.5, 1, DELTA, ACCOUNTANT, {"opacus": "1.6.0"},
                            users=300, noise_placement=placement, trust=CENTRAL_TRUST))
    return sigma


def _pld(sigma: float, rounds: int) -> float:
    """dp-accounting's PLD built here, independently of the audit's code."""
    accountant = dp_accounting.pld.PLDAccountant(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    event = dp_accounting.PoissonSampledDpEvent(RATE, dp_accounting.GaussianDpEvent(sigma))
    return float(accountant.compose(event, rounds).get_epsilon(DELTA))


def test_central_lines_are_recomputed_by_two_accountants_and_the_guarantee_names_its_trust(tmp_path: Path) -> None:
    sigma = _central_ledger(tmp_path / "site-2.jsonl", ROUNDS)
    report = audit([tmp_path / "site-2.jsonl"])
    assert report.passed, report.findings
    site = report.sites["2"]
    assert site.steps == ROUNDS and site.recorded_epsilon == pytest.approx(TARGET, abs=0.01)
    # Calibrated with PLD, the run audits at or below its target under PLD, recomputed by the audit and built here.
    assert site.recomputed["dp-accounting-pld"] == pytest.approx(site.recorded_epsilon)
    assert report.epsilon is not None and report.epsilon <= TARGET
    assert site.recomputed["dp-accounting-pld"] == pytest.approx(_pld(sigma, ROUNDS), rel=0.02)
    assert _pld(sigma, ROUNDS) <= TARGET
    assert site.recomputed["dp-accounting-pld"] < site.recomputed["opacus-rdp"] < 1.3 * site.recomputed[
        "dp-accounting-pld"]
    assert site.trust == [f"central: relies on {CENTRAL_TRUST}"] and site.trusts_coordinator
    statement = report.as_dict()["global"]["statement"]
    assert "ASSUMES the coordinator added the noise for site(s) 2" in statement and "NOT private" in statement
    markdown = format_markdown(report)
    assert "central: relies on the coordinator" in markdown and "**noise placement**" in markdown


def test_site_lines_state_no_trust_in_the_coordinator(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "site-1.jsonl")
    ledger.append(Spend("run-s", 1, "1", RATE, 1.2, 1.0, 4, DELTA, "rdp", {}, users=300))
    report = audit([tmp_path / "site-1.jsonl"])
    assert report.passed and not report.sites["1"].trusts_coordinator
    assert "ASSUMES" not in report.as_dict()["global"]["statement"]


def test_an_unknown_noise_placement_fails_the_audit(tmp_path: Path) -> None:
    path = tmp_path / "site-2.jsonl"
    _central_ledger(path, 1)
    line = json.loads(path.read_text())
    line["noise_placement"] = "nowhere"
    path.write_text(json.dumps(line) + "\n")
    errors = [f.message for f in audit([path]).findings if f.severity == "error"]
    assert any("noise placement 'nowhere' is not one fedtail accounts" in message for message in errors)
