"""The node config `fedtail simulate` writes for its simulated sites is one their policy accepts, for every run kind.

A value the policy refuses makes every site fail in round 1, which only a whole simulation would otherwise show.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from client.policy import SitePolicy
from common.federation import RunSettings
from simulations.simulate import Resources, write_site_node_configs


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"dp": False},
        {"noise": "central"},
        {"noise": "distributed", "min_sites": 5, "secure_aggregation_tolerated": 2},
        {"epsilon": 1.0, "delta": 1e-6},
        {"learning_rate": 0.5, "max_len": 2000, "sample_rate": 1e-5},  # outside a deployed site's default ranges
    ],
)
def test_every_run_kind_writes_node_configs_its_sites_accept(tmp_path: Path, options: dict) -> None:
    settings = RunSettings(out_dir=str(tmp_path / "run"), **options)
    written = json.loads(write_site_node_configs(tmp_path, settings, Resources(sites=5)).read_text())
    assert sorted(written) == [str(site) for site in range(5)]
    for node_config in written.values():
        policy = SitePolicy.from_node_config(node_config, deployed=False)
        assert policy.decline_reason(settings) == ""
        assert policy.max_epsilon == settings.epsilon and policy.delta == settings.delta
    assert policy.trust_coordinator_noise == (settings.noise == "central")
    assert policy.trust_secure_aggregation == (settings.noise == "distributed")
    assert policy.fallback_cap == (math.inf if settings.noise == "distributed" else settings.epsilon)
