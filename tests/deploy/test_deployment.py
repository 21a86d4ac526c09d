"""Flower's Deployment Engine on loopback, every part a real process: TLS, SuperNode authentication, faults.

Slow (a ClientApp is a fresh process per message, importing torch each time):
run with ``pytest -m slow tests/deploy``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common.audit import audit
from common.catalog import Catalog
from common.credentials import write_certificates
from common.ledger import Ledger
from common.synthetic import SyntheticConfig, generate
from simulations.deployment import LocalDeployment

pytestmark = pytest.mark.slow

SITES = ("north", "south", "east")
RUN = dict(
    dataset="", rounds=3, epsilon=4.0, delta=1e-3, hidden=16, heads=1, blocks=1, max_len=10, batch_size=16,
    min_sites=3,
)


@pytest.fixture
def site_data(tmp_path: Path) -> dict[str, Path]:
    """Three sites' own interaction files and the coordinator's public catalogue (``catalog``)."""
    frame = generate(SyntheticConfig(users=330, items=60, seed=5))
    catalog = Catalog.from_items(frame["item"].unique().tolist())
    catalog.save(tmp_path / "catalog.json")
    users = frame["user"].unique()
    owner = dict(zip(users, np.arange(len(users)) % len(SITES)))
    paths = {"catalog": tmp_path / "catalog.json"}
    for index, site in enumerate(SITES):
        mine = frame[frame["user"].map(owner) == index]
        paths[site] = tmp_path / f"{site}.csv"
        mine[["user", "item", "timestamp"]].to_csv(paths[site], index=False)
    return paths


def _node_config(site: str, data: dict[str, Path], root: Path) -> dict[str, Any]:
    return {
        "data-path": str(data[site]), "catalog-path": str(data["catalog"]),
        "ledger-dir": str(root / f"{site}-ledger"), "max-epsilon": 8.0, "site-id": site,
    }


def _run_config(data: dict[str, Path], out_dir: Path, **overrides: Any) -> dict[str, Any]:
    return {**{k.replace("_", "-"): v for k, v in RUN.items()}, "catalog-path": str(data["catalog"]),
            "out-dir": str(out_dir), **overrides}


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[LocalDeployment]:
    with LocalDeployment(tmp_path / "federation") as federation:
        federation.start_superlink()
        yield federation


def _join(federation: LocalDeployment, data: dict[str, Path], sites: tuple[str, ...] = SITES) -> None:
    for site in sites:
        private, public = federation.site_keys(site)
        registered = federation.register(public)
        assert registered.returncode == 0, registered.stdout + registered.stderr
        federation.start_supernode(site, _node_config(site, data, federation.root), private)
    _wait_for(lambda: federation.connected_nodes() >= len(sites), f"{len(sites)} SuperNodes online", 120)


def _wait_for(condition: Any, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def _rounds(out_dir: Path) -> list[dict[str, Any]]:
    path = out_dir / "rounds.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_tls_authenticated_federation_of_three_sites_trains_with_dp(
    deployment: LocalDeployment, site_data: dict[str, Path]
) -> None:
    _join(deployment, site_data)
    out_dir = deployment.root / "run"
    status = deployment.wait(deployment.submit(_run_config(site_data, out_dir)), timeout_s=900)
    assert status["status"] == "finished:completed", status
    assert (out_dir / "global_model.pt").exists()
    rounds = _rounds(out_dir)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(sorted(r["sites_trained"]) == sorted(SITES) for r in rounds)
    summary = json.loads((out_dir / "summary.json").read_text())
    for site in SITES:
        ledger = Ledger(deployment.root / f"{site}-ledger" / f"site-{site}.jsonl")
        assert [entry["round"] for entry in ledger.entries()] == [1, 2, 3]
        assert summary["privacy"]["per_site"][site] == pytest.approx(ledger.epsilon(RUN["delta"]))
    report = audit([deployment.root / f"{site}-ledger" / f"site-{site}.jsonl" for site in SITES])
    assert report.passed, report.findings


def test_unregistered_keys_and_unverified_servers_are_refused(
    deployment: LocalDeployment, site_data: dict[str, Path], tmp_path: Path
) -> None:
    stranger_key, _ = deployment.site_keys("stranger")  # made, never registered
    deployment.start_supernode("stranger", _node_config("north", site_data, deployment.root), stranger_key)
    other_ca = write_certificates(tmp_path / "other-ca", ["127.0.0.1"])["ca.crt"]
    private, public = deployment.site_keys("south")
    assert deployment.register(public).returncode == 0
    deployment.start_supernode("no-ca", _node_config("south", site_data, deployment.root), private, ca_file=other_ca)
    time.sleep(20)
    assert deployment.connected_nodes() == 0
    stranger_log = (deployment.root / "supernode-stranger.log").read_text(errors="replace")
    no_ca_log = (deployment.root / "supernode-no-ca.log").read_text(errors="replace")
    assert "not registered" in stranger_log.lower() or "unauthenticated" in stranger_log.lower(), stranger_log[-2000:]
    assert "certificate" in no_ca_log.lower() or "ssl" in no_ca_log.lower(), no_ca_log[-2000:]
