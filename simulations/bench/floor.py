"""``floor``: how good the DP popularity floor alone is, against the release's epsilon, with each site adding its own
noise or one noise added over the federation (``central``).

The floor is the starting model's ranking (its output bias is the log of the floor's prior, ``server.popularity``),
and at a small epsilon it is often the best model a run keeps (round 0). So this measures what a run can start from
without training: NDCG@10 on the test users of the ranking by ``PopularityFloor.prior()`` made from the exact clipped
sum (``client.popularity.clipped_popularity_sum``) plus the noise each placement adds: one N(0, sigma^2) per item
from each of ``SITES`` sites, or one in all. Sigma is the project's calibration for the release alone at that
epsilon (``common.privacy.popularity.popularity_step``). Each point is the mean over ``DRAWS`` noise draws.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from client.popularity import clipped_popularity_sum
from common.data.datasets import DEFAULT_DATASET, load_dataset
from common.data.split import training_examples
from common.federation import RunSettings
from common.privacy.popularity import POPULARITY_BOUND, popularity_mechanism, popularity_step
from common.recommender.evaluation import evaluate, popularity_scorer
from common.utils.plot import Panel, Series, write_line_charts
from server.evaluator import Evaluator
from server.popularity import PRIOR_SMOOTHING, PopularityFloor
from simulations.bench.core import AMAZON_BEAUTY, ML_100K, Benchmark, Context
from simulations.report import markdown_table

SITES = 5
DRAWS = 3
EPSILONS = (0.25, 0.5, 1.0, 2.0, 4.0)
PLACEMENTS = ("site", "central")


@dataclass(frozen=True)
class FloorPoint:
    dataset: str
    placement: str
    """site: each of ``sites`` sites adds its own noise; central: one noise over the sum; exact: none (no DP)."""
    release_epsilon: float | None
    noise_multiplier: float | None
    ndcg: float
    ndcg_std: float
    tail_ndcg: float
    most_popular_ndcg: float
    most_popular_tail_ndcg: float
    sites: int
    seconds: float


def floor_counts(noisy_sum: torch.Tensor) -> np.ndarray:
    """The floor's prior as counts (the prior times its total): the same order, on the scale whose ties
    ``popularity_scorer`` breaks by index with offsets below 0.1 (on probabilities those offsets would decide)."""
    counts = noisy_sum.double().clamp(min=0.0) + PRIOR_SMOOTHING
    return (PopularityFloor(noisy_sum).prior().double() * counts[1:].sum()).numpy()


def bench_floor(datasets: list[str], epsilons: tuple[float, ...], sites: int, draws: int, delta: float,
                seed: int = 0) -> list[FloorPoint]:
    generator = torch.Generator().manual_seed(seed)  # a benchmark: reproducible draws are what is wanted here
    return [point for dataset in datasets
            for point in _dataset_floor(dataset, epsilons, sites, draws, delta, generator)]


def _dataset_floor(dataset: str, epsilons: tuple[float, ...], sites: int, draws: int, delta: float,
                   generator: torch.Generator) -> list[FloorPoint]:
    started = time.perf_counter()
    settings = RunSettings(dataset=dataset)
    evaluator = Evaluator.from_settings(settings)
    _, sequences = load_dataset(dataset).sequences(evaluator.catalog)
    train = training_examples(sequences, settings.max_len)  # every site's users together: the sum is the same
    clip_only = popularity_mechanism(max(epsilons), delta, 1.0, "site")  # its individual half: the per-user bound
    exact = clipped_popularity_sum(train, evaluator.catalog.num_items, clip_only).float()
    popular = evaluate(popularity_scorer(evaluator.popularity), evaluator.test, evaluator.popularity,
                       evaluator.num_users)

    def point(placement: str, epsilon: float | None, sigma: float | None, sums: list[torch.Tensor]) -> FloorPoint:
        reports = [evaluate(popularity_scorer(floor_counts(noisy)), evaluator.test, evaluator.popularity,
                            evaluator.num_users) for noisy in sums]
        overall = [report["overall"]["ndcg@10"] for report in reports]
        return FloorPoint(
            Path(dataset).name, placement, epsilon, sigma, statistics.fmean(overall), statistics.pstdev(overall),
            statistics.fmean(report["groups"]["tail"]["ndcg@10"] for report in reports),
            popular["overall"]["ndcg@10"], popular["groups"]["tail"]["ndcg@10"], sites,
            time.perf_counter() - started,
        )

    points = [point("exact", None, None, [exact])]
    for epsilon in epsilons:
        sigma = popularity_step(epsilon, delta, 1.0)[0]
        for placement in PLACEMENTS:
            noises = sites if placement == "site" else 1  # each site adds its own, or the coordinator one
            sums = [exact + sum(torch.normal(0.0, sigma * POPULARITY_BOUND, exact.shape, generator=generator)
                                for _ in range(noises)) for _ in range(draws)]
            points.append(point(placement, epsilon, sigma, sums))
            print(f"  floor {points[-1].dataset} {placement} epsilon {epsilon:g}: NDCG@10 {points[-1].ndcg:.4f}",
                  flush=True)
    return points


def run(context: Context) -> list[FloorPoint]:
    datasets = [DEFAULT_DATASET]
    if context.full:
        datasets += [str(path) for path in (ML_100K, AMAZON_BEAUTY) if path.exists()]
    return bench_floor(datasets, EPSILONS, SITES, DRAWS, RunSettings.delta)


def format_table(points: list[FloorPoint]) -> str:
    return markdown_table(
        ["dataset", "noise", "release epsilon", "noise multiplier", "floor NDCG@10 (mean of draws)", "std",
         "tail NDCG@10", "most-popular NDCG@10", "most-popular tail"],
        [[p.dataset, "none (exact sum, not private)" if p.release_epsilon is None else
          f"each of {p.sites} sites" if p.placement == "site" else "one (central)",
          "" if p.release_epsilon is None else f"{p.release_epsilon:g}",
          "" if p.noise_multiplier is None else f"{p.noise_multiplier:.2f}",
          f"{p.ndcg:.4f}", f"{p.ndcg_std:.4f}", f"{p.tail_ndcg:.4f}", f"{p.most_popular_ndcg:.4f}",
          f"{p.most_popular_tail_ndcg:.4f}"] for p in points],
    )


def plot(path: Path, points: list[FloorPoint]) -> None:
    panels = []
    for dataset in dict.fromkeys(p.dataset for p in points):
        mine = [p for p in points if p.dataset == dataset and p.release_epsilon is not None]
        x = sorted({float(p.release_epsilon) for p in mine if p.release_epsilon is not None})
        series = [Series(f"{placement} noise", x, [p.ndcg for p in mine if p.placement == placement])
                  for placement in PLACEMENTS]
        exact = next(p for p in points if p.dataset == dataset and p.release_epsilon is None)
        series += [Series("exact sum (not private)", x, [exact.ndcg] * len(x)),
                   Series("most-popular", x, [exact.most_popular_ndcg] * len(x))]
        panels.append(Panel(f"{dataset}: the popularity floor's test NDCG@10", "release epsilon", series))
    write_line_charts(path, panels)


BENCHMARK = Benchmark(
    name="floor",
    help="the DP popularity floor alone (the starting model's ranking): test NDCG@10 against the release's "
    "epsilon, each site adding its noise or one central noise (--full: ml-100k and Beauty too)",
    description=f"The ranking the DP popularity floor gives the starting model, scored on the test users (NDCG@10, "
    f"mean of {DRAWS} noise draws), against the epsilon of the popularity release alone (delta 1e-5), for "
    f"{SITES} sites each adding its own Gaussian noise (placement site) or one noise over the federation (central; "
    "distributed is a secure sum of shares, between the two: the total noise of min-sites / threshold shares). "
    "The exact row is the same ranking from the "
    "un-noised sum (each user's items scaled to L2 norm 1), which is not private: the most the floor can reach. "
    "No training: a run at a small epsilon keeps this model when no trained round beats it (round 0).",
    result=FloorPoint,
    run=run,
    format_table=format_table,
    plot=plot,
)
