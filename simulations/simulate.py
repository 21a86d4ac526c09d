"""Run a federation on Flower's Simulation Engine, the way `flwr run` does, and check that it really finished.

Each simulation gets its own SuperLink (simulation mode, loopback, a free port,
Flower home inside the run folder) instead of Flower's shared managed one: the
shared one outlives `flwr run`, keeps the environment of its first start and
would mix runs. Runtime dependency installation is disabled (this process's
environment already has everything). `flwr run` exits 0 even when the
ServerApp fails, so the run's final status is read back from the SuperLink.

Everything that can be refused is refused before Flower starts (its start-up
takes about 25 s): the sites, a second launch into a folder in use, and a
resume that changes the settings, the sites or the partition (``pin_run``).
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from client.policy import SIMULATED_SITES_ENV, ranges_admitting
from client.shard import simulated_partition_sha256, simulated_shard
from common.data.catalog import Catalog
from common.data.datasets import load_dataset
from common.errors import ConfigError
from common.federation import RunSettings
from common.privacy.accounting import check_delta
from common.recommender.artifacts import CATALOG_FILE
from common.run_files import LEDGER_DIR, RunRecord, check_same_settings, read_run_record, write_run_record
from common.utils.files import write_json
from common.utils.processes import (
    APP_DIR,
    LAUNCHER_LOCK,
    die_with_parent,
    executable,
    free_loopback_port,
    lock_run_folder,
)
from common.utils.progress import log
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
RUN_CATALOG_FILE = "run-catalog.json"
"""A continued run's catalogue (the released one extended by the data's new items), given to server and sites."""
PROGRESS_PREFIX = "fedtail:"


class SimulationFailed(FlowerFailed):
    """The run did not finish as completed; the message carries Flower's status and the log's tail."""


@dataclass(frozen=True)
class Resources:
    sites: int
    cpus_per_site: int = 2
    gpus_per_site: float = 0.0
    timeout_s: float = 6 * 3600.0

    def __post_init__(self) -> None:
        if self.cpus_per_site < 1:
            raise ConfigError(f"--cpus-per-site {self.cpus_per_site}: must be at least 1")
        if not 0 <= self.gpus_per_site < math.inf:
            raise ConfigError(f"--gpus-per-site {self.gpus_per_site}: must be a finite number, 0 or more")
        if not 0 < self.timeout_s < math.inf:
            raise ConfigError(f"simulation timeout {self.timeout_s}: must be a positive number of seconds")


def preflight(settings: RunSettings, sites: int) -> list[int]:
    """Check every simulated site before Flower starts; returns the users with training pairs per site."""
    if sites < 1:
        raise ConfigError("--sites must be at least 1")
    if settings.min_sites > sites:
        raise ConfigError(f"--min-sites {settings.min_sites} is more than --sites {sites}")
    sizes = []
    for site in range(sites):
        shard = simulated_shard(
            settings.dataset, settings.kcore, settings.partitioning, settings.seed, site, sites, settings.max_len,
            settings.catalog_path,
        )
        if len(shard.examples) == 0:
            raise ConfigError(f"site {site} has no user with two or more training interactions; use fewer sites")
        if settings.dp:
            check_delta(len(shard.examples), settings.delta)
        sizes.append(len(shard.examples))
    return sizes


def write_site_node_configs(
    flower_home: Path, settings: RunSettings, resources: Resources, site_config: Mapping[str, Any] | None = None
) -> Path:
    """The node config each simulated site's operator would have set: the budget and delta the run targets,
    non-private training only when the run is the non-private baseline, trust in the coordinator's noise only when
    the run asks for central noise (the simulation's operator runs the coordinator too), run-config ranges that
    admit the run's own values (said in the log: a deployed site's defaults would decline them), ledgers in the run
    folder, the run's catalogue when it names one; ``site_config`` overrides (a lifelong run: shared ledgers,
    lifetime budgets)."""
    distributed_trust = (  # the fewest sites whose noise shares every secure sum holds (client.secure_aggregation);
        # no cap on the fallback epsilon: the simulation's operator runs the coordinator and its SecAgg+ too
        {"secure-aggregation-sites": settings.min_sites - settings.secure_aggregation_tolerated,
         "max-fallback-epsilon": math.inf}
        if settings.noise == "distributed"
        else {}
    )
    widened = ranges_admitting(settings)
    if widened:
        log(f"fedtail: the simulated sites widen their run-config ranges to {widened}; a deployed site with the "
            "default ranges would decline this run (node config min-KEY / max-KEY, docs/privacy.md)")
    sites = {
        str(site): {
            "max-epsilon": settings.epsilon,
            "delta": settings.delta,
            "allow-non-private": not settings.dp,
            "trust-coordinator-noise": settings.noise == "central",
            "trust-secure-aggregation": settings.noise == "distributed",
            **distributed_trust,
            **widened,
            "ledger-dir": str(Path(settings.out_dir) / LEDGER_DIR),
            **({"catalog-path": settings.catalog_path} if settings.catalog_path else {}),
            **(site_config or {}),
        }
        for site in range(resources.sites)
    }
    path = flower_home / "simulated-sites.json"
    write_json(path, sites)
    return path


def pin_run(out_dir: Path, settings: RunSettings, sites: int) -> None:
    """Check the sites, and refuse to resume the run in ``out_dir`` with anything changed; record a new run.

    Runs before Flower starts. What decides who is at which site (the data, kcore, partitioning, seed, the number
    of sites) must not change within a run: a user moved to another site would carry the spend of two sites while
    each site's ledger shows only its own. Every other setting must not change either (noise was calibrated on
    them). The ServerApp's checkpoint check stays behind this one for runs started with `flwr run`.
    """
    saved = read_run_record(out_dir)
    now = RunRecord.new(settings.to_run_config(), sites)
    if saved is not None:
        if saved.settings is None:
            raise ConfigError(
                f"{out_dir} holds a run that did not record its settings and sites (started with `flwr run` or an "
                "older fedtail), so a resume cannot be checked; resume it the way it was started or use another --out"
            )
        check_same_settings(out_dir, saved.pinned(), now.pinned())
    sizes = preflight(settings, sites)
    log(f"fedtail: site sizes (users with training pairs): min {min(sizes)}, max {max(sizes)}")
    partition = simulated_partition_sha256(
        settings.dataset, settings.kcore, settings.partitioning, settings.seed, sites, settings.catalog_path
    )
    if saved is None:
        write_run_record(out_dir, replace(now, partition_sha256=partition))
    elif saved.partition_sha256 != partition:
        raise ConfigError(
            f"{out_dir} holds a run whose sites held other users (partition sha256 {str(saved.partition_sha256)[:12]} "
            f"saved vs {partition[:12]} now, with the same settings): the data behind '{settings.dataset}' (or the "
            "partitioning code) changed; restore it or use another --out"
        )


def simulate(
    settings: RunSettings, resources: Resources, site_config: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Run the ServerApp and ClientApps in this repository through Flower; returns the run's summary.

    A run folder that holds a run is resumed, with the same settings and sites only (``pin_run``), and by one
    `fedtail simulate` at a time: a second one is refused before it writes anything there. ``site_config``:
    node config every simulated site gets on top of the usual (``write_site_node_configs``).
    """
    out_dir = Path(settings.out_dir).resolve()
    settings = replace(settings, out_dir=str(out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    with lock_run_folder(out_dir, LAUNCHER_LOCK):
        settings = continued_catalog(settings, out_dir)
        pin_run(out_dir, settings, resources.sites)
        return _run_on_flower(settings, resources, out_dir, site_config)


def continued_catalog(settings: RunSettings, out_dir: Path) -> RunSettings:
    """A run continuing a released model on a dataset, without a catalogue of its own: the released catalogue
    extended by the dataset's new items (old indices kept), written to the run folder as the run's catalogue.

    The data's own catalogue (``Dataset.catalog``) would renumber items, which a continued model cannot follow.
    """
    if not settings.init_model or settings.catalog_path:
        return settings
    released = Catalog.load(Path(settings.init_model) / CATALOG_FILE)
    dataset = load_dataset(settings.dataset, kcore=settings.kcore)
    path = out_dir / RUN_CATALOG_FILE
    released.extend(dataset.catalog().items).save(path)
    return replace(settings, catalog_path=str(path))


def _run_on_flower(
    settings: RunSettings, resources: Resources, out_dir: Path, site_config: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    flower_home = out_dir / "flower"
    flower_home.mkdir(parents=True, exist_ok=True)
    port = free_loopback_port()
    write_connection(flower_home, CONNECTION, port, root_certificates=None)
    run_config_file = write_run_config(flower_home / "run-config.toml", settings.to_run_config())
    node_configs = write_site_node_configs(flower_home, settings, resources, site_config)
    env = {**flower_env(flower_home), SIMULATED_SITES_ENV: str(node_configs)}
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
        log(
            f"fedtail: simulating {resources.sites} sites, {settings.rounds} rounds on Flower "
            f"(log: {out_dir / 'flower.log'})"
        )
        federation = [
            f"num-supernodes={resources.sites}",
            f"client-resources-num-cpus={resources.cpus_per_site}",
            f"client-resources-num-gpus={resources.gpus_per_site}",
        ]
        command = [
            executable("flwr"), "run", str(APP_DIR), CONNECTION, "--stream", "--run-config", str(run_config_file)
        ]
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
            f"the run ended as '{status.get('status')}': {status.get('status-details')} "
            f"(full log: {out_dir / 'flower.log'})"
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
