"""``dp-step``: one DP-SGD step against the non-private step, per grad-sample mode, at three catalogue sizes.

Batch 64, histories of 50, catalogues of 3k / 30k / 100k items. Modes are
interleaved step by step in one process so that machine noise hits all of them
alike; times are medians, memory is the step's peak above what was allocated
before it (CUDA allocator, or sampled RSS on CPU).
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.dp_sgd import make_private, private_step
from common.data.split import training_examples
from common.privacy.accounting import GRAD_SAMPLE_MODES
from common.protocol.round_plan import LocalTraining, PrivacyPlan, RoundPlan
from common.recommender.model import ModelOptions, SASRec, sequence_loss
from common.utils.plot import Panel, Series, write_line_charts
from simulations.bench.core import Benchmark, Context, interleaved_times, peak_rss, rss_bytes
from simulations.report import markdown_table


@dataclass(frozen=True)
class StepResult:
    catalog_size: int
    mode: str
    median_s: float
    step_times_s: list[float]
    peak_step_memory_mb: float
    time_ratio: float
    memory_ratio: float


def _step_memory(device: torch.device, step: Callable[[], None]) -> float:
    """Peak bytes above the memory in use before the step (measured apart from timing: sampling costs CPU)."""
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        return torch.cuda.max_memory_allocated(device) - before
    before = rss_bytes(os.getpid())
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
        steppers: dict[str, Callable[[], None]] = {
            "non-private": _plain_stepper(options, size, inputs, targets, device)
        }
        for mode in GRAD_SAMPLE_MODES:
            steppers[mode] = _private_stepper(options, size, examples, mode, inputs, targets, device)
        times = interleaved_times(device, steppers, steps, f"dp-step {size} items, steps")
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


def run(context: Context) -> list[StepResult]:
    return bench_dp_step([3_000, 30_000, 100_000], steps=10 if context.full else 5, device=context.device)


def format_table(results: list[StepResult]) -> str:
    return markdown_table(
        ["catalogue", "mode", "median step s", "x non-private", "peak step memory MB", "x non-private"],
        [[f"{r.catalog_size:,}", r.mode, f"{r.median_s:.3f}", f"{r.time_ratio:.2f}", f"{r.peak_step_memory_mb:.0f}",
          f"{r.memory_ratio:.2f}"] for r in results],
    )


def plot(path: Path, results: list[StepResult]) -> None:
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


BENCHMARK = Benchmark(
    name="dp-step",
    help="one DP-SGD step against the non-private step, per grad-sample mode, at 3k / 30k / 100k items",
    description="One training step, batch 64, histories of 50, the default model (hidden 64, 2 blocks), at three "
    "catalogue sizes. Non-private and each grad-sample mode are interleaved step by step in one process; times are "
    "medians after a warm-up step, memory is one step's peak above what was in use before it.",
    result=StepResult,
    run=run,
    format_table=format_table,
    plot=plot,
)
