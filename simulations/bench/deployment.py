"""``deployment``: the same small federation on the Simulation Engine and as a real TLS deployment on loopback, with
where each second of a deployed round goes."""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.data.datasets import load_dataset
from common.federation import RunSettings
from common.flower.polling_grid import REPLY_POLL_ENV
from common.flower.supernode import IDLE_POLL_SECONDS
from common.privacy.accounting import CACHE_DIR_ENV
from common.run_files import SUMMARY_FILE, read_rounds
from common.utils import timeline
from simulations.bench.core import Benchmark, Context, site_training_seconds
from simulations.deployment import LocalDeployment, site_node_config, write_site_files
from simulations.report import markdown_table
from simulations.simulate import Resources, simulate

STAGES = ("pull", "start", "data", "calibration", "training", "site_other", "reply", "aggregation")
"""A deployed round from the coordinator's send to its next send, along the site that replied last:
pull: the SuperNode takes the message from the SuperLink and the site's runtime takes the task from the SuperNode;
start: the ClientApp starts (a fresh flwr-clientapp: Python, imports, app bundle install) and pulls the task's input;
data: the site's shard; calibration: the noise multiplier; training: DP-SGD (without calibration);
site_other: the rest of the ClientApp (config, budget check against the ledger, model, ledger line);
reply: from the end of training until the coordinator holds the reply (runtime, SuperNode, SuperLink, ServerApp);
aggregation: from the last reply to the next round's send (aggregation, checkpoint, round record)."""


@dataclass(frozen=True)
class EngineRound:
    engine: str
    sites: int
    round_s: float
    """Median wall time of rounds 2..; deployed: from one round's send to the next's."""
    ratio: float
    """round_s over the simulated round_s of the same run."""
    site_training_s: float
    """Per round, the sites' local training as their log line says (calibration included): summed in simulation
    (one site at a time), the slowest site in a deployment (sites train in parallel, each in its own process)."""
    stages: dict[str, float]
    """Deployed: median seconds of each of ``STAGES``; simulation: none."""


DEPLOYMENT_RUN: dict[str, Any] = dict(
    rounds=5, epsilon=4.0, delta=1e-3, hidden=16, heads=1, blocks=1, max_len=10, batch_size=16
)
SPEC = "synthetic:users=220,items=80,seed=5"
DEPLOYED: tuple[tuple[str, str, bool, float | None, Callable[[Path], dict[str, str]]], ...] = (
    ("deployment before (flower-supernode, flwr-clientapp per message, 3 s polls, no calibration cache)",
     "engine-deployment-before", True, None,
     lambda out: {REPLY_POLL_ENV: "3", CACHE_DIR_ENV: str(out / "no-cache" / "calibration")}),
    (f"deployment (warm site runtime, SuperNode polls every {IDLE_POLL_SECONDS} s)", "engine-deployment", False,
     IDLE_POLL_SECONDS, lambda out: {CACHE_DIR_ENV: str(out / "site-cache")}),
)
"""How each deployed run is set up: Flower's own way as before this benchmark's issue (flower-supernode, a
flwr-clientapp per message, the Grid's 3 s wait for replies, a calibration per process: its cache folder lies under
a file, so nothing is kept), and fedtail's (client.supernode polling every 0.2 s, the site's warm runtime, replies
pulled every 0.05 s, message parts asked for again after 0.05 s, calibration kept on the site's disk)."""


def threads_per_process(sites: int) -> dict[str, str]:
    """Deployed sites train at the same time, each in its own process: each gets its share of this machine's cores,
    as a real site has its own machine (the simulation trains one site at a time on all of them). Without it, two
    sites' torch threads spinning on 2 cores made deployed training 3-9 times slower than simulated."""
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // sites))}


def bench_deployment(sites: int, out: Path) -> list[EngineRound]:
    """The same small federation on the Simulation Engine and as real TLS deployments on loopback: the sites'
    runtimes warm (the default), and starting a fresh flwr-clientapp per message (Flower's own way)."""
    names = [f"site{index}" for index in range(sites)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "no-cache").write_text("a file: no cache folder can be made under it\n")
    simulated = RunSettings(dataset=SPEC, out_dir=str(out / "engine-simulation"), **DEPLOYMENT_RUN)
    simulate(simulated, Resources(sites))
    simulated_lines = read_rounds(Path(simulated.out_dir))[1:]
    training = site_training_seconds(Path(simulated.out_dir) / "flower.log")
    simulated_round = statistics.median(line.seconds for line in simulated_lines)
    results = [EngineRound(
        "simulation", sites, simulated_round, 1.0, statistics.median(training[line.round] for line in simulated_lines),
        {},
    )]
    data = write_site_files(load_dataset(SPEC).frame, names, out / "site-data")
    for engine, folder, fresh_process, idle_poll_s, environment in DEPLOYED:
        rounds = _deployed_rounds(
            names, data, out / folder, fresh_process, idle_poll_s, {**threads_per_process(sites), **environment(out)}
        )
        round_s = statistics.median(row["round"] for row in rounds)
        results.append(EngineRound(
            engine, sites, round_s, round_s / simulated_round, statistics.median(row["trained"] for row in rounds),
            {stage: statistics.median(row[stage] for row in rounds) for stage in STAGES},
        ))
    return results


def _deployed_rounds(
    names: Sequence[str], data: dict[str, Path], root: Path, fresh_process: bool, idle_poll_s: float | None,
    environment: dict[str, str],
) -> list[dict]:
    with LocalDeployment(root / "federation", environment=environment) as federation:
        federation.start_superlink()
        for name in names:
            private, public = federation.site_keys(name)
            federation.register(public)
            node_config = site_node_config(name, data, federation.root, delta=DEPLOYMENT_RUN["delta"])
            federation.start_supernode(name, node_config, private, fresh_process=fresh_process, idle_poll_s=idle_poll_s)
        deadline = time.monotonic() + 120
        while federation.connected_nodes() < len(names) and time.monotonic() < deadline:
            time.sleep(1)
        config = RunSettings(dataset="", catalog_path=str(data["catalog"]), out_dir=str(root / "run"),
                             min_sites=len(names), **DEPLOYMENT_RUN)
        run_id = federation.submit(config.to_run_config())
        status = federation.wait(run_id, timeout_s=900, finished_file=Path(config.out_dir) / SUMMARY_FILE)
        if status["status"] != "finished:completed":
            raise RuntimeError(f"the deployed run ended as {status}")
        coordinator = timeline.parse(federation.run_log(run_id))
        site_logs = [timeline.read(federation.root / f"supernode-{name}.log") for name in names]
    rows = round_timelines(coordinator, site_logs)
    if not rows:
        raise RuntimeError(f"no round timeline in the logs of {federation.root}")
    return rows


def round_timelines(coordinator: list[dict[str, Any]], sites: list[list[dict[str, Any]]]) -> list[dict[str, float]]:
    """Each round but the first (cold caches, as in the simulated median) and the last (no next send), in ``STAGES``
    along the site whose reply reached the coordinator last; ``round``: send to next send, ``trained``: the slowest
    site's training line."""
    sends = {int(event["round"]): event["t"] for event in coordinator if event["event"] == "coordinator-send"}
    last_reply: dict[int, float] = {}
    for event in coordinator:
        if event["event"] == "coordinator-reply":
            last_reply[int(event["round"])] = max(last_reply.get(int(event["round"]), 0.0), event["t"])
    per_site = [_site_rounds(events) for events in sites]
    rows = []
    for number in sorted(sends)[1:]:
        if number + 1 not in sends or number not in last_reply:
            continue
        trained = [site[number] for site in per_site if number in site]
        if not trained:
            continue
        last = max(trained, key=lambda site: site["end"])
        rows.append({
            "round": sends[number + 1] - sends[number],
            "trained": max(site["training"] for site in trained),
            "pull": last["acquired"] - sends[number],
            "start": last["entered"] - last["acquired"],
            "data": last["data"],
            "calibration": last["calibration"],
            "training": last["training"] - last["calibration"],
            "site_other": last["end"] - last["entered"] - last["data"] - last["training"],
            "reply": last_reply[number] - last["end"],
            "aggregation": sends[number + 1] - last_reply[number],
        })
    return rows


def _site_rounds(events: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """A site's rounds from its log: each training line with the task acquisition before it (tasks run in order)."""
    rounds: dict[int, dict[str, float]] = {}
    acquired = math.nan
    for event in events:
        if event["event"] == "site-task-acquired":
            acquired = event["t"]
        elif event["event"] == "site-trained":
            rounds[int(event["round"])] = {
                "acquired": acquired, "entered": event["entered"], "end": event["t"], "data": event.get("data", 0.0),
                "calibration": event.get("calibration", 0.0), "training": event["training"],
            }
    return rounds


def run(context: Context) -> list[EngineRound]:
    return bench_deployment(sites=2, out=context.out / "runs")


STAGE_HEADERS = {
    "pull": "send to task taken", "start": "ClientApp start", "data": "data", "calibration": "calibration",
    "training": "training", "site_other": "other site work", "reply": "reply to coordinator",
    "aggregation": "aggregation to next send",
}


def format_table(results: list[EngineRound]) -> str:
    return markdown_table(
        ["engine", "sites", "round s (median of rounds 2..)", "deployed / simulated", "site training s",
         *(f"{STAGE_HEADERS[stage]} s" for stage in STAGES)],
        [[r.engine, str(r.sites), f"{r.round_s:.2f}", f"{r.ratio:.1f}x", f"{r.site_training_s:.2f}",
          *(f"{r.stages[stage]:.2f}" if stage in r.stages else "" for stage in STAGES)]
         for r in results],
    )


BENCHMARK = Benchmark(
    name="deployment",
    help="a round on the Simulation Engine against the same round deployed (TLS SuperLink, 2 SuperNodes, loopback)",
    description="The same small federation (2 sites of 110 users, small model, DP at epsilon 4, 5 rounds) on "
    "Flower's Simulation Engine and as a real deployment on loopback: a TLS SuperLink with SuperNode authentication "
    "and one SuperNode process per site (simulations.deployment), whose runtime (client.runtime) either runs the "
    "installed release warm in its own process (the default) or starts Flower's flwr-clientapp for every message "
    "(--fresh-process). A deployed round is timed from the coordinator's send to its next send and "
    "split along the site that replied last, from wall-clock lines the ServerApp, the runtime and the ClientApp "
    "print (common.utils.timeline): send to task taken (the SuperNode asks the SuperLink for work every 0.2 s, "
    "Flower's flower-supernode every 3 s; the runtime asks its SuperNode every 0.05 s), ClientApp start (process, "
    "imports, the task's input: the global weights, which the SuperNode may still be fetching), data, noise "
    "calibration, DP training, other site work, reply (runtime to SuperNode, to SuperLink, to ServerApp, which asks "
    "every 0.05 s), aggregation to the next send. Medians over rounds 2 to 4. Sites train at the same time, each "
    "process with its share of the cores (OMP_NUM_THREADS); the simulation trains them one after another on all "
    "cores. The before row runs the sites Flower's own way, as fedtail ran before its deployment speed-ups "
    "(flower-supernode with its 3 s poll and 1 s retries for message parts, a flwr-clientapp per message, a "
    "calibration per process, the "
    "Grid's 3 s reply poll); what lives in the ServerApp and in the app on both sides stays as now (content packed, "
    "quick retries at the ServerApp). Before those speed-ups a round measured 16.3 s against 0.7 s simulated (23x) on "
    "this page; docs/deploy.md (Speed) says what changed and what is left.",
    result=EngineRound,
    run=run,
    format_table=format_table,
)
