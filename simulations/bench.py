"""fedtail's benchmarks: DP step speed and memory, federation overhead, privacy-utility frontier, serving latency.

``python -m simulations.bench [NAME ...] [--full] [--out DIR]``, or ``fedtail bench``. Sub-benchmarks (all by default), each printing a table and saving JSON, and an
SVG chart where a picture says more:

- ``dp-step``: one DP-SGD step (batch 64, histories of 50) against the
  non-private step, per grad-sample mode, at catalogues of 3k / 30k / 100k
  items. Modes are interleaved step by step in one process so that machine
  noise hits all of them alike; times are medians, memory is the step's peak
  above what was allocated before it (CUDA allocator, or sampled RSS on CPU).
- ``sites``: a simulated round's wall time on Flower's Simulation Engine
  against the same sites' local training run directly in this process, for
  2 / 10 / 50 (quick) or 2 / 10 / 50 / 100 (``--full``) sites, with the peak
  memory of the whole process tree (Flower, Ray and the site processes).
- ``frontier``: NDCG@10 overall and on tail users against epsilon (1, 2, 4, 8
  and non-private) on the synthetic default, and with ``--full`` on MovieLens
  100K when ``../shared/data/ml-100k`` is present.
- ``pieces``: one DP step on a real site's Poisson batches run whole against
  length-sorted pieces of 32 / 16 / 8 users, on the synthetic default and, when
  present, MovieLens 100K and Amazon Beauty (long-tailed history lengths).
- ``serving``: the HTTP load test of ``simulations.bench_serving``.

``--out`` gets ``<name>.json`` (and ``<name>.svg``) per sub-benchmark and a
``benchmarks.md`` page assembled from all JSON files present there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.app import TRAINING_TIME
from client.dp_sgd import PIECE_USERS, make_private, private_step
from client.round_plan import LocalTraining, PrivacyPlan, RoundPlan
from client.site_round import train_site_round
from client.shard import simulated_shard
from common.datasets import DEFAULT_DATASET, load_dataset
from common.federation import RunSettings
from common.files import write_json
from common.ledger import Ledger
from common.model import ModelOptions, SASRec, sequence_loss
from common.plot import Panel, Series, write_line_charts
from common.privacy import GRAD_SAMPLE_MODES
from common.split import length_sorted_pieces, training_examples
from common.training import pick_device
from server.app import read_rounds
from simulations import bench_serving
from simulations.deployment import LocalDeployment, site_node_config, write_site_files
from simulations.report import markdown_table
from simulations.simulate import Resources, simulate

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
ML_100K = SHARED_DATA / "ml-100k"
AMAZON_BEAUTY = SHARED_DATA / "amazon-beauty" / "Beauty.txt"


# --- memory --------------------------------------------------------------------------------------------------------


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0  # the process ended between listing and reading


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found, frontier = [root], [root]
    while frontier:
        frontier = [child for pid in frontier for child in children.get(pid, [])]
        found.extend(frontier)
    return found


@contextmanager
def peak_rss(tree: bool = False, interval_s: float = 0.002) -> Iterator[list[int]]:
    """Samples resident memory while the block runs; yields a list whose one element becomes the peak in bytes.

    With ``tree``, the sum over this process and all its descendants (RSS counts
    shared library pages once per process, so this overstates a tree's use).
    """
    if not Path("/proc/self/statm").exists():
        raise RuntimeError("memory sampling needs Linux /proc")
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            pids = _descendants(os.getpid()) if tree else [os.getpid()]
            peak[0] = max(peak[0], sum(_rss_bytes(pid) for pid in pids))
            stop.wait(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        stop.set()
        sampler.join()


# --- dp-step -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepResult:
    catalog_size: int
    mode: str
    median_s: float
    step_times_s: list[float]
    peak_step_memory_mb: float
    time_ratio: float
    memory_ratio: float


def _timed(device: torch.device, step: Callable[[], None]) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def _step_memory(device: torch.device, step: Callable[[], None]) -> float:
    """Peak bytes above the memory in use before the step (measured apart from timing: sampling costs CPU)."""
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        return torch.cuda.max_memory_allocated(device) - before
    before = _rss_bytes(os.getpid())
    with peak_rss() as peak:
        step()
    return max(peak[0] - before, 0)


def bench_dp_step(catalogs: list[int], steps: int, device: torch.device, batch: int = 64) -> list[StepResult]:
    """Non-private and every grad-sample mode, interleaved step by step, at each catalogue size."""
    results = []
    options = ModelOptions()
    for size in catalogs:
        rng = np.random.default_rng(size)
        sequences = [rng.integers(1, size + 1, size=options.max_len + 1) for _ in range(batch)]
        examples = training_examples(sequences, options.max_len)
        inputs, targets = examples.inputs.to(device), examples.targets.to(device)
        torch.manual_seed(0)
        steppers: dict[str, Callable[[], None]] = {"non-private": _plain_stepper(options, size, inputs, targets, device)}
        for mode in GRAD_SAMPLE_MODES:
            steppers[mode] = _private_stepper(options, size, examples, mode, inputs, targets, device)
        times: dict[str, list[float]] = {name: [] for name in steppers}
        for index in range(steps + 1):
            for name, step in steppers.items():
                seconds = _timed(device, step)
                if index > 0:  # the first step of each warms caches and the allocator up
                    times[name].append(seconds)
            print(f"  dp-step {size} items: step {index}/{steps} done", flush=True)
        memory = {name: _step_memory(device, step) for name, step in steppers.items()}
        base_time = statistics.median(times["non-private"])
        for name in steppers:
            median = statistics.median(times[name])
            results.append(
                StepResult(
                    size, name, median, [round(t, 4) for t in times[name]], memory[name] / 2**20,
                    median / base_time, memory[name] / memory["non-private"],
                )
            )
        del steppers
    return results


def _plain_stepper(
    options: ModelOptions, size: int, inputs: torch.Tensor, targets: torch.Tensor, device: torch.device
) -> Callable[[], None]:
    model = SASRec(options.for_catalog(size)).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        sequence_loss(model(inputs), targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # so that the next step's "before" holds no gradients

    return step


def _private_stepper(
    options: ModelOptions,
    size: int,
    examples: Any,
    mode: str,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    device: torch.device,
) -> Callable[[], None]:
    model = SASRec(options.for_catalog(size)).to(device).train()
    training = LocalTraining(sample_rate=1.0, batch_size=len(inputs), grad_sample_mode=mode)  # type: ignore[arg-type]
    plan = RoundPlan(sample_rate=1.0, steps=1, noise_multiplier=1.0)
    private = make_private(
        model, examples, training, PrivacyPlan(), plan, torch.Generator().manual_seed(0),
        torch.Generator(device=device).manual_seed(0),
    )

    def step() -> None:
        private_step(private, inputs, targets)
        private.optimizer.zero_grad(set_to_none=True)  # frees per-user gradients (hooks) before the next measurement

    return step


def _print_dp_step(results: list[StepResult]) -> str:
    return markdown_table(
        ["catalogue", "mode", "median step s", "x non-private", "peak step memory MB", "x non-private"],
        [[f"{r.catalog_size:,}", r.mode, f"{r.median_s:.3f}", f"{r.time_ratio:.2f}", f"{r.peak_step_memory_mb:.0f}",
          f"{r.memory_ratio:.2f}"] for r in results],
    )


def _plot_dp_step(path: Path, results: list[StepResult]) -> None:
    modes = [m for m in dict.fromkeys(r.mode for r in results) if m != "non-private"]
    panels = [
        Panel(f"{title} / non-private", "items (thousands)", [
            Series(mode, [r.catalog_size / 1000 for r in results if r.mode == mode],
                   [getattr(r, field) for r in results if r.mode == mode])
            for mode in modes
        ])
        for title, field in (("step time", "time_ratio"), ("peak step memory", "memory_ratio"))
    ]
    write_line_charts(path, panels)


# --- pieces --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PiecesResult:
    dataset: str
    max_len: int
    piece_users: int
    """0: the batch run whole (trimmed to its longest history)."""
    median_s: float
    time_ratio: float
    """Against the whole batch, in the same run."""
    mean_pieces: float


WHOLE_BATCH = 0
PIECE_SIZES = (WHOLE_BATCH, 32, PIECE_USERS, 8)


def bench_pieces(datasets: list[tuple[str, int]], steps: int, device: torch.device) -> list[PiecesResult]:
    """Site 0 of 5 uniform sites: the same Poisson batches stepped whole and in pieces, interleaved batch by batch."""
    results = []
    for dataset, max_len in datasets:
        shard = simulated_shard(dataset, 0, "uniform", 0, 0, 5, max_len)
        options = ModelOptions(max_len=max_len)
        sample_rate = min(1.0, 64 / len(shard.examples))  # batches of about 64 users, as the benchmark always had
        training = LocalTraining(sample_rate=sample_rate, batch_size=64)
        plan = RoundPlan(sample_rate=sample_rate, steps=steps, noise_multiplier=1.0)
        private = make_private(
            SASRec(options.for_catalog(shard.catalog.num_items)), shard.examples, training, PrivacyPlan(), plan,
            torch.Generator().manual_seed(0), torch.Generator(device=device).manual_seed(0),
        )
        batches = [batch for _, batch in zip(range(steps + 1), private.loader)]
        times: dict[int, list[float]] = {size: [] for size in PIECE_SIZES}
        for index, (inputs, targets) in enumerate(batches):
            inputs, targets = inputs.to(device), targets.to(device)
            for size in PIECE_SIZES:
                seconds = _timed(device, lambda: private_step(private, inputs, targets, size or len(inputs) + 1))
                if index > 0:  # the first batch warms caches and the allocator up
                    times[size].append(seconds)
            print(f"  pieces {Path(dataset).name}: batch {index}/{steps} done", flush=True)
        whole = statistics.median(times[WHOLE_BATCH])
        for size in PIECE_SIZES:
            pieces = [len(length_sorted_pieces(i, t, size or len(i) + 1)) for i, t in batches[1:]]
            median = statistics.median(times[size])
            results.append(PiecesResult(Path(dataset).name, max_len, size, median, median / whole,
                                        statistics.mean(pieces)))
    return results


def _print_pieces(results: list[PiecesResult]) -> str:
    return markdown_table(
        ["dataset", "max len", "pieces of", "mean pieces per batch", "median step s", "x whole batch"],
        [[r.dataset, str(r.max_len), str(r.piece_users) if r.piece_users else "whole batch", f"{r.mean_pieces:.1f}",
          f"{r.median_s:.3f}", f"{r.time_ratio:.2f}"] for r in results],
    )


# --- sites ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SitesResult:
    sites: int
    rounds: int
    round_s: float
    """Median wall time of rounds 2.. (round 1 includes starting the site processes)."""
    evaluation_s: float
    """The server's validation pass, part of round_s."""
    site_training_s: float
    """The sites' local training in the same rounds, summed from their own log lines (one site trains at a time)."""
    overhead_s: float
    """round - evaluation - site training: what Flower, Ray and the ClientApp around the training cost."""
    overhead_share: float
    in_process_training_s: float
    """The same sites' local training run one after another in this process, without Flower (a cross-check)."""
    total_s: float
    peak_memory_gb: float


def bench_sites(site_counts: list[int], rounds: int, out: Path) -> list[SitesResult]:
    results = []
    for sites in site_counts:
        settings = RunSettings(rounds=rounds, out_dir=str(out / f"sites-{sites}"), seed=0)
        started = time.perf_counter()
        with peak_rss(tree=True, interval_s=0.5) as peak:
            summary = simulate(settings, Resources(sites))
        total = time.perf_counter() - started
        lines = read_rounds(Path(settings.out_dir))
        training = _site_training_seconds(Path(settings.out_dir) / "flower.log")
        later = lines[1:] or lines
        round_s = statistics.median(line["seconds"] for line in later)
        evaluation_s = statistics.median(line["evaluation_seconds"] for line in later)
        training_s = statistics.median(training.get(line["round"], 0.0) for line in later)
        overhead = statistics.median(
            line["seconds"] - line["evaluation_seconds"] - training.get(line["round"], 0.0) for line in later
        )
        in_process_s = _in_process_training_seconds(settings, sites, rounds=min(3, rounds))
        results.append(
            SitesResult(sites, rounds, round_s, evaluation_s, training_s, overhead, overhead / round_s, in_process_s,
                        total, peak[0] / 2**30)
        )
        print(f"  sites {sites}: round {round_s:.1f}s, site training {training_s:.1f}s, "
              f"test NDCG@10 {summary['overall']['ndcg@10']:.4f}", flush=True)
    return results


def _site_training_seconds(flower_log: Path) -> dict[int, float]:
    """Per round, the sum of the sites' 'local training' log lines (ClientApp output reaches Flower's log)."""
    per_round: dict[int, float] = {}
    for match in TRAINING_TIME.finditer(flower_log.read_text(encoding="utf-8", errors="replace")):
        number = int(match["round"])
        per_round[number] = per_round.get(number, 0.0) + float(match["seconds"])
    return per_round


def _in_process_training_seconds(settings: RunSettings, sites: int, rounds: int) -> float:
    """Training every site once, as the ClientApp does it, without Flower: the median of rounds 2.. like the rounds.

    Round 1 is left out on both sides: it pays one-off costs (noise calibration, first allocations).
    """
    shards = [
        simulated_shard(settings.dataset, settings.kcore, settings.partitioning, settings.seed, site, sites,
                        settings.max_len)
        for site in range(sites)
    ]
    config = settings.model_config(shards[0].catalog.num_items)
    torch.manual_seed(settings.seed)
    initial = SASRec(config).state_dict()
    training = LocalTraining.from_settings(settings)
    privacy = PrivacyPlan.from_settings(settings)
    device = pick_device()
    per_round = []
    with tempfile.TemporaryDirectory() as ledgers:
        for round_number in range(1, rounds + 1):
            started = time.perf_counter()
            for site, shard in enumerate(shards):
                model = SASRec(config)
                model.load_state_dict(initial)
                ledger = Ledger(Path(ledgers) / f"site-{site}.jsonl")
                train_site_round(model, shard.examples, training, privacy, ledger, "bench", round_number,
                                 str(site), device, round_number)
            per_round.append(time.perf_counter() - started)
    return statistics.median(per_round[1:] or per_round)


def _print_sites(results: list[SitesResult]) -> str:
    return markdown_table(
        ["sites", "rounds", "round s (median of rounds 2..)", "server evaluation s", "site training s", "overhead s",
         "overhead share", "in-process training s", "whole run s", "peak memory GB (process tree)"],
        [[str(r.sites), str(r.rounds), f"{r.round_s:.2f}", f"{r.evaluation_s:.2f}", f"{r.site_training_s:.2f}",
          f"{r.overhead_s:.2f}", f"{100 * r.overhead_share:.0f}%", f"{r.in_process_training_s:.2f}",
          f"{r.total_s:.0f}", f"{r.peak_memory_gb:.1f}"] for r in results],
    )


def _plot_sites(path: Path, results: list[SitesResult]) -> None:
    x = [r.sites for r in results]
    write_line_charts(path, [
        Panel("round wall time (s)", "sites", [
            Series("simulated round", x, [r.round_s for r in results]),
            Series("site training", x, [r.site_training_s for r in results]),
            Series("in-process training", x, [r.in_process_training_s for r in results]),
        ]),
        Panel("overhead share of the round", "sites", [Series("overhead", x, [r.overhead_share for r in results])]),
    ])


# --- frontier ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrontierPoint:
    dataset: str
    epsilon: float | None
    """None: non-private."""
    ndcg: float
    tail_ndcg: float
    most_popular_ndcg: float
    seconds: float


def bench_frontier(datasets: list[str], epsilons: list[float | None], rounds: int, sites: int, out: Path
                   ) -> list[FrontierPoint]:
    points = []
    for dataset in datasets:
        for epsilon in epsilons:
            name = f"frontier-{Path(dataset).name}-{'nodp' if epsilon is None else f'eps{epsilon:g}'}"
            settings = RunSettings(
                dataset=dataset, rounds=rounds, out_dir=str(out / name), dp=epsilon is not None,
                epsilon=epsilon or RunSettings.epsilon,
            )
            started = time.perf_counter()
            summary = simulate(settings, Resources(sites))
            points.append(FrontierPoint(
                Path(dataset).name, epsilon, summary["overall"]["ndcg@10"], summary["groups"]["tail"]["ndcg@10"],
                summary["baselines"]["most_popular"]["overall"]["ndcg@10"], time.perf_counter() - started,
            ))
            print(f"  frontier {name}: NDCG@10 {points[-1].ndcg:.4f}", flush=True)
    return points


def _print_frontier(points: list[FrontierPoint]) -> str:
    return markdown_table(
        ["dataset", "epsilon per site", "test NDCG@10", "tail NDCG@10", "most-popular NDCG@10", "run s"],
        [[p.dataset, "non-private" if p.epsilon is None else f"{p.epsilon:g}", f"{p.ndcg:.4f}", f"{p.tail_ndcg:.4f}",
          f"{p.most_popular_ndcg:.4f}", f"{p.seconds:.0f}"] for p in points],
    )


def _plot_frontier(path: Path, points: list[FrontierPoint]) -> None:
    panels = []
    for dataset in dict.fromkeys(p.dataset for p in points):
        private = sorted((p for p in points if p.dataset == dataset and p.epsilon is not None), key=lambda p: p.epsilon)
        ceiling = [p for p in points if p.dataset == dataset and p.epsilon is None]
        x = [p.epsilon for p in private]
        series = [Series("overall", x, [p.ndcg for p in private]), Series("tail", x, [p.tail_ndcg for p in private])]
        if ceiling:
            series.append(Series("non-private", x, [ceiling[0].ndcg] * len(x)))
        panels.append(Panel(f"{dataset}: test NDCG@10", "epsilon", series))
    write_line_charts(path, panels)


# --- deployment ----------------------------------------------------------------------------------------------------


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


DEPLOYMENT_RUN = dict(rounds=3, epsilon=4.0, delta=1e-3, hidden=16, heads=1, blocks=1, max_len=10, batch_size=16)


def bench_deployment(sites: int, out: Path) -> list[EngineRound]:
    """The same small federation on the Simulation Engine and as a real TLS deployment on loopback."""
    spec = "synthetic:users=220,items=80,seed=5"
    names = [f"site{index}" for index in range(sites)]
    simulated = RunSettings(dataset=spec, out_dir=str(out / "engine-simulation"), **DEPLOYMENT_RUN)
    simulate(simulated, Resources(sites))
    simulated_lines = read_rounds(Path(simulated.out_dir))[1:]
    training = _site_training_seconds(Path(simulated.out_dir) / "flower.log")
    results = [EngineRound(
        "simulation", sites, statistics.median(line["seconds"] for line in simulated_lines),
        statistics.median(training[line["round"]] for line in simulated_lines), 0.0,
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
            for match in TRAINING_TIME.finditer((federation.root / f"supernode-{name}.log").read_text(errors="replace")):
                slowest[int(match["round"])] = max(slowest.get(int(match["round"]), 0.0), float(match["seconds"]))
    deployed_lines = read_rounds(run_dir)[1:]
    results.append(EngineRound(
        "deployment (TLS, authenticated)", sites, statistics.median(line["seconds"] for line in deployed_lines),
        statistics.median(slowest[line["round"]] for line in deployed_lines), _clientapp_start_seconds(),
    ))
    return results


def _clientapp_start_seconds(repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import client.app"], check=True, capture_output=True,
                       cwd=Path(__file__).resolve().parent.parent)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _print_deployment(results: list[EngineRound]) -> str:
    return markdown_table(
        ["engine", "sites", "round s (median of rounds 2..)", "site training s", "ClientApp process start s"],
        [[r.engine, str(r.sites), f"{r.round_s:.1f}", f"{r.site_training_s:.1f}", f"{r.clientapp_start_s:.1f}"]
         for r in results],
    )


# --- the suite -----------------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "unknown"
    if Path("/proc/cpuinfo").exists():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(memory_gb, 1), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


BENCHMARKS = ("dp-step", "pieces", "sites", "frontier", "serving", "deployment")


def run(names: list[str], full: bool, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device()
    for name in names:
        started = time.perf_counter()
        print(f"bench {name} ({'full' if full else 'quick'}) ...", flush=True)
        if name == "dp-step":
            results: list[Any] = bench_dp_step([3_000, 30_000, 100_000], steps=10 if full else 5, device=device)
            table = _print_dp_step(results)
            _plot_dp_step(out / "dp-step.svg", results)
        elif name == "pieces":
            present = [(str(path), max_len) for path, max_len in ((ML_100K, 200), (AMAZON_BEAUTY, 50)) if path.exists()]
            results = bench_pieces([(DEFAULT_DATASET, ModelOptions().max_len), *present], 10 if full else 5, device)
            table = _print_pieces(results)
        elif name == "sites":
            results = bench_sites([2, 10, 50, 100] if full else [2, 10, 50], rounds=5 if full else 3, out=out / "runs")
            table = _print_sites(results)
            _plot_sites(out / "sites.svg", results)
        elif name == "frontier":
            datasets = [DEFAULT_DATASET] + ([str(ML_100K)] if full and ML_100K.exists() else [])
            results = bench_frontier(datasets, [1.0, 2.0, 4.0, 8.0, None], rounds=10 if full else 5, sites=5,
                                     out=out / "runs")
            table = _print_frontier(results)
            _plot_frontier(out / "frontier.svg", results)
        elif name == "deployment":
            results = bench_deployment(sites=2, out=out / "runs")
            table = _print_deployment(results)
        else:
            results = [bench_serving.measure(size, 1000 if full else 300, 1, 50, 10, explain)
                       for size in ([3_000, 30_000] if full else [3_000]) for explain in (True, False)]
            table = bench_serving.format_table(results)
        seconds = time.perf_counter() - started
        print(table, flush=True)
        write_json(out / f"{name}.json", {
            "benchmark": name, "mode": "full" if full else "quick", "seconds": seconds, "machine": machine(),
            "device": str(device), "results": [asdict(r) for r in results],
        })
        print(f"bench {name}: {seconds:.0f}s; wrote {out / (name + '.json')}", flush=True)


PAGE_INTRO = """# Benchmarks

Written by `python -m simulations.bench` from its JSON results (sections marked
`--full` come from the long version, kept in a `full/` folder beside the quick
ones). Ratios are measured within one run, never across runs: these machines
are shared and noisy.
"""


DESCRIPTIONS = {
    "dp-step": "One training step, batch 64, histories of 50, the default model (hidden 64, 2 blocks), at three "
    "catalogue sizes. Non-private and each grad-sample mode are interleaved step by step in one process; times are "
    "medians after a warm-up step, memory is one step's peak above what was in use before it.",
    "pieces": "One DP-SGD step (ghost clipping, expected batch 64, the default model) on site 0 of 5 uniform sites, "
    "on the same Poisson batches run whole (trimmed to the batch's longest history) and in length-sorted pieces "
    "(`common.split.length_sorted_pieces`; the clipped sum is the same, tests/client/test_dp.py). Interleaved batch "
    "by batch; medians after a warm-up batch.",
    "sites": "The synthetic default (3,000 users) split over N simulated sites, DP at epsilon 8, one site training "
    "at a time (2 cores per site on a 2-core machine). A round's wall time on Flower's Simulation Engine against the "
    "sites' local training in those rounds, summed from the sites' own log lines; overhead = round - server "
    "evaluation - site training. In-process training: the same training run one after another in one process "
    "without Flower, a cross-check taken at another moment. Peak memory: resident memory of the whole process tree "
    "(Flower, Ray, site processes), sampled every 0.5 s; shared pages count once per process, so it overstates.",
    "frontier": "Five sites, uniform split, test NDCG@10 of the final global model against each site's epsilon.",
    "serving": "`fedtail serve` pinned to one core, k = 10, histories of 50, one client on loopback.",
    "deployment": "The same small federation (2 sites of 110 users, small model, DP at epsilon 4) on Flower's "
    "Simulation Engine and as a real deployment on loopback: a TLS SuperLink with SuperNode authentication and one "
    "SuperNode process per site (simulations.deployment). Flower 1.41 starts a fresh flwr-clientapp process for "
    "every message in both isolation modes (flwr/supernode/runtime/run_clientapp.py pulls one task, then exits), "
    "so each deployed round pays a Python start with torch, opacus, flwr and pandas imports per site, and the "
    "site's per-process caches (noise calibration, RDP epsilons) start cold.",
}


def write_page(out: Path, page: Path | None = None) -> Path:
    """A Markdown page (default ``out/benchmarks.md``) from every sub-benchmark's JSON in ``out``.

    Built from all JSON files present, so rerunning one sub-benchmark keeps the other sections.
    """
    page = page or out / "benchmarks.md"
    formatters: dict[str, tuple[Callable[[list[Any]], str], type]] = {
        "dp-step": (_print_dp_step, StepResult),
        "pieces": (_print_pieces, PiecesResult),
        "sites": (_print_sites, SitesResult),
        "frontier": (_print_frontier, FrontierPoint),
        "serving": (bench_serving.format_table, bench_serving.LoadResult),
        "deployment": (_print_deployment, EngineRound),
    }
    sections = [PAGE_INTRO]
    for folder in (out, out / "full"):  # "full": long runs kept beside the quick suite's results
        for name in BENCHMARKS:
            path = folder / f"{name}.json"
            if not path.exists():
                continue
            record = json.loads(path.read_text(encoding="utf-8"))
            formatter, kind = formatters[name]
            machine_line = ", ".join(f"{key} {value}" for key, value in record["machine"].items() if value is not None)
            full = " --full" if record["mode"] == "full" else ""
            chart = Path(os.path.relpath(folder, page.parent)) / f"{name}.svg"
            sections.append(
                f"## {name}{full}\n\n{DESCRIPTIONS[name]}\n\n"
                f"`python -m simulations.bench {name}{full}` ({record['seconds']:.0f} s, device {record['device']})\n\n"
                f"Machine: {machine_line}\n\n{formatter([kind(**r) for r in record['results']])}\n"
                + (f"\n![{name}]({chart})\n" if (folder / f"{name}.svg").exists() else "")
            )
    page.write_text("\n".join(sections), encoding="utf-8")
    return page


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedtail bench", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"sub-benchmarks to run (default: all of {', '.join(BENCHMARKS)})")
    parser.add_argument("--full", action="store_true", help="the long version (more steps, sites, rounds, data)")
    parser.add_argument("--out", default="runs/bench", help="folder for the JSON results and charts")
    parser.add_argument("--page", default=None, help="where the Markdown page goes (default: OUT/benchmarks.md)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    out = Path(args.out)
    run(list(dict.fromkeys(args.names or BENCHMARKS)), args.full, out)
    print(f"wrote {write_page(out, Path(args.page) if args.page else None)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
