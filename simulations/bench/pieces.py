"""``pieces``: one DP step on a real site's Poisson batches run whole against length-sorted pieces of 32 / 16 / 8 users.

On the synthetic default and, when present, MovieLens 100K and Amazon Beauty
(long-tailed history lengths).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path

import torch

from client.dp_sgd import PIECE_USERS, make_private, private_step
from client.shard import simulated_shard
from common.data.datasets import DEFAULT_DATASET
from common.data.split import length_sorted_pieces
from common.protocol.round_plan import LocalTraining, PrivacyPlan, RoundPlan
from common.recommender.model import ModelOptions, SASRec
from simulations.bench.core import AMAZON_BEAUTY, ML_100K, Benchmark, Context, timed
from simulations.report import markdown_table


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
        batches = list(islice(private.loader, steps + 1))
        times: dict[int, list[float]] = {size: [] for size in PIECE_SIZES}
        for index, (inputs, targets) in enumerate(batches):
            inputs, targets = inputs.to(device), targets.to(device)
            for size in PIECE_SIZES:
                seconds = timed(device, partial(private_step, private, inputs, targets, size or len(inputs) + 1))
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


def run(context: Context) -> list[PiecesResult]:
    present = [(str(path), max_len) for path, max_len in ((ML_100K, 200), (AMAZON_BEAUTY, 50)) if path.exists()]
    return bench_pieces([(DEFAULT_DATASET, ModelOptions().max_len), *present], 10 if context.full else 5,
                        context.device)


def format_table(results: list[PiecesResult]) -> str:
    return markdown_table(
        ["dataset", "max len", "pieces of", "mean pieces per batch", "median step s", "x whole batch"],
        [[r.dataset, str(r.max_len), str(r.piece_users) if r.piece_users else "whole batch", f"{r.mean_pieces:.1f}",
          f"{r.median_s:.3f}", f"{r.time_ratio:.2f}"] for r in results],
    )


BENCHMARK = Benchmark(
    name="pieces",
    help="one DP step on a site's Poisson batches whole against length-sorted pieces of 32 / 16 / 8 users",
    description="One DP-SGD step (ghost clipping, expected batch 64, the default model) on site 0 of 5 uniform "
    "sites, on the same Poisson batches run whole (trimmed to the batch's longest history) and in length-sorted "
    "pieces (`common.data.split.length_sorted_pieces`; the clipped sum is the same, tests/client/test_dp.py). "
    "Interleaved batch by batch; medians after a warm-up batch.",
    result=PiecesResult,
    run=run,
    format_table=format_table,
)
