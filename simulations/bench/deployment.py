"""``deployment``: the same small federation on the Simulation Engine and as a real TLS deployment on loopback."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.app import TRAINING_TIME
from common.data.datasets import load_dataset
from common.federation import RunSettings
from common.run_files import read_rounds
from simulations.bench.core import REPO_ROOT, Benchmark, Context, site_training_seconds
from simulations.deployment import LocalDeployment, site_node_config, write_site_files
from simulations.report import markdown_table
from simulations.simulate import Resources, simulate


@dataclass(frozen=True)
class EngineRound:
    engine: str
    sites: int
    round_s: float
    """Median wall time of rounds 2.."""
    site_training_s: float
    """Per round, the sites' local training: summed in simulation (one site at a time), the slowest site in a
    deployment (sites train in parallel, each in its own process)."""
    clientapp_start_s: float
    """A fresh Python process importing the ClientApp (torch, opacus, flwr, pandas): what every deployed
    message pays before training; 0 in simulation, whose site processes stay warm."""


DEPLOYMENT_RUN: dict[str, Any] = dict(
    rounds=3, epsilon=4.0, delta=1e-3, hidden=16, heads=1, blocks=1, max_len=10, batch_size=16
)


def bench_deployment(sites: int, out: Path) -> list[EngineRound]:
    """The same small federation on the Simulation Engine and as a real TLS deployment on loopback."""
    spec = "synthetic:users=220,items=80,seed=5"
    names = [f"site{index}" for index in range(sites)]
    simulated = RunSettings(dataset=spec, out_dir=str(out / "engine-simulation"), **DEPLOYMENT_RUN)
    simulate(simulated, Resources(sites))
    simulated_lines = read_rounds(Path(simulated.out_dir))[1:]
    training = site_training_seconds(Path(simulated.out_dir) / "flower.log")
    results = [EngineRound(
        "simulation", sites, statistics.median(line.seconds for line in simulated_lines),
        statistics.median(training[line.round] for line in simulated_lines), 0.0,
    )]
    root = out / "engine-deployment"
    data = write_site_files(load_dataset(spec).frame, names, root / "data")
    with LocalDeployment(root / "federation") as federation:
        federation.start_superlink()
        for name in names:
            private, public = federation.site_keys(name)
            federation.register(public)
            federation.start_supernode(name, site_node_config(name, data, federation.root), private)
        deadline = time.monotonic() + 120
        while federation.connected_nodes() < sites and time.monotonic() < deadline:
            time.sleep(1)
        run_dir = root / "run"
        config = RunSettings(dataset="", catalog_path=str(data["catalog"]), out_dir=str(run_dir), min_sites=sites,
                             **DEPLOYMENT_RUN)
        status = federation.wait(federation.submit(config.to_run_config()), timeout_s=900)
        if status["status"] != "finished:completed":
            raise RuntimeError(f"the deployed run ended as {status}")
        slowest: dict[int, float] = {}
        for name in names:
            log = (federation.root / f"supernode-{name}.log").read_text(errors="replace")
            for match in TRAINING_TIME.finditer(log):
                slowest[int(match["round"])] = max(slowest.get(int(match["round"]), 0.0), float(match["seconds"]))
    deployed_lines = read_rounds(run_dir)[1:]
    results.append(EngineRound(
        "deployment (TLS, authenticated)", sites, statistics.median(line.seconds for line in deployed_lines),
        statistics.median(slowest[line.round] for line in deployed_lines), _clientapp_start_seconds(),
    ))
    return results


def _clientapp_start_seconds(repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import client.app"], check=True, capture_output=True, cwd=REPO_ROOT)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def run(context: Context) -> list[EngineRound]:
    return bench_deployment(sites=2, out=context.out / "runs")


def format_table(results: list[EngineRound]) -> str:
    return markdown_table(
        ["engine", "sites", "round s (median of rounds 2..)", "site training s", "ClientApp process start s"],
        [[r.engine, str(r.sites), f"{r.round_s:.1f}", f"{r.site_training_s:.1f}", f"{r.clientapp_start_s:.1f}"]
         for r in results],
    )


BENCHMARK = Benchmark(
    name="deployment",
    help="a round on the Simulation Engine against the same round deployed (TLS SuperLink, 2 SuperNodes, loopback)",
    description="The same small federation (2 sites of 110 users, small model, DP at epsilon 4) on Flower's "
    "Simulation Engine and as a real deployment on loopback: a TLS SuperLink with SuperNode authentication and one "
    "SuperNode process per site (simulations.deployment). Flower 1.41 starts a fresh flwr-clientapp process for "
    "every message in both isolation modes (flwr/supernode/runtime/run_clientapp.py pulls one task, then exits), "
    "so each deployed round pays a Python start with torch, opacus, flwr and pandas imports per site, and the "
    "site's per-process caches (noise calibration, RDP epsilons) start cold.",
    result=EngineRound,
    run=run,
    format_table=format_table,
)
