"""``frontier``: test NDCG@10 overall and on tail users against epsilon (1, 2, 4, 8 and non-private).

On the synthetic default, and with ``--full`` on MovieLens 100K too when
``../shared/data/ml-100k`` is present.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from common.data.datasets import DEFAULT_DATASET
from common.federation import RunSettings
from common.utils.plot import Panel, Series, write_line_charts
from simulations.bench.core import ML_100K, Benchmark, Context
from simulations.report import markdown_table
from simulations.simulate import Resources, simulate


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


def run(context: Context) -> list[FrontierPoint]:
    datasets = [DEFAULT_DATASET] + ([str(ML_100K)] if context.full and ML_100K.exists() else [])
    return bench_frontier(datasets, [1.0, 2.0, 4.0, 8.0, None], rounds=10 if context.full else 5, sites=5,
                          out=context.out / "runs")


def format_table(points: list[FrontierPoint]) -> str:
    return markdown_table(
        ["dataset", "epsilon per site", "test NDCG@10", "tail NDCG@10", "most-popular NDCG@10", "run s"],
        [[p.dataset, "non-private" if p.epsilon is None else f"{p.epsilon:g}", f"{p.ndcg:.4f}", f"{p.tail_ndcg:.4f}",
          f"{p.most_popular_ndcg:.4f}", f"{p.seconds:.0f}"] for p in points],
    )


def plot(path: Path, points: list[FrontierPoint]) -> None:
    panels = []
    for dataset in dict.fromkeys(p.dataset for p in points):
        private = sorted(((p.epsilon, p) for p in points if p.dataset == dataset and p.epsilon is not None),
                         key=lambda pair: pair[0])
        ceiling = [p for p in points if p.dataset == dataset and p.epsilon is None]
        x = [epsilon for epsilon, _ in private]
        series = [Series("overall", x, [p.ndcg for _, p in private]),
                  Series("tail", x, [p.tail_ndcg for _, p in private])]
        if ceiling:
            series.append(Series("non-private", x, [ceiling[0].ndcg] * len(x)))
        panels.append(Panel(f"{dataset}: test NDCG@10", "epsilon", series))
    write_line_charts(path, panels)


BENCHMARK = Benchmark(
    name="frontier",
    help="test NDCG@10, overall and on tail users, at epsilon 1 / 2 / 4 / 8 and non-private (--full: ml-100k too)",
    description="Five sites, uniform split, test NDCG@10 of the final global model against each site's epsilon.",
    result=FrontierPoint,
    run=run,
    format_table=format_table,
    plot=plot,
)
