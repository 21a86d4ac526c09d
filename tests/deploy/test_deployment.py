"""Flower's Deployment Engine on loopback, every part a real process: TLS, SuperNode authentication, faults, and
sites that run only the app bundles they approved.

Slow (every part is a real process, each site's runtime imports torch once and Flower's SuperNode polls every 3 s):
run with ``pytest -m slow tests/deploy``.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from common.data.synthetic import SyntheticConfig, generate
from common.flower.runtime import bundle_sha256
from common.privacy.ledger import Ledger
from common.run_files import read_rounds
from common.utils.processes import APP_DIR, executable
from simulations.audit import audit
from simulations.credentials import write_certificates
from simulations.deployment import CONNECTION, LocalDeployment, site_node_config, write_site_files
from simulations.flower_cli import flower_env, write_connection, write_run_config
from tests.apps import app_copy

pytestmark = pytest.mark.slow

SITES = ("north", "south", "east")
RUN = dict(
    dataset="", rounds=3, epsilon=4.0, delta=1e-3, hidden=16, heads=1, blocks=1, max_len=10, batch_size=16,
    min_sites=3,
)


@pytest.fixture
def site_data(tmp_path: Path) -> dict[str, Path]:
    """Three sites' own interaction files and the coordinator's public catalogue (``catalog``)."""
    return write_site_files(generate(SyntheticConfig(users=330, items=80, seed=5)), SITES, tmp_path / "data")


def _run_config(data: dict[str, Path], out_dir: Path, **overrides: Any) -> dict[str, Any]:
    return {**{k.replace("_", "-"): v for k, v in RUN.items()}, "catalog-path": str(data["catalog"]),
            "out-dir": str(out_dir), **overrides}


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[LocalDeployment]:
    with LocalDeployment(tmp_path / "federation") as federation:
        federation.start_superlink()
        yield federation


def _join(
    federation: LocalDeployment, data: dict[str, Path], sites: tuple[str, ...] = SITES,
    approve: Mapping[str, Sequence[str]] | None = None,
) -> None:
    """``approve``: app bundles (sha256) a site runs besides the installed release's."""
    for site in sites:
        private, public = federation.site_keys(site)
        registered = federation.register(public)
        assert registered.returncode == 0, registered.stdout + registered.stderr
        node_config = site_node_config(site, data, federation.root, delta=RUN["delta"])
        federation.start_supernode(site, node_config, private, approve=(approve or {}).get(site, ()))
    _wait_for(lambda: federation.connected_nodes() >= len(sites), f"{len(sites)} SuperNodes online", 120)


def _wait_for(condition: Any, what: str, timeout_s: float) -> None:
    """Checks every 0.1 s: a deployed round of this federation takes about a second."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_tls_authenticated_federation_of_three_sites_trains_with_dp(
    deployment: LocalDeployment, site_data: dict[str, Path]
) -> None:
    _join(deployment, site_data)
    out_dir = deployment.root / "run"
    status = deployment.wait(deployment.submit(_run_config(site_data, out_dir)), timeout_s=900)
    assert status["status"] == "finished:completed", status
    assert (out_dir / "global_model.pt").exists()
    rounds = read_rounds(out_dir)
    assert [r.round for r in rounds] == [1, 2, 3]
    assert all(sorted(r.sites_trained) == sorted(SITES) for r in rounds)
    summary = json.loads((out_dir / "summary.json").read_text())
    for site in SITES:
        ledger = Ledger(deployment.root / f"{site}-ledger" / f"site-{site}.jsonl")
        assert [entry["round"] for entry in ledger.entries()] == [1, 2, 3]
        assert summary["privacy"]["per_site"][site] == pytest.approx(ledger.epsilon(RUN["delta"]))
    ledgers = [deployment.root / f"{site}-ledger" / f"site-{site}.jsonl" for site in SITES]
    alone = audit(ledgers)
    assert alone.passed and not alone.witnessed, "the sites' own ledgers cannot vouch for their last lines"
    for site, ledger in zip(SITES, ledgers, strict=True):  # each site's officer, with the coordinator's rounds.jsonl
        report = audit([ledger], [out_dir / "rounds.jsonl"])
        assert report.passed and report.witnessed, (site, report.findings, report.not_verified)


def test_unregistered_keys_and_unverified_servers_are_refused(
    deployment: LocalDeployment, site_data: dict[str, Path], tmp_path: Path
) -> None:
    stranger_key, _ = deployment.site_keys("stranger")  # made, never registered
    deployment.start_supernode("stranger", site_node_config("north", site_data, deployment.root), stranger_key)
    other_ca = write_certificates(tmp_path / "other-ca", ["127.0.0.1"])["ca.crt"]
    private, public = deployment.site_keys("south")
    assert deployment.register(public).returncode == 0
    # A registered key, but the site trusts another CA: it cannot verify the SuperLink, so it never connects.
    deployment.start_supernode("wrong-ca", site_node_config("south", site_data, deployment.root), private, other_ca)
    time.sleep(20)
    assert deployment.connected_nodes() == 0
    refusal = "No SuperNode found with the given public key"
    _wait_for(lambda: refusal in (deployment.root / "superlink.log").read_text(errors="replace"),
              "the SuperLink's refusal of the stranger", 90)
    # Control: the same registered key with the right CA joins, so the refusal above was the CA's doing.
    deployment.kill_supernode("wrong-ca")
    south_config = site_node_config("south", site_data, deployment.root, delta=RUN["delta"])
    deployment.start_supernode("south", south_config, private)
    _wait_for(lambda: deployment.connected_nodes() == 1, "the correctly configured site online", 90)
    assert deployment.connected_nodes() == 1, "and only it: the stranger never got in"


def _outsider(federation: LocalDeployment, home: Path, port: int) -> dict[str, str]:
    """The environment of a party holding only the public ca.crt every site receives, its ``flwr`` pointed at
    127.0.0.1:``port``."""
    assert federation.ca_file is not None
    (home / "ca.crt").parent.mkdir(parents=True, exist_ok=True)
    (home / "ca.crt").write_bytes(federation.ca_file.read_bytes())
    write_connection(home, CONNECTION, port, home / "ca.crt")
    return flower_env(home)


def _flwr(env: Mapping[str, str], *command: str) -> dict[str, Any]:
    """A ``flwr`` command's JSON answer (``success`` false, with Flower's reason, when it failed)."""
    result = subprocess.run([executable("flwr"), *command, CONNECTION, "--format", "json"], env=dict(env),
                            capture_output=True, text=True, check=False, timeout=300)
    try:
        return dict(json.loads(result.stdout))
    except json.JSONDecodeError:
        return {"success": False, "error-message": result.stdout + result.stderr}


def _post_status(url: str, ca_file: Path) -> int:
    request = urllib.request.Request(url, data=b"", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10, context=ssl.create_default_context(cafile=str(ca_file))):
            return 200
    except urllib.error.HTTPError as error:
        return error.code


def test_a_party_holding_only_the_ca_certificate_cannot_act_as_the_coordinator(
    deployment: LocalDeployment, site_data: dict[str, Path], tmp_path: Path
) -> None:
    """The sites' address serves the Fleet API only: there, an outsider with the public ca.crt (and the approved
    app) can neither list runs or sites, register a SuperNode, submit a run nor reach the ServerApp's Runtime API,
    while the registered sites train through the same address as before. The same outsider pointed at the
    SuperLink's own loopback port, the coordinator operator's, does all of it: the refusals are the binding's."""
    sites = ("north", "south")
    _join(deployment, site_data, sites)
    outsider = _outsider(deployment, tmp_path / "outsider", deployment.port)  # the address the sites are given
    _, rogue_key = deployment.site_keys("rogue")
    rogue_run = write_run_config(tmp_path / "rogue-run.toml", _run_config(site_data, tmp_path / "rogue-out", rounds=1))
    attempts = {
        "list runs": _flwr(outsider, "ls"),
        "list sites": _flwr(outsider, "supernode", "list"),
        "register a node": _flwr(outsider, "supernode", "register", str(rogue_key)),
        "submit a run": _flwr(outsider, "run", str(APP_DIR), "--run-config", str(rogue_run)),
    }
    assert not any(answer["success"] for answer in attempts.values()), attempts
    assert all("404 Not Found" in answer["error-message"] for answer in attempts.values()), attempts
    assert deployment.ca_file is not None
    for api in ("runtime/get-nodes", "runtime/pull-messages", "control/list-runs"):
        assert _post_status(f"https://127.0.0.1:{deployment.port}/v1/{api}", deployment.ca_file) == 404, api

    out_dir = deployment.root / "run"  # the operator's run: the sites train through the same address
    run_id = deployment.submit(_run_config(site_data, out_dir, rounds=2, **{"min-sites": 2}))
    status = deployment.wait(run_id, timeout_s=600)
    assert status["status"] == "finished:completed", status
    assert all(sorted(r.sites_trained) == sorted(sites) for r in read_rounds(out_dir))
    assert not (tmp_path / "rogue-out").exists()
    assert [int(run["run-id"]) for run in _flwr(deployment.env, "ls")["runs"]] == [run_id], "no rogue run"
    assert len(_flwr(deployment.env, "supernode", "list")["nodes"]) == len(sites), "no rogue node"

    # Control: the same outsider at the SuperLink's own port (the one the sites' address used to be).
    insider = _outsider(deployment, tmp_path / "at-the-superlink", deployment.superlink_port)
    assert [int(run["run-id"]) for run in _flwr(insider, "ls")["runs"]] == [run_id]
    assert _flwr(insider, "supernode", "register", str(rogue_key))["success"]


def _ledger_rounds(root: Path, site: str) -> list[int]:
    path = root / f"{site}-ledger" / f"site-{site}.jsonl"
    return [entry["round"] for entry in Ledger(path).entries()] if path.exists() else []


def test_a_site_killed_in_round_two_is_left_out_consistently_and_rejoins(
    deployment: LocalDeployment, site_data: dict[str, Path]
) -> None:
    _join(deployment, site_data)
    out_dir = deployment.root / "run"
    rounds_in_run = 20  # rounds take about a second: enough left for the restarted east (imports, reconnect) to rejoin
    run_id = deployment.submit(_run_config(site_data, out_dir, rounds=rounds_in_run, **{"min-sites": 2}))
    _wait_for(lambda: len(read_rounds(out_dir)) >= 1, "round 1", 300)
    deployment.kill_supernode("east")  # round 2 has just been sent out: east is still starting its ClientApp
    killed_during = len(read_rounds(out_dir)) + 1
    _wait_for(lambda: len(read_rounds(out_dir)) >= killed_during, f"round {killed_during} without east", 400)
    private = deployment.root / "keys" / "east"
    east_config = site_node_config("east", site_data, deployment.root, delta=RUN["delta"])
    deployment.start_supernode("east", east_config, private)
    status = deployment.wait(run_id, timeout_s=900)
    assert status["status"] == "finished:completed", status
    rounds = read_rounds(out_dir)
    assert [r.round for r in rounds] == list(range(1, rounds_in_run + 1))
    without_east = [r.round for r in rounds if "east" not in r.sites_trained]
    assert killed_during in without_east and all(len(r.sites_trained) >= 2 for r in rounds)
    assert "east" in rounds[-1].sites_trained, "the restarted site rejoined a later round"
    east = _ledger_rounds(deployment.root, "east")
    assert killed_during not in east and east == sorted(set(east)), "no round recorded that east did not finish"
    assert set(east) == {r.round for r in rounds if "east" in r.sites_trained}
    summary = json.loads((out_dir / "summary.json").read_text())
    ledger = Ledger(deployment.root / "east-ledger" / "site-east.jsonl")
    assert summary["privacy"]["per_site"]["east"] == pytest.approx(ledger.epsilon(RUN["delta"]))


def test_a_coordinator_killed_mid_run_resumes_without_counting_any_round_twice(
    deployment: LocalDeployment, site_data: dict[str, Path]
) -> None:
    _join(deployment, site_data)
    out_dir = deployment.root / "run"
    config = _run_config(site_data, out_dir, rounds=6)
    deployment.submit(config)
    _wait_for(lambda: len(read_rounds(out_dir)) >= 2, "round 2", 400)
    deployment.kill_superlink()  # SuperLink and ServerApp, mid-round 3
    done_before = len(read_rounds(out_dir))
    deployment.start_superlink()  # same database: the registered sites reconnect by themselves
    _wait_for(lambda: deployment.connected_nodes() >= len(SITES), "sites back online", 240)
    status = deployment.wait(deployment.submit(config), timeout_s=900)
    assert status["status"] == "finished:completed", status
    rounds = read_rounds(out_dir)
    assert [r.round for r in rounds] == [1, 2, 3, 4, 5, 6] and done_before < 6
    summary = json.loads((out_dir / "summary.json").read_text())
    for site in SITES:
        assert _ledger_rounds(deployment.root, site) == [1, 2, 3, 4, 5, 6], f"{site}: each round charged exactly once"
        ledger = Ledger(deployment.root / f"{site}-ledger" / f"site-{site}.jsonl")
        assert summary["privacy"]["per_site"][site] == pytest.approx(ledger.epsilon(RUN["delta"]))


TRACE_ON_IMPORT = (
    "import os as _os\n"
    "with open({marker!r}, 'a', encoding='utf-8') as _marker:\n"
    "    _marker.write(f'{{_os.getppid()}}\\n')  # who started this ClientApp: a site's runtime\n"
)


def test_a_site_runs_only_app_bundles_it_approved_and_tells_the_coordinator_why(
    deployment: LocalDeployment, site_data: dict[str, Path], tmp_path: Path
) -> None:
    """The coordinator submits its own copy of the app with client/dp_sgd.py changed (here the change only leaves a
    trace when the module is imported). north approved only the release it installed: it refuses the bundle
    without running any of it and without training, and the coordinator reads why. south approved the changed
    bundle by its hash and runs it, which shows the trace would have caught north running it; one site is fewer
    than the run's min-sites, so the run fails and keeps no model. Then the release itself trains at both sites."""
    marker = tmp_path / "changed-app-ran"
    changed = app_copy(tmp_path / "coordinator", TRACE_ON_IMPORT.format(marker=str(marker)))
    changed_hash = bundle_sha256(changed)
    _join(deployment, site_data, ("north", "south"), approve={"south": [changed_hash]})
    runtime_pids = {site: str(process.pid) for site, process in deployment.runtimes.items()}

    changed_run = deployment.root / "changed-run"
    config = _run_config(site_data, changed_run, rounds=1, **{"min-sites": 2})
    status = deployment.wait(deployment.submit(config, app=changed), timeout_s=600)
    assert status["status"] == "finished:failed", status  # its one round had 1 trained site, min-sites 2
    assert "fewer than min-sites = 2" in str(status.get("status-details")), status
    assert not (changed_run / "global_model.pt").exists()
    [line] = read_rounds(changed_run)
    assert line.sites_trained == ["south"] and len(line.failures) == 1 and line.failed is not None
    [failure] = line.failures
    assert f"app bundle sha256 {changed_hash} is not approved by this site" in failure, failure
    ran_at = marker.read_text().split()
    assert runtime_pids["south"] in ran_at, "south, which approved the changed bundle, ran it"
    assert runtime_pids["north"] not in ran_at, "north never imported the changed code"
    north_ledger = deployment.root / "north-ledger" / "site-north.jsonl"
    assert not north_ledger.exists(), "north charged nothing: its train handler never ran"
    north_log = (deployment.root / "supernode-north.log").read_text(errors="replace")
    assert f"REFUSED: app bundle sha256 {changed_hash}" in north_log
    assert "fedtail-site north round" not in north_log

    release_run = deployment.root / "release-run"
    status = deployment.wait(deployment.submit(_run_config(site_data, release_run, rounds=1, **{"min-sites": 2})),
                             timeout_s=600)
    assert status["status"] == "finished:completed", status
    [line] = read_rounds(release_run)
    assert line.sites_trained == ["north", "south"] and line.failures == []
    assert _ledger_rounds(deployment.root, "north") == [1]
    assert marker.read_text().split() == ran_at, "the release is not the changed code"


def test_a_site_runtime_killed_while_idle_is_restarted_by_its_operator_and_serves_the_waiting_round(
    deployment: LocalDeployment, site_data: dict[str, Path]
) -> None:
    """The warm runtime (client.runtime, running the installed release in its own process) is the site's own
    long-lived process. Killed while it holds no task and its SuperNode stays up, the site's next task waits at the
    SuperNode; the operator restarts the runtime, which takes that task and every later one: no round lost or
    counted twice. (Killed holding a task, that round fails for the site as for a crashed ClientApp; rounds follow
    each other within a second, so the test kills it before the run, the one moment it surely holds none.)"""
    _join(deployment, site_data, ("north", "south"))
    out_dir = deployment.root / "run"
    north_log_path = deployment.root / "supernode-north.log"
    started = "runs in this process (warm)"
    _wait_for(lambda: started in north_log_path.read_text(errors="replace"), "north's runtime", 120)
    deployment.kill_runtime("north")
    run_id = deployment.submit(_run_config(site_data, out_dir, rounds=4, **{"min-sites": 2}))
    _wait_for(lambda: _ledger_rounds(deployment.root, "south") == [1], "south's round 1", 300)
    time.sleep(3)
    assert not read_rounds(out_dir), "round 1 waits for north (min-sites 2)"
    deployment.start_runtime("north")
    status = deployment.wait(run_id, timeout_s=600)
    assert status["status"] == "finished:completed", status
    rounds = read_rounds(out_dir)
    assert [r.round for r in rounds] == [1, 2, 3, 4]
    assert all(sorted(r.sites_trained) == ["north", "south"] for r in rounds)
    assert _ledger_rounds(deployment.root, "north") == [1, 2, 3, 4], "each round charged exactly once"
    north_log = north_log_path.read_text(errors="replace")
    assert north_log.count(started) == 2, "started by its operator twice"
    assert "approved, starting it" not in north_log, "never a fresh flwr-clientapp"
