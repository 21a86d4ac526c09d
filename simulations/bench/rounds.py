"""``rounds``: what one ``noise = central`` round costs beyond its DP step, at few large rounds and many small ones.

Under ``noise = central`` a Flower round is one DP-SGD step over the federation, so a recipe with ten times the
rounds at a tenth of the sample rate does the same user-gradient work; whatever a round costs besides that work
(Flower's messages and model (de)serialisation, the sites' checks, accounting and ledger lines, the server's round
records and checkpoint) is paid ten times as often. Both runs go through ``fedtail simulate``'s own code path on the
Simulation Engine, in one bench run, and each round is split by the wall-clock lines the coordinator and the sites
print (``common.utils.timeline``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.federation import RunSettings
from common.utils import timeline
from simulations.bench.core import Benchmark, Context
from simulations.report import markdown_table
from simulations.simulate import Resources, simulate

USERS, SITES = 1000, 5
DATASET = f"synthetic:users={USERS},items=300,seed=11"
VALIDATIONS = 4
"""Validation passes per run (evaluate-every = rounds / 4): both runs validate as often, whatever their rounds."""
PARTS = ("clipped_sum", "noise_step", "validation", "site_other", "records", "flower")
"""A round from the coordinator's send to its next send:
clipped_sum: the sites' sums of clipped per-user gradients (summed over the sites: the engine runs one at a time);
noise_step: the coordinator's noise and optimizer step; validation: the coordinator's validation pass, when due;
site_other: the rest of each site's ClientApp (checks, model, accounting, ledger line, reply), summed over the sites;
records: the coordinator's round line and checkpoint;
flower: what is left: Flower's messages, (de)serialising the model and the sums, the engine's actor."""
OVERHEAD_PARTS = ("site_other", "records", "flower")


@dataclass(frozen=True)
class RoundsResult:
    rounds: int
    sample_rate: float
    round_s: float
    """Mean wall time of rounds 2 to R-1, from one round's send to the next's."""
    parts: dict[str, float]
    """Mean seconds per round of each of ``PARTS``, over the same rounds."""
    overhead_s: float
    """Per round, everything but the DP step's work and validation: site_other + records + flower."""
    rounds_s: float
    """All rounds: from round 1's send to the end of the last round's records."""
    total_s: float
    """The whole ``fedtail simulate`` (Flower's start, the test pass and final files included)."""


def bench_rounds(rounds: int, sample_rate: float, factor: int, out: Path) -> list[RoundsResult]:
    """R rounds at rate q, then factor x R rounds at q / factor: the same expected user-gradient work."""
    return [
        _one_run(rounds * scale, sample_rate / scale, out / f"rounds-{rounds * scale}")
        for scale in (1, factor)
    ]


def _one_run(rounds: int, sample_rate: float, out_dir: Path) -> RoundsResult:
    settings = RunSettings(
        dataset=DATASET, out_dir=str(out_dir), noise="central", rounds=rounds, sample_rate=sample_rate,
        batch_size=max(1, round(USERS * sample_rate)), evaluate_every=max(1, rounds // VALIDATIONS), seed=0,
    )
    started = time.perf_counter()
    simulate(settings, Resources(SITES))
    total = time.perf_counter() - started
    events = timeline.read(out_dir / "flower.log")
    per_round = round_parts(events)
    middle = [per_round[number] for number in range(2, rounds) if number in per_round]
    if not middle:
        raise RuntimeError(f"no complete round in the timeline of {out_dir / 'flower.log'}")
    parts = {part: statistics.fmean(row[part] for row in middle) for part in PARTS}
    sends = [event["t"] for event in events if event["event"] == "coordinator-send"]
    ends = [event["t"] for event in events if event["event"] == "coordinator-round"]
    result = RoundsResult(
        rounds, sample_rate, statistics.fmean(row["round"] for row in middle), parts,
        sum(parts[part] for part in OVERHEAD_PARTS), max(ends) - min(sends), total,
    )
    print(f"  {rounds} rounds at sample rate {sample_rate:g}: {result.round_s:.3f}s per round, overhead "
          f"{result.overhead_s:.3f}s, whole run {total:.0f}s", flush=True)
    return result


def round_parts(events: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """Each round that has a next send, split into ``PARTS`` (plus ``round``: its wall time)."""
    sends = {int(event["round"]): event["t"] for event in events if event["event"] == "coordinator-send"}
    coordinator = {int(event["round"]): event for event in events if event["event"] == "coordinator-round"}
    sites: dict[int, list[dict[str, Any]]] = {}
    for event in events:
        if event["event"] == "site-trained":
            sites.setdefault(int(event["round"]), []).append(event)
    rows = {}
    for number, sent in sends.items():
        if number + 1 not in sends or number not in coordinator:
            continue
        trained = sites.get(number, [])
        row = {
            "round": sends[number + 1] - sent,
            "clipped_sum": sum(site.get("clipped-sum", 0.0) for site in trained),
            "site_other": sum(site["t"] - site["entered"] - site.get("clipped-sum", 0.0) for site in trained),
            "noise_step": coordinator[number].get("noise-and-step", 0.0),
            "validation": coordinator[number].get("validation", 0.0),
            "records": coordinator[number].get("records", 0.0),
        }
        row["flower"] = row["round"] - sum(row[part] for part in PARTS if part != "flower")
        rows[number] = row
    return rows


def run(context: Context) -> list[RoundsResult]:
    options = context.options
    rounds = options.rounds or (40 if context.full else 20)
    sample_rate = options.sample_rate or (0.5 if context.full else 0.2)
    return bench_rounds(rounds, sample_rate, options.factor, context.out / "runs")


def add_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--rounds", type=int, default=0, metavar="R",
                       help="rounds of the first run (default: 20; --full: 40)")
    group.add_argument("--sample-rate", type=float, default=0.0, metavar="Q",
                       help="the first run's sample rate (default: 0.2; --full: 0.5)")
    group.add_argument("--factor", type=int, default=10, metavar="K",
                       help="the second run takes K x R rounds at Q / K (default: 10)")


PART_HEADERS = {
    "clipped_sum": "sites' clipped sums", "noise_step": "noise + optimizer step", "validation": "validation",
    "site_other": "rest of the sites' round", "records": "round line + checkpoint", "flower": "Flower and the engine",
}


def format_table(results: list[RoundsResult]) -> str:
    first = results[0]
    return markdown_table(
        ["rounds", "sample rate", "round s", *(f"{PART_HEADERS[part]} s" for part in PARTS), "overhead s",
         "overhead share", "all rounds s", "whole run s", "whole run / first row's"],
        [[str(r.rounds), f"{r.sample_rate:g}", f"{r.round_s:.3f}", *(f"{r.parts[part]:.3f}" for part in PARTS),
          f"{r.overhead_s:.3f}", f"{100 * r.overhead_s / r.round_s:.0f}%", f"{r.rounds_s:.1f}", f"{r.total_s:.0f}",
          f"{r.total_s / first.total_s:.1f}x"] for r in results],
    )


BENCHMARK = Benchmark(
    name="rounds",
    help="per-round overhead of noise=central: R rounds at rate q against 10 x R rounds at q / 10 (same work)",
    description=f"A synthetic federation ({USERS:,} users, {SITES} uniform sites, the default model, epsilon 8) under "
    "noise = central through `fedtail simulate` on Flower's Simulation Engine, twice in one bench run: R one-step "
    "rounds at sample rate q, then 10 x R rounds at q / 10 (the same expected user-gradient work; each run "
    "validates 4 times). Each round, from the coordinator's send to its next send, is split by the wall-clock lines "
    "the coordinator and the sites print: the sites' clipped sums (summed over the sites, which the engine runs one "
    "at a time), the coordinator's noise and optimizer step, validation, and the overhead: the rest of the sites' "
    "round (checks, model, accounting, ledger line, reply), the coordinator's round line and checkpoint, and "
    "Flower and the engine (messages, (de)serialisation, what is left). Means over rounds 2 to R-1. Before "
    "fedtail's per-round speed-ups (one step's privacy loss distribution kept between evaluations, ledger lines "
    "verified once, a released update loaded only for a retried round, library versions read once, each reply "
    "decoded once at the coordinator), the 200-round run measured 0.74 s a round of which 0.56 s overhead "
    "(0.28 s of it the rest of the sites' round), run back to back with the table's own on this machine (2 cores, "
    "shared with other work); the sites' fixed costs grew with the rounds too (the whole ledger verified "
    "several times a round).",
    result=RoundsResult,
    run=run,
    format_table=format_table,
    add_options=add_options,
)
