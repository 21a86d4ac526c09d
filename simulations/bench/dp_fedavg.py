"""``dp-fedavg``: a site's user-level DP-FedAvg round (clipped deltas) against its one-step round (clipped gradients).

The same users, all sampled (rate 1), the same weights: ``client.clipped_sum``
(one ghost-clipping DP-SGD step's clipped sum, the ``user-update = gradient``
round) and ``client.delta_sum`` (each user's clipped delta after ``user-steps``
local steps, vectorised over users), interleaved call by call in one process
so that machine noise hits both alike. Catalogues of MovieLens-100K's size and
larger; times are medians after a warm-up call.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from client.clipped_sum import clipped_sum
from client.delta_sum import clipped_delta_sum
from common.data.split import training_examples
from common.federation import RunSettings
from common.protocol.round_plan import LocalTraining
from common.recommender.model import ModelOptions, SASRec
from simulations.bench.core import Benchmark, Context, interleaved_times
from simulations.report import markdown_table

CATALOGS = (1_683, 12_000)
"""MovieLens-100K's catalogue, and a larger one."""


@dataclass(frozen=True)
class FedAvgResult:
    catalog_size: int
    users: int
    user_steps: int
    gradient_median_s: float
    """``client.clipped_sum``: one DP-SGD step's clipped sum (ghost clipping)."""
    delta_median_s: float
    """``client.delta_sum``: the clipped deltas after ``user_steps`` local steps."""
    ratio: float
    """delta / gradient, in the same run: the cost of a DP-FedAvg round in one-step rounds."""


def bench_dp_fedavg(
    catalogs: list[int], calls: int, device: torch.device, users: int = 64, user_steps: int = RunSettings.user_steps
) -> list[FedAvgResult]:
    """Both sums over the same users and weights, interleaved call by call, at each catalogue size."""
    results = []
    options = ModelOptions(tied_items=RunSettings.item_tables == "tied")
    training = LocalTraining(sample_rate=1.0, batch_size=users, user_update="delta", user_steps=user_steps)
    for size in catalogs:
        rng = np.random.default_rng(size)
        lengths = np.clip(rng.geometric(1 / 30, size=users), 3, options.max_len + 1)  # long-tailed, some full
        examples = training_examples([rng.integers(1, size + 1, size=n) for n in lengths], options.max_len)
        torch.manual_seed(0)
        model = SASRec(options.for_catalog(size)).to(device)
        sums: dict[str, Callable[[], object]] = {
            name: partial(user_sum, model, examples, training, RunSettings.max_grad_norm, device)
            for name, user_sum in (("gradient", clipped_sum), ("delta", clipped_delta_sum))
        }
        times = interleaved_times(device, sums, calls, f"dp-fedavg {size} items, calls")
        gradient, delta = statistics.median(times["gradient"]), statistics.median(times["delta"])
        results.append(FedAvgResult(size, users, user_steps, gradient, delta, delta / gradient))
        print(f"  dp-fedavg {size} items: gradient {gradient:.3f}s, delta {delta:.3f}s, ratio {delta / gradient:.2f}",
              flush=True)
    return results


def add_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--fedavg-users", type=int, default=64, help="dp-fedavg: users in the sum (default: 64)")
    group.add_argument("--fedavg-user-steps", type=int, default=RunSettings.user_steps,
                       help=f"dp-fedavg: local steps per user (default: {RunSettings.user_steps})")


def run(context: Context) -> list[FedAvgResult]:
    return bench_dp_fedavg(list(CATALOGS), calls=10 if context.full else 5, device=context.device,
                           users=context.options.fedavg_users, user_steps=context.options.fedavg_user_steps)


def format_table(results: list[FedAvgResult]) -> str:
    return markdown_table(
        ["catalogue", "users", "user steps", "gradient sum s", "delta sum s", "delta / gradient"],
        [[f"{r.catalog_size:,}", str(r.users), str(r.user_steps), f"{r.gradient_median_s:.3f}",
          f"{r.delta_median_s:.3f}", f"{r.ratio:.2f}"] for r in results],
    )


BENCHMARK = Benchmark(
    name="dp-fedavg",
    help="a site's user-level DP-FedAvg round (clipped deltas) against its one-step round (clipped gradients)",
    description="The same 64 users (long-tailed history lengths up to 50, the default tied model), all sampled, the "
    "same weights: the site's sum of clipped per-user gradients (ghost clipping, one DP-SGD step) against its sum "
    "of clipped per-user model deltas after the default user-steps local SGD steps (torch.func, vectorised over "
    "users in chunks), interleaved call by call; medians after a warm-up call, at MovieLens-100K's catalogue size "
    "and a larger one.",
    result=FedAvgResult,
    run=run,
    format_table=format_table,
    add_options=add_options,
)
