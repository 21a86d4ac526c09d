"""Run a federation on Flower's Simulation Engine, the way `flwr run` does, and check that it really finished.

Each simulation gets its own SuperLink (simulation mode, loopback, a free port,
Flower home inside the run folder) instead of Flower's shared managed one: the
shared one outlives `flwr run`, keeps the environment of its first start and
would mix runs. Runtime dependency installation is disabled (this process's
environment already has everything). `flwr run` exits 0 even when the
ServerApp fails, so the run's final status is read back from the SuperLink.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.dp import check_delta
from client.shard import simulated_shard
from common.errors import ConfigError
from common.federation import RunSettings
from common.processes import APP_DIR, die_with_parent, executable, free_loopback_port
from common.progress import log
from simulations.flower_cli import (
    FlowerFailed,
    flower_env,
    list_runs,
    stop_process_group,
    wait_for_superlink,
    write_connection,
    write_run_config,
)

CONNECTION = "fedtail-local"
PROGRESS_PREFIX = "fedtail:"


class SimulationFailed(FlowerFailed):
    """The run did not finish as completed; the message carries Flower's status and the log's tail."""


@dataclass(frozen=True)
class Resources:
    sites: int
    cpus_per_site: int = 2
    gpus_per_site: float = 0.0
    timeout_s: float = 6 * 3600.0


def preflight(settings: RunSettings, sites: int) -> list[int]:
    """Check every simulated site before Flower starts; returns the users with training pairs per site."""
    if sites < 1:
        raise ConfigError("--sites must be at least 1")
    if settings.min_sites > sites:
        raise ConfigError(f"--min-sites {settings.min_sites} is more than --sites {sites}")
    sizes = []
    for site in range(sites):
        shard = simulated_shard(
            settings.dataset, settings.kcore, settings.partitioning, settings.seed, site, sites, settings.max_len
        )
        if len(shard.examples) == 0:
            raise ConfigError(f"site {site} has no user with two or more training interactions; use fewer sites")
        if settings.dp:
            check_delta(len(shard.examples), settings.delta)
        sizes.append(len(shard.examples))
    return sizes


def simulate(settings: RunSettings, resources: Resources) -> dict[str, Any]:
    """Run the ServerApp and ClientApps in this repository through Flower; returns the run's summary."""
    sizes = preflight(settings, resources.sites)
    log(f"fedtail: site sizes (users with training pairs): min {min(sizes)}, max {max(sizes)}")
    out_dir = Path(settings.out_dir).resolve()
    settings = RunSettings(**{**settings.__dict__, "out_dir": str(out_dir)})
    flower_home = out_dir / "flower"
    flower_home.mkdir(parents=True, exist_ok=True)
    port = free_loopback_port()
    write_connection(flower_home, CONNECTION, port, root_certificates=None)
    run_config_file = write_run_config(flower_home / "run-config.toml", settings.to_run_config())
    env = flower_env(flower_home)
    superlink_log = flower_home / "superlink.log"
    superlink_output = (flower_home / "superlink.out").open("ab")
    superlink = subprocess.Popen(
        [
            executable("flower-superlink"),
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--disable-runtime-dependency-installation",
            "--log-file",
            str(superlink_log),
        ],
        env=env,
        stdout=superlink_output,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=die_with_parent,  # a killed fedtail must not leave the SuperLink running
    )
    try:
        wait_for_superlink(port, superlink, superlink_log)
        log(f"fedtail: simulating {resources.sites} sites, {settings.rounds} rounds on Flower (log: {out_dir / 'flower.log'})")
        federation = [
            f"num-supernodes={resources.sites}",
            f"client-resources-num-cpus={resources.cpus_per_site}",
            f"client-resources-num-gpus={resources.gpus_per_site}",
        ]
        command = [executable("flwr"), "run", str(APP_DIR), CONNECTION, "--stream", "--run-config", str(run_config_file)]
        for item in federation:
            command += ["--federation-config", item]
        _stream_run(command, env, out_dir / "flower.log", resources.timeout_s)
        runs = list_runs(env, CONNECTION)
        if len(runs) != 1:
            raise SimulationFailed(f"expected exactly one run on this simulation's SuperLink, found {len(runs)}")
        status = runs[0]
    finally:
        stop_process_group(superlink)
        superlink_output.close()
    if status.get("status") != "finished:completed":
        raise SimulationFailed(
            f"the run ended as '{status.get('status')}': {status.get('status-details')} (full log: {out_dir / 'flower.log'})"
        )
    summary_path = out_dir / "summary.json"
    if not summary_path.exists():
        raise SimulationFailed(f"the run completed but wrote no {summary_path}")
    return dict(json.loads(summary_path.read_text(encoding="utf-8")))


def _stream_run(command: list[str], env: dict[str, str], log_path: Path, timeout_s: float) -> None:
    """Run `flwr run --stream`, keep its whole output in a log, and show only fedtail's progress lines."""
    tail: deque[str] = deque(maxlen=30)
    errors = 0
    deadline = time.monotonic() + timeout_s
    with log_path.open("a", encoding="utf-8") as log_file:
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert process.stdout is not None
        try:
            for line in process.stdout:
                log_file.write(line)
                tail.append(line)
                if PROGRESS_PREFIX in line:
                    log(line[line.index(PROGRESS_PREFIX) :].rstrip())
                elif "ERROR" in line:
                    errors += 1
                if time.monotonic() > deadline:
                    raise SimulationFailed(f"the run exceeded its time limit of {timeout_s:.0f}s")
            process.wait()
        finally:  # interrupted or timed out: the attached `flwr run` would keep the SuperLink from shutting down
            if process.poll() is None:
                process.kill()
                process.wait()
    if errors:
        log(f"fedtail: Flower logged {errors} error lines (failed or dropped sites); details in {log_path}")
    if process.returncode != 0:
        raise SimulationFailed(f"flwr run exited with code {process.returncode}:\n{''.join(tail)}")
