"""The benchmarks ``fedtail bench`` knows, in the order it runs them and the page shows them.

Adding a benchmark: a module declaring ``BENCHMARK = Benchmark(...)`` (``simulations.bench.core``), listed here.
"""

from __future__ import annotations

from typing import Any

from simulations.bench import (
    ceiling,
    correlated_noise,
    deployment,
    dp_fedavg,
    dp_step,
    floor,
    frontier,
    pieces,
    rounds,
    serving,
    sites,
)
from simulations.bench.core import Benchmark

BENCHMARKS: dict[str, Benchmark[Any]] = {
    benchmark.name: benchmark
    for benchmark in (
        dp_step.BENCHMARK, dp_fedavg.BENCHMARK, pieces.BENCHMARK, sites.BENCHMARK, frontier.BENCHMARK,
        floor.BENCHMARK, serving.BENCHMARK, deployment.BENCHMARK, ceiling.BENCHMARK, correlated_noise.BENCHMARK,
        rounds.BENCHMARK,
    )
}
