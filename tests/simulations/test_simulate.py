"""Federations through Flower's real Simulation Engine (SuperLink, `flwr run`, Ray), end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common.errors import ConfigError
from common.federation import RunSettings
from common.privacy.ledger import Ledger, Spend
from common.recommender.artifacts import load_model
from common.run_files import read_rounds
from common.utils.processes import LAUNCHER_LOCK
from server.checkpoint import Checkpoint, load_checkpoint
from simulations import cli
from simulations.audit import audit
from simulations.simulate import Resources, SimulationFailed, preflight, simulate
from tests.ledgers import fresh_pld_epsilon

SMALL = dict(
    dataset="synthetic:users=240,items=90,seed=2",
    rounds=2,
    epsilon=4.0,
    delta=1e-4,
    hidden=16,
    heads=1,
    blocks=1,
    max_len=12,
    batch_size=32,
)


def _fresh_epsilon(ledger_path: Path) -> float:
    lines = [json.loads(line) for line in ledger_path.read_text().splitlines()]
    return fresh_pld_epsilon(lines, lines[-1]["delta"])


def test_a_small_dp_federation_runs_through_flower_and_writes_everything(tmp_path: Path) -> None:
    # FedAdam on the server: the mixed-in strategy path runs end to end here (the other runs use plain FedAvg).
    settings = RunSettings(**SMALL, server_optimizer="fedadam", out_dir=str(tmp_path / "run"))
    summary = simulate(settings, Resources(sites=2))
    out = tmp_path / "run"
    assert {"global_model.pt", "catalog.json", "rounds.jsonl", "summary.json", "rounds.svg", "checkpoint.pt"} <= {
        p.name for p in out.iterdir()
    }
    rounds = read_rounds(out)
    assert [r.round for r in rounds] == [1, 2]
    assert all(r.sites_trained == ["0", "1"] for r in rounds)
    recomputed = {site: _fresh_epsilon(out / "ledgers" / f"site-{site}.jsonl") for site in ("0", "1")}
    assert summary["privacy"]["per_site"] == pytest.approx(recomputed)
    assert summary["privacy"]["epsilon"] == pytest.approx(max(recomputed.values()))
    assert max(recomputed.values()) <= 4.0
    assert set(summary) >= {"overall", "groups", "items", "baselines", "privacy"}
    model, catalog = load_model(out, "global_model.pt")
    assert model.config.num_items == catalog.num_items
    # The kept model is the round with the best validation NDCG@10, and it is the one that was tested.
    valid = [r.valid["ndcg@10"] for r in rounds]
    best_round = 1 + valid.index(max(valid))
    assert summary["run"]["model_round"] == best_round and summary["run"]["model_selection"] == "best-validation"
    assert summary["privacy"]["model_selection"]["kept_round"] == best_round
    # Each round the coordinator recorded every site's ledger head: one more line per round trained.
    assert [r.site_ledger_head["0"]["lines"] for r in rounds] == [1, 2]
    checkpoint = load_checkpoint(out, settings.to_run_config())
    assert checkpoint is not None and checkpoint.round == 2 and checkpoint.best is not None
    assert checkpoint.best.round == best_round and checkpoint.best.valid_ndcg == max(valid)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in checkpoint.best.state_dict.items())
    report = audit([out])  # the auditor's view of the same folder: intact, cross-checked with rounds.jsonl
    assert report.passed and report.witnessed, [str(f) for f in report.findings]
    assert report.epsilon == pytest.approx(summary["privacy"]["epsilon"])
    assert all(site.users is not None and site.delta_below_one_over_users for site in report.sites.values())


def test_a_failed_run_is_reported_even_though_flwr_run_exits_0(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    other = RunSettings(**{**SMALL, "epsilon": 1.0}, out_dir=str(out.resolve()))
    Checkpoint("old", 1, {}, other.to_run_config(), {}).save(out)  # a different run's folder
    with pytest.raises(SimulationFailed, match="other settings"):
        simulate(RunSettings(**SMALL, out_dir=str(out)), Resources(sites=2))


def test_a_run_where_every_site_fails_stops_and_says_why(tmp_path: Path) -> None:
    out = tmp_path / "run"
    for site in ("0", "1"):  # both sites' ledgers are corrupt: no site may train on an unknown history
        (out / "ledgers").mkdir(parents=True, exist_ok=True)
        (out / "ledgers" / f"site-{site}.jsonl").write_text("{not json\n")
    # The coordinator reads only the fixed public reason (an error text is a release); the site's own log has why.
    failure = "every sampled site failed.*the site could not answer this message; its operator finds why"
    with pytest.raises(SimulationFailed, match=failure):
        simulate(RunSettings(**SMALL, out_dir=str(out)), Resources(sites=2))
    assert "site-0.jsonl, line 1: not a JSON ledger line" in (out / "flower.log").read_text()


@pytest.mark.slow
def test_a_huge_learning_rate_never_ends_as_a_completed_run_with_a_nan_model_scored_perfect(tmp_path: Path) -> None:
    """`fedtail simulate ... --lr 1e30` used to exit 0 keeping an all-NaN global model with NDCG@10 1.0000. Whatever
    the sites do with such a rate (decline it, or send back NaN), the run now fails and keeps no model."""
    out = tmp_path / "run"
    with pytest.raises(SimulationFailed):
        simulate(RunSettings(dataset="synthetic:users=300,items=100", rounds=1, learning_rate=1e30, out_dir=str(out)),
                 Resources(sites=2))
    assert not (out / "global_model.pt").exists() and not (out / "summary.json").exists()


def test_preflight_rejects_empty_sites_and_a_delta_too_large_for_a_site() -> None:
    with pytest.raises(ConfigError, match="1/users"):
        preflight(RunSettings(**{**SMALL, "delta": 0.05}), 4)
    with pytest.raises(ConfigError, match="at least 1"):
        preflight(RunSettings(**SMALL), 0)


def _fedtail(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "fedtail"), *args]


SMALL_ARGS = [
    "synthetic:users=240,items=90,seed=2", "--sites", "3", "--rounds", "4", "--epsilon", "4", "--delta", "1e-4",
    "--hidden", "16", "--heads", "1", "--blocks", "1", "--max-len", "12", "--batch-size", "32",
]


@pytest.mark.slow
def test_a_run_killed_after_round_k_resumes_to_the_same_rounds_and_epsilons(tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    subprocess.run(_fedtail("simulate", *SMALL_ARGS, "--out", str(whole)), check=True, capture_output=True)
    cut = tmp_path / "cut"
    process = subprocess.Popen(
        _fedtail("simulate", *SMALL_ARGS, "--out", str(cut)),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        rounds_file = cut / "rounds.jsonl"
        if rounds_file.exists() and len(rounds_file.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished_before_kill = len((cut / "rounds.jsonl").read_text().splitlines())
    assert finished_before_kill < 4, "the kill must land mid-run"
    time.sleep(5)  # the orphaned Flower processes stop with their parents
    _assert_other_sites_refused_at_once(cut)
    subprocess.run(_fedtail("simulate", *SMALL_ARGS, "--out", str(cut)), check=True, capture_output=True)
    _assert_other_sites_refused_at_once(cut)  # a finished run too
    whole_summary = json.loads((whole / "summary.json").read_text())
    cut_summary = json.loads((cut / "summary.json").read_text())
    assert [json.loads(line)["round"] for line in (cut / "rounds.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert cut_summary["privacy"]["per_site"] == pytest.approx(whole_summary["privacy"]["per_site"], rel=1e-9)
    for site in ("0", "1", "2"):
        assert _fresh_epsilon(cut / "ledgers" / f"site-{site}.jsonl") == pytest.approx(
            _fresh_epsilon(whole / "ledgers" / f"site-{site}.jsonl"), rel=1e-9
        )


def _assert_other_sites_refused_at_once(out: Path) -> None:
    """Another --sites would move users between sites: refused before Flower starts (its SuperLink's logs stay as
    they were), the run left as it was (flower.log, record, ledgers, summary)."""
    def files() -> dict[Path, bytes]:
        return {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != LAUNCHER_LOCK}

    before = files()
    other = subprocess.run(_fedtail("simulate", *SMALL_ARGS, "--sites", "2", "--out", str(out)),
                           capture_output=True, text=True, check=False)
    assert other.returncode == 2 and "sites 3 (saved) vs 2 (now)" in other.stderr, other.stderr
    assert files() == before


def _processes() -> dict[int, tuple[int, str]]:
    """Every live process: pid -> (process group, command line)."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
        if entry.name.isdigit():
            found[int(entry.name)] = (int(stat[stat.rindex(")") + 2 :].split()[2]), command)
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc (Linux)")
def test_a_terminated_simulation_stops_its_superlink_and_everything_it_started(tmp_path: Path) -> None:
    out = tmp_path / "run"
    process = subprocess.Popen(_fedtail("simulate", *SMALL_ARGS, "--out", str(out)),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (out / "rounds.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    superlinks = [group for group, command in _processes().values()
                  if "flower-superlink" in command and str(out) in command]
    assert len(superlinks) == 1, "the simulation's SuperLink is running"
    process.send_signal(signal.SIGTERM)  # the process alone, as `kill PID` does, not its group
    assert process.wait(timeout=60) == 130
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        left = [command for group, command in _processes().values() if group == superlinks[0] or str(out) in command]
        if not left:
            break
        time.sleep(0.5)
    assert not left, f"still running after fedtail was terminated: {left}"


@pytest.mark.slow
def test_a_site_without_budget_declines_and_the_run_still_finishes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    earlier = Ledger(out / "ledgers" / "site-0.jsonl")  # site 0 already spent most of its budget on these users
    earlier.append(Spend("an-earlier-run", 1, "0", 0.2, 1.5, 1.0, 20, 1e-4, "rdp", {}))  # epsilon 3.24
    spent = earlier.epsilon(1e-4)
    assert 0 < spent < 4.0
    settings = RunSettings(**SMALL, out_dir=str(out))
    summary = simulate(settings, Resources(sites=3))
    rounds = read_rounds(out)
    assert len(rounds) == 2
    assert all("0" in r.sites_declined and "budget" in r.sites_declined["0"] for r in rounds)
    assert all(r.sites_trained == ["1", "2"] for r in rounds)
    assert summary["privacy"]["per_site"]["0"] == pytest.approx(spent)
    assert len(earlier.entries()) == 1


@pytest.mark.slow
def test_user_level_dp_fedavg_under_central_noise_runs_through_flower_from_the_command_line(tmp_path: Path) -> None:
    """``fedtail simulate --noise central --user-update delta``: every site sends its users' clipped deltas, each
    round is one accounted step, and the auditor agrees with the summary."""
    out = tmp_path / "run"
    args = ["simulate", "synthetic:users=160,items=90,seed=3", "--out", str(out), "--sites", "2", "--rounds", "2",
            "--noise", "central", "--user-update", "delta", "--user-steps", "2", "--epsilon", "4", "--delta", "1e-4",
            "--hidden", "16", "--heads", "1", "--blocks", "1", "--max-len", "10", "--batch-size", "30"]
    assert cli.main(args) == 0
    rounds = read_rounds(out)
    assert [r.round for r in rounds] == [1, 2] and all(r.sites_trained == ["0", "1"] for r in rounds)
    for site in ("0", "1"):
        lines = Ledger(out / "ledgers" / f"site-{site}.jsonl").entries()
        assert [(line["noise_placement"], line["steps"]) for line in lines] == [("central", 1)] * 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run"]["settings"]["user-update"] == "delta" and "user-level DP-FedAvg" in summary["run"]["kind"]
    assert summary["privacy"]["epsilon"] <= 4.0
    model, _ = load_model(out, "global_model.pt")
    assert all(bool(torch.isfinite(value).all()) for value in model.state_dict().values())
    report = audit([out])
    assert report.passed, [str(f) for f in report.findings]
    assert report.epsilon == pytest.approx(summary["privacy"]["epsilon"])
