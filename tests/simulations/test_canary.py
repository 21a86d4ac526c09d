"""The empirical (canary) audit end to end, through Flower's Simulation Engine, on tiny data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from common.federation import RunSettings
from simulations.canary import (
    CANARY_DATA,
    CANARY_SECRET,
    EMPIRICAL_JSON,
    CanaryConfig,
    draw_canaries,
    run_empirical_audit,
)
from simulations.simulate import Resources

TINY = dict(dataset="synthetic:users=240,items=90,seed=2", rounds=2, epsilon=2.0, delta=1e-4, hidden=16, heads=1,
            blocks=1, max_len=12, batch_size=32)


def test_canaries_are_long_tail_items_planted_by_fair_coins() -> None:
    popularity = np.arange(101)  # item i has popularity i: the tail is the low indices
    canaries = draw_canaries(popularity, CanaryConfig(canaries=400, length=10))
    assert all(len(set(s.tolist())) == 10 and s.max() <= 50 and s.min() >= 1 for s in canaries.sequences)
    assert 150 < canaries.members.sum() < 250


def test_a_dp_canary_audit_stays_below_the_accountant_and_writes_its_report(tmp_path: Path) -> None:
    settings = RunSettings(**TINY, out_dir=str(tmp_path / "audit"))
    report = run_empirical_audit(settings, Resources(sites=2), CanaryConfig(canaries=60, length=8))
    out = tmp_path / "audit"
    assert {CANARY_DATA, CANARY_SECRET, EMPIRICAL_JSON, "empirical-audit.md", "run"} <= {p.name for p in out.iterdir()}
    planted = json.loads((out / CANARY_SECRET).read_text())["members"]
    data_lines = (out / CANARY_DATA).read_text().splitlines()
    assert len(data_lines) == 240 + sum(planted)  # exactly the member canaries were added
    assert report["accountant_epsilon"] is not None and report["accountant_epsilon"] <= 2.0
    assert 0 <= report["empirical_epsilon_lower_bound"] <= report["accountant_epsilon"]
    assert report["verdict"].startswith("consistent")
    assert (out / "run" / "audit.md").exists()
