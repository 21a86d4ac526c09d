"""``frontier``: test NDCG@10 overall and on tail users against epsilon (1, 2, 4, 8), for each noise placement,
with the non-private federated model and most-popular beside them.

On the synthetic default, and with ``--full`` on MovieLens 100K too when the benchmarks' data folder
(``core.SHARED_DATA``, beside the checkout) holds ``ml-100k``.
Placements: ``site`` (the defaults: each site noises its own local epochs) and ``central`` / ``distributed`` with
the recipe rule's rounds, sample rate, batch and learning rate for each epsilon (``common.recipe``, as
``fedtail simulate`` chooses them), from the data's users with training pairs, rounded to 2 significant digits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from common.data.datasets import DEFAULT_DATASET, load_dataset
from common.federation import RunSettings
from common.recipe import PublicFacts, choose_recipe, simulated_estimate
from common.utils.plot import Panel, Series, write_line_charts
from simulations.bench.core import ML_100K, Benchmark, Context
from simulations.report import markdown_table
from simulations.simulate import Resources, simulate

PLACEMENTS = ("site", "central", "distributed")
TOLERATED = 2
"""Distributed: sites that may drop out or collude (min-sites 5)."""


@dataclass(frozen=True)
class FrontierPoint:
    dataset: str
    epsilon: float | None
    """None: non-private."""
    ndcg: float
    tail_ndcg: float
    most_popular_ndcg: float
    seconds: float
    noise: str = "site"
    """Where the noise was added: site, central, distributed; non-private: site (no noise)."""
    most_popular_tail_ndcg: float | None = None


def placement_settings(dataset: str, noise: str, epsilon: float | None, rounds: int, sites: int, out_dir: str
                       ) -> RunSettings:
    """The run of one frontier point; ``rounds``: a site-noise run's (one-noise runs take the recipe rule's)."""
    if epsilon is None or noise == "site":
        return RunSettings(dataset=dataset, rounds=rounds, out_dir=out_dir, dp=epsilon is not None,
                           epsilon=epsilon or RunSettings.epsilon)
    data = load_dataset(dataset)
    recipe = choose_recipe(PublicFacts(simulated_estimate(data), data.stats().items, sites, epsilon, RunSettings.delta))
    distributed = noise == "distributed"
    return RunSettings(
        dataset=dataset, out_dir=out_dir, epsilon=epsilon, noise=noise, **recipe.settings(),
        min_sites=sites if distributed else RunSettings.min_sites,
        secure_aggregation_tolerated=TOLERATED if distributed else RunSettings.secure_aggregation_tolerated,
    )


def bench_frontier(datasets: list[str], epsilons: list[float], placements: tuple[str, ...], rounds: int, sites: int,
                   out: Path) -> list[FrontierPoint]:
    """Each placement at each epsilon, and the non-private run once per dataset."""
    points = []
    for dataset in datasets:
        runs = [(noise, epsilon) for noise in placements for epsilon in epsilons] + [("site", None)]
        for noise, epsilon in runs:
            name = f"frontier-{Path(dataset).name}-{noise}-{'nodp' if epsilon is None else f'eps{epsilon:g}'}"
            settings = placement_settings(dataset, noise, epsilon, rounds, sites, str(out / name))
            started = time.perf_counter()
            summary = simulate(settings, Resources(sites))
            popular = summary["baselines"]["most_popular"]
            points.append(FrontierPoint(
                Path(dataset).name, epsilon, summary["overall"]["ndcg@10"], summary["groups"]["tail"]["ndcg@10"],
                popular["overall"]["ndcg@10"], time.perf_counter() - started, noise,
                popular["groups"]["tail"]["ndcg@10"],
            ))
            print(f"  frontier {name}: NDCG@10 {points[-1].ndcg:.4f}", flush=True)
    return points


def run(context: Context) -> list[FrontierPoint]:
    datasets = [DEFAULT_DATASET] + ([str(ML_100K)] if context.full and ML_100K.exists() else [])
    return bench_frontier(datasets, [1.0, 2.0, 4.0, 8.0], PLACEMENTS, rounds=10 if context.full else 5, sites=5,
                          out=context.out / "runs")


def format_table(points: list[FrontierPoint]) -> str:
    return markdown_table(
        ["dataset", "noise", "epsilon per site", "test NDCG@10", "tail NDCG@10", "most-popular NDCG@10",
         "most-popular tail", "run s"],
        [[p.dataset, "none (non-private)" if p.epsilon is None else p.noise,
          "non-private" if p.epsilon is None else f"{p.epsilon:g}", f"{p.ndcg:.4f}", f"{p.tail_ndcg:.4f}",
          f"{p.most_popular_ndcg:.4f}", "" if p.most_popular_tail_ndcg is None else f"{p.most_popular_tail_ndcg:.4f}",
          f"{p.seconds:.0f}"] for p in points],
    )


def plot(path: Path, points: list[FrontierPoint]) -> None:
    """Per dataset, overall and tail: a line per placement against epsilon; non-private and most-popular flat."""
    panels = []
    for dataset in dict.fromkeys(p.dataset for p in points):
        mine = [p for p in points if p.dataset == dataset]
        x = sorted({p.epsilon for p in mine if p.epsilon is not None})
        ceiling = next((p for p in mine if p.epsilon is None), None)
        for title, value, popular in (
            ("test NDCG@10", lambda p: p.ndcg, mine[0].most_popular_ndcg),
            ("tail users' NDCG@10", lambda p: p.tail_ndcg, mine[0].most_popular_tail_ndcg),
        ):
            series = []
            for noise in dict.fromkeys(p.noise for p in mine if p.epsilon is not None):
                line = sorted((p.epsilon, value(p)) for p in mine if p.noise == noise and p.epsilon is not None)
                series.append(Series(noise, [e for e, _ in line], [v for _, v in line]))
            if ceiling is not None:
                series.append(Series("non-private", x, [value(ceiling)] * len(x)))
            if popular is not None:
                series.append(Series("most-popular", x, [popular] * len(x)))
            panels.append(Panel(f"{dataset}: {title}", "epsilon", series))
    write_line_charts(path, panels)


BENCHMARK = Benchmark(
    name="frontier",
    help="test NDCG@10, overall and on tail users, at epsilon 1 / 2 / 4 / 8 for each noise placement, and "
    "non-private (--full: ml-100k too)",
    description="Five sites, uniform split, test NDCG@10 of the kept global model against each site's epsilon, for "
    "each noise placement: site (the defaults, 5 rounds; 10 with --full), central and distributed (the recipe "
    "rule's rounds, sample rate, batch and learning rate for each epsilon, clipping 1; distributed tolerates 2 of "
    "5 sites dropping out or colluding), with the non-private federated "
    "model and most-popular on the same plot.",
    result=FrontierPoint,
    run=run,
    format_table=format_table,
    plot=plot,
)
