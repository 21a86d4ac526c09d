"""The disk cache of noise calibration: a cold process gets the same noise, and a wrong cached value is never used."""

from __future__ import annotations

import json
from pathlib import Path

import dp_accounting
import pytest
from dp_accounting.pld import pld_privacy_accountant

from common.privacy.accounting import (
    ACCOUNTANT,
    CACHE_DIR_ENV,
    EPSILON_TOLERANCE,
    PLD_DISCRETIZATION,
    calibrate_noise,
    epsilon_from_history,
)

PLAN = (4.0, 1e-3, 0.1, 30)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path))
    calibrate_noise.cache_clear()  # a cold process
    return tmp_path


def _entry(cache: Path) -> Path:
    [path] = cache.glob("noise-*.json")
    return path


def test_a_cold_process_reads_the_calibration_from_disk(cache: Path) -> None:
    computed = calibrate_noise(*PLAN)
    assert epsilon_from_history([(computed, PLAN[2], PLAN[3])], PLAN[1]) <= PLAN[0]
    entry = json.loads(_entry(cache).read_text())
    assert entry["noise_multiplier"] == computed
    calibrate_noise.cache_clear()
    marked = computed * (1 + 1e-6)  # still costs the target epsilon: only a read of the file can return it
    entry["noise_multiplier"] = marked
    _entry(cache).write_text(json.dumps(entry))
    assert calibrate_noise(*PLAN) == marked


@pytest.mark.parametrize("tampered", [0.5, 3.0, float("nan"), "x"])
def test_a_cached_value_that_does_not_cost_the_target_epsilon_is_recomputed(cache: Path, tampered: object) -> None:
    """Less noise would overspend, more would waste utility: either way the cache is not believed."""
    computed = calibrate_noise(*PLAN)
    entry = json.loads(_entry(cache).read_text())
    entry["noise_multiplier"] = tampered
    _entry(cache).write_text(json.dumps(entry))
    calibrate_noise.cache_clear()
    assert calibrate_noise(*PLAN) == computed
    assert json.loads(_entry(cache).read_text())["noise_multiplier"] == computed, "and the entry is repaired"


def test_another_plan_is_another_entry(cache: Path) -> None:
    first = calibrate_noise(*PLAN)
    second = calibrate_noise(PLAN[0], PLAN[1], PLAN[2], PLAN[3] * 2)
    assert second > first and len(list(cache.glob("noise-*.json"))) == 2


def test_an_unwritable_cache_only_costs_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv(CACHE_DIR_ENV, str(blocked / "cache"))
    calibrate_noise.cache_clear()
    assert calibrate_noise(*PLAN) > 0


def test_the_noise_is_calibrated_with_pld_at_or_below_the_target(cache: Path) -> None:
    """Spent with PLD, the plan costs at most its target, also on a 10x finer grid than the one it was found on;
    RDP, looser, needs more noise for the same target."""
    target, delta, rate, steps = PLAN
    noise = calibrate_noise(*PLAN)
    assert ACCOUNTANT == "pld"
    assert target - 2 * EPSILON_TOLERANCE <= epsilon_from_history([(noise, rate, steps)], delta, "pld") <= target
    finer = pld_privacy_accountant.PLDAccountant(
        dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE, value_discretization_interval=PLD_DISCRETIZATION / 10
    )
    finer.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise)), steps
        )
    )
    assert finer.get_epsilon(delta) <= target
    assert noise < 0.97 * calibrate_noise(*PLAN, "rdp")
