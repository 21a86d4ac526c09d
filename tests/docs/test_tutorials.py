"""The tutorials' commands, run as written (slow: each trains a federation), and checked for typos (fast)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from simulations.cli import build_parser
from tests.apps import app_copy
from tests.docs.tutorial import follow, steps

TUTORIALS = Path(__file__).resolve().parents[2] / "docs" / "tutorials"
PAGES = ("simulate.md", "partner-site.md", "audit.md")


def _command_lines(code: str) -> list[str]:
    return [line for line in code.replace("\\\n", " ").splitlines() if line.strip()]


@pytest.mark.parametrize("page", PAGES)
def test_every_fedtail_command_of_a_tutorial_parses(page: str) -> None:
    parser = build_parser()
    commands = [line.split("#")[0] for step in steps(TUTORIALS / page) for line in _command_lines(step.code)
                if line.lstrip().startswith("fedtail ")]
    assert commands, f"{page} runs no fedtail command"
    for command in commands:
        parser.parse_args(shlex.split(command)[1:])  # argparse exits (a test failure) on a misspelt option


@pytest.mark.slow
def test_the_simulation_tutorial_compares_three_noise_placements(tmp_path: Path) -> None:
    printed = follow(TUTORIALS / "simulate.md", tmp_path)
    for placement in ("site", "central", "distributed"):
        summary = json.loads((tmp_path / "runs" / "tutorial" / placement / "summary.json").read_text())
        assert summary["privacy"]["epsilon"] <= 4.0 + 1e-6, placement
        assert f"{placement:12} NDCG@10" in printed


@pytest.mark.slow
def test_the_audit_tutorial_passes_a_run_and_catches_a_cut_ledger(tmp_path: Path) -> None:
    printed = follow(TUTORIALS / "audit.md", tmp_path)
    assert "the audit caught the cut" in printed
    assert (tmp_path / "runs" / "audit-tutorial" / "audit.json").exists()


@pytest.mark.slow
def test_the_partner_site_tutorial_reaches_an_audited_run(tmp_path: Path) -> None:
    app = app_copy(tmp_path)  # `flwr run .` and the site's runtime from the same release, as a reader's checkout
    printed = follow(TUTORIALS / "partner-site.md", app, ports=(9092, 9093, 9094, 9095), timeout_s=900)
    assert "\n404\n" in printed  # the proxy refused the Control API
    assert '"finished:completed"' in printed
    summary = json.loads((app / "runs" / "trial" / "run" / "summary.json").read_text())
    assert sorted(summary["privacy"]["per_site"]) == ["north", "south"]
    assert 0 < summary["privacy"]["per_site"]["north"] <= 2.0 + 1e-6
    assert (app / "runs" / "trial" / "north" / "ledger" / "audit.json").exists()
