"""``sites``: a simulated round's wall time on Flower's Simulation Engine against the same sites' local training.

For 2 / 10 / 50 (quick) or 2 / 10 / 50 / 100 (``--full``) sites: the round's
wall time, the sites' training in it (from their own log lines), the same
training run directly in this process, and the peak memory of the whole process
tree (Flower, Ray and the site processes).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from client.shard import simulated_shard
from client.site_round import train_site_round
from common.federation import RunSettings
from common.privacy.ledger import Ledger
from common.protocol.round_plan import LocalTraining, PrivacyPlan
from common.recommender.model import SASRec
from common.recommender.training import pick_device
from common.run_files import read_rounds
from common.utils.plot import Panel, Series, write_line_charts
from simulations.bench.core import Benchmark, Context, peak_rss, site_training_seconds
from simulations.report import markdown_table
from simulations.simulate import Resources, simulate


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
        training = site_training_seconds(Path(settings.out_dir) / "flower.log")
        later = lines[1:] or lines
        round_s = statistics.median(line.seconds for line in later)
        evaluation_s = statistics.median(line.evaluation_seconds for line in later)
        training_s = statistics.median(training.get(line.round, 0.0) for line in later)
        overhead = statistics.median(
            line.seconds - line.evaluation_seconds - training.get(line.round, 0.0) for line in later
        )
        in_process_s = _in_process_training_seconds(settings, sites, rounds=min(3, rounds))
        results.append(
            SitesResult(sites, rounds, round_s, evaluation_s, training_s, overhead, overhead / round_s, in_process_s,
                        total, peak[0] / 2**30)
        )
        print(f"  sites {sites}: round {round_s:.1f}s, site training {training_s:.1f}s, "
              f"test NDCG@10 {summary['overall']['ndcg@10']:.4f}", flush=True)
    return results


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


def run(context: Context) -> list[SitesResult]:
    return bench_sites([2, 10, 50, 100] if context.full else [2, 10, 50], rounds=5 if context.full else 3,
                       out=context.out / "runs")


def format_table(results: list[SitesResult]) -> str:
    return markdown_table(
        ["sites", "rounds", "round s (median of rounds 2..)", "server evaluation s", "site training s", "overhead s",
         "overhead share", "in-process training s", "whole run s", "peak memory GB (process tree)"],
        [[str(r.sites), str(r.rounds), f"{r.round_s:.2f}", f"{r.evaluation_s:.2f}", f"{r.site_training_s:.2f}",
          f"{r.overhead_s:.2f}", f"{100 * r.overhead_share:.0f}%", f"{r.in_process_training_s:.2f}",
          f"{r.total_s:.0f}", f"{r.peak_memory_gb:.1f}"] for r in results],
    )


def plot(path: Path, results: list[SitesResult]) -> None:
    x = [r.sites for r in results]
    write_line_charts(path, [
        Panel("round wall time (s)", "sites", [
            Series("simulated round", x, [r.round_s for r in results]),
            Series("site training", x, [r.site_training_s for r in results]),
            Series("in-process training", x, [r.in_process_training_s for r in results]),
        ]),
        Panel("overhead share of the round", "sites", [Series("overhead", x, [r.overhead_share for r in results])]),
    ])


BENCHMARK = Benchmark(
    name="sites",
    help="a simulated round's wall time against the sites' own training, at 2 / 10 / 50 sites (--full: 100 too)",
    description="The synthetic default (3,000 users) split over N simulated sites, DP at epsilon 8, one site "
    "training at a time (2 cores per site on a 2-core machine). A round's wall time on Flower's Simulation Engine "
    "against the sites' local training in those rounds, summed from the sites' own log lines; overhead = round - "
    "server evaluation - site training. In-process training: the same training run one after another in one "
    "process without Flower, a cross-check taken at another moment. Peak memory: resident memory of the whole "
    "process tree (Flower, Ray, site processes), sampled every 0.5 s; shared pages count once per process, so it "
    "overstates.",
    result=SitesResult,
    run=run,
    format_table=format_table,
    plot=plot,
)
