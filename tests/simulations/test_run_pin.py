"""A run folder pins its settings, sites and partition: every refusal happens before Flower starts.

Flower never starts here: ``_run_on_flower`` (everything from the SuperLink on) is replaced by a stand-in that
records the launch and stops, so each test sees exactly what `fedtail simulate` does before Flower.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import simulations.simulate as simulate_module
from client.shard import _federation
from common.errors import ConfigError
from common.federation import RunSettings
from common.utils.processes import LAUNCHER_LOCK, lock_run_folder
from server.app import run_id_for
from server.checkpoint import Checkpoint, load_checkpoint
from simulations.cli import main
from simulations.simulate import Resources, simulate

SMALL = "synthetic:users=200,items=80,seed=4"


class FlowerWouldStart(Exception):
    """Raised where Flower would start: every check before it passed."""


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of sites of each launch that got as far as starting Flower."""
    sites: list[int] = []

    def launch(settings: RunSettings, resources: Resources, out_dir: Path, site_config: object) -> None:
        sites.append(resources.sites)
        raise FlowerWouldStart

    monkeypatch.setattr(simulate_module, "_run_on_flower", launch)
    return sites


def _started(out: Path, *options: str) -> list[str]:
    """A run of 2 sites started in ``out`` that went as far as Flower, then wrote what a finished run leaves."""
    args = ["simulate", SMALL, "--out", str(out), "--sites", "2", *options]
    with pytest.raises(FlowerWouldStart):
        main(args)
    (out / "flower.log").write_text("the first run's whole Flower log\n")
    (out / "summary.json").write_text(json.dumps({"privacy": {"epsilon": 7.998, "per_site": {"0": 7.9, "1": 7.998}}}))
    return args


def _contents(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_the_run_record_holds_settings_sites_and_partition_and_is_the_servers_run_id(
    tmp_path: Path, launches: list[int]
) -> None:
    out = tmp_path / "run"
    _started(out)
    record = json.loads((out / "run.json").read_text())
    assert set(record) == {"run_id", "settings", "sites", "partition_sha256"}
    assert record["sites"] == 2 and re.fullmatch("[0-9a-f]{64}", record["partition_sha256"])
    assert RunSettings.from_run_config(record["settings"]) == RunSettings(dataset=SMALL, out_dir=str(out.resolve()))
    assert run_id_for(out) == record["run_id"], "the ServerApp continues the run the record names"


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (["--sites", "3"], "sites 2 (saved) vs 3 (now)"),
        (["--seed", "1"], "seed 0 (saved) vs 1 (now)"),
        (["--partition", "taste"], "partitioning 'uniform' (saved) vs 'taste' (now)"),
        (["--kcore", "2"], "kcore 0 (saved) vs 2 (now)"),
        (["--epsilon", "2"], "epsilon 8.0 (saved) vs 2.0 (now)"),
        (["--sites", "3", "--rounds", "4"], "rounds 10 (saved) vs 4 (now), sites 2 (saved) vs 3 (now)"),
    ],
)
def test_a_resume_that_changes_who_is_where_or_any_setting_is_refused_before_flower_and_changes_nothing(
    tmp_path: Path, launches: list[int], capsys: pytest.CaptureFixture[str], change: list[str], named: str
) -> None:
    out = tmp_path / "run"
    args = _started(out)
    before = _contents(out)
    capsys.readouterr()
    assert main([*args, *change]) == 2
    error = capsys.readouterr().err
    assert named in error and error.count("\n") == 1, error
    assert launches == [2], "Flower did not start for the refused resume"
    assert _contents(out) == before, "the refused resume left the run (its flower.log, record, summary) as it was"
    with pytest.raises(FlowerWouldStart):  # the same command still resumes
        main(args)
    assert launches == [2, 2]


def test_a_resume_over_changed_data_is_refused_naming_the_partition(tmp_path: Path, launches: list[int]) -> None:
    data = tmp_path / "pairs.txt"
    data.write_text("".join(f"u{u} i{(u * 7 + k) % 40}\n" for u in range(60) for k in range(6)))
    settings = RunSettings(dataset=f"pairs:{data}", out_dir=str(tmp_path / "run"))
    with pytest.raises(FlowerWouldStart):
        simulate(settings, Resources(sites=2))
    with data.open("a") as handle:  # one more user: the uniform partition moves others to other sites
        handle.write("".join(f"u-new i{k}\n" for k in range(6)))
    _federation.cache_clear()  # a resume is a new process: it reads the file again
    with pytest.raises(ConfigError, match="partition sha256 .* the data behind 'pairs:.*pairs.txt' .*changed"):
        simulate(settings, Resources(sites=2))
    assert launches == [2]


def test_a_second_simulate_into_a_folder_in_use_is_refused_at_once_and_touches_nothing(
    tmp_path: Path, launches: list[int]
) -> None:
    out = tmp_path / "run"
    args = _started(out)
    (out / "flower").mkdir(exist_ok=True)
    (out / "flower" / "config.toml").write_text("the first run's SuperLink connection\n")
    before = _contents(out)
    with lock_run_folder(out, LAUNCHER_LOCK):  # the first `fedtail simulate`, still running
        with pytest.raises(ConfigError, match="being written by another run"):
            simulate(RunSettings(dataset=SMALL, out_dir=str(out)), Resources(sites=2))
        assert main(args) == 2
    assert launches == [2]
    assert _contents(out) == before


def test_a_folder_whose_run_recorded_no_settings_is_not_resumed_by_simulate(
    tmp_path: Path, launches: list[int]
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"run_id": "started-by-flwr-run"}))
    with pytest.raises(ConfigError, match="did not record its settings and sites"):
        simulate(RunSettings(dataset=SMALL, out_dir=str(out)), Resources(sites=2))
    assert launches == []


def test_the_servers_checkpoint_check_names_each_difference_for_flwr_run_users(tmp_path: Path) -> None:
    saved = RunSettings(dataset=SMALL, epsilon=1.0, out_dir=str(tmp_path))
    Checkpoint("a-run", 1, {}, saved.to_run_config(), {}).save(tmp_path)
    with pytest.raises(ConfigError, match=r"other settings: epsilon 1\.0 \(saved\) vs 4\.0 \(now\); resume"):
        load_checkpoint(tmp_path, RunSettings(dataset=SMALL, epsilon=4.0, out_dir=str(tmp_path)).to_run_config())
