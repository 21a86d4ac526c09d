"""The benchmark suite's own machinery on tiny sizes: it must measure, not just print."""

from __future__ import annotations

import argparse
import json
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from common.data.datasets import load_dataset
from common.federation import RunSettings
from common.privacy.accounting import GRAD_SAMPLE_MODES
from common.privacy.popularity import popularity_step
from common.recipe import PublicFacts, choose_recipe, simulated_estimate
from common.recommender.training import TrainConfig
from server.popularity import PopularityFloor
from simulations import cli
from simulations.bench import (
    ceiling,
    core,
    deployment,
    dp_fedavg,
    dp_step,
    floor,
    frontier,
    pieces,
    registry,
    rounds,
    serving,
    suite,
)


def test_peak_rss_sees_a_large_allocation() -> None:
    """64 MB of fresh pages, touched inside the block. Fresh from the kernel (an anonymous mapping): a numpy array
    of that size reused memory earlier tests had freed but the allocator kept resident, and the RSS did not move."""
    before = core.rss_bytes(os.getpid())
    with core.peak_rss() as during, mmap.mmap(-1, 64 * 2**20) as block:
        for offset in range(0, len(block), mmap.PAGESIZE):
            block[offset] = 1
    assert during[0] - before > 48 * 2**20


def test_dp_step_benchmark_measures_every_mode_against_non_private() -> None:
    results = dp_step.bench_dp_step([40], steps=2, device=torch.device("cpu"), batch=4)
    assert [r.mode for r in results] == ["non-private", *GRAD_SAMPLE_MODES]
    baseline = results[0]
    assert baseline.time_ratio == 1.0 and baseline.memory_ratio == 1.0
    for result in results:
        assert len(result.step_times_s) == 2 and all(t > 0 for t in result.step_times_s)
        assert result.median_s > 0 and result.time_ratio > 0


def test_dp_fedavg_benchmark_times_both_sums_over_the_same_users_and_states_their_ratio() -> None:
    results = dp_fedavg.bench_dp_fedavg([40, 90], calls=2, device=torch.device("cpu"), users=5, user_steps=1)
    assert [(r.catalog_size, r.users, r.user_steps) for r in results] == [(40, 5, 1), (90, 5, 1)]
    for result in results:
        assert result.gradient_median_s > 0 and result.delta_median_s > 0
        assert result.ratio == pytest.approx(result.delta_median_s / result.gradient_median_s)
    assert "| 90 | 5 | 1 |" in dp_fedavg.format_table(results)


def test_ceiling_benchmark_trains_each_item_table_choice_per_seed_and_averages_them(tmp_path: Path) -> None:
    runs = ceiling.bench_ceiling("synthetic:users=60,items=80", ("tied", "trained"), (0, 1), tmp_path,
                                 TrainConfig(epochs=2, eval_every=1))
    assert [(r.model, r.seed) for r in runs] == [
        ("fedtail, item-tables tied", 0), ("fedtail, item-tables tied", 1),
        ("fedtail, item-tables trained", 0), ("fedtail, item-tables trained", 1),
    ]
    assert all(0 <= r.ndcg10 <= 1 and r.epochs_run == 2 for r in runs)
    assert runs[0].ndcg10 != runs[2].ndcg10, "tied and separate tables are different models"
    mean = (runs[0].ndcg10 + runs[1].ndcg10) / 2
    assert f"**{mean:.4f}**" in ceiling.format_table(runs)
    saved = json.loads((tmp_path / "ceiling-synthetic:users=60,items=80-tied-seed1" / "metrics.json").read_text())
    assert saved["run"]["item_tables"] == "tied" and saved["run"]["model"]["tied_items"] is True


def test_pieces_benchmark_steps_the_same_batches_whole_and_in_pieces() -> None:
    results = pieces.bench_pieces([("synthetic", 50)], steps=2, device=torch.device("cpu"))
    assert [r.piece_users for r in results] == list(pieces.PIECE_SIZES)
    whole, *in_pieces = results
    assert whole.time_ratio == 1.0 and whole.mean_pieces == 1.0
    assert all(r.median_s > 0 for r in results)
    assert in_pieces[-1].mean_pieces > 1.0, "batches of 64 users with long-tailed lengths are cut in pieces of 8"


def test_the_page_is_assembled_from_the_saved_results(tmp_path: Path) -> None:
    older = {"dataset": "synthetic", "epsilon": 8.0, "ndcg": 0.12, "tail_ndcg": 0.13, "most_popular_ndcg": 0.05,
             "seconds": 60.0}  # saved before the frontier had placements
    central = frontier.FrontierPoint("synthetic", 8.0, 0.2, 0.21, 0.05, 90.0, "central", 0.04)
    (tmp_path / "frontier.json").write_text(json.dumps({
        "benchmark": "frontier", "mode": "quick", "seconds": 61.0, "machine": {"cores": 2, "gpu": None},
        "device": "cpu", "results": [older, central.__dict__],
    }))
    page = suite.write_page(tmp_path).read_text()
    assert "## frontier" in page and "| synthetic | site | 8 | 0.1200 | 0.1300 | 0.0500 |  | 60 |" in page
    assert "| synthetic | central | 8 | 0.2000 | 0.2100 | 0.0500 | 0.0400 | 90 |" in page
    assert "## dp-step" not in page, "sections only for benchmarks that were run"


@pytest.mark.parametrize("command", [suite.main, lambda argv: cli.main(["bench", *argv])])
def test_unknown_benchmark_names_are_refused(
    command: Callable[[list[str]], int], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        command(["dp-steps"])
    assert "unknown benchmark(s) dp-steps" in capsys.readouterr().err


def test_help_lists_every_benchmark_and_after_a_name_only_its_own(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    everything = capsys.readouterr().out
    assert all(f"\n{name}:\n" in everything for name in registry.BENCHMARKS)
    with pytest.raises(SystemExit):
        cli.main(["bench", "serving", "--help"])
    serving_only = capsys.readouterr().out
    assert "\nserving:\n" in serving_only and "--requests" in serving_only and "\ndp-step:\n" not in serving_only


@dataclass(frozen=True)
class Tiny:
    level: int
    full: bool


def _tiny_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--level", type=int, default=1)


def _tiny_plot(path: Path, results: list[Tiny]) -> None:
    path.write_text("<svg/>")


@pytest.fixture
def tiny_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """A benchmark of the test's own in the registry, as a new module would declare it: instant to run."""
    monkeypatch.setitem(registry.BENCHMARKS, "tiny", core.Benchmark(
        name="tiny", help="a benchmark of the test", description="Measures nothing.", result=Tiny,
        run=lambda context: [Tiny(context.options.level, context.full)],
        format_table=lambda results: "\n".join(f"| {r.level} | {r.full} |" for r in results),
        plot=_tiny_plot, add_options=_tiny_options, conclusion=lambda results: f"Level {results[0].level} says so.",
    ))


@pytest.mark.usefixtures("tiny_registered")
def test_an_option_of_a_benchmark_not_run_is_refused_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["bench", "tiny", "--requests", "5", "--out", str(tmp_path / "out")]) == 2
    assert "--requests is an option of the serving benchmark" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert cli.main(["bench", "tiny", "--level", "2", "--out", str(tmp_path / "out")]) == 0


@pytest.mark.usefixtures("tiny_registered")
def test_a_registered_module_is_run_with_its_option_saved_plotted_and_paged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert suite.main(["tiny", "--level", "3", "--full", "--out", str(out)]) == 0
    assert "| 3 | True |\nLevel 3 says so." in capsys.readouterr().out
    record = json.loads((out / "tiny.json").read_text())
    assert record["benchmark"] == "tiny" and record["mode"] == "full" and record["results"] == [
        {"level": 3, "full": True}
    ]
    page = (out / "benchmarks.md").read_text()
    assert "## tiny --full\n\nMeasures nothing." in page and "| 3 | True |\n\nLevel 3 says so.\n" in page
    assert "![tiny](tiny.svg)" in page


def test_serving_sizes_follow_quick_full_and_its_options(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[object, ...]] = []
    monkeypatch.setattr(serving, "measure", lambda *args: calls.append(args))
    parser = argparse.ArgumentParser(add_help=False)
    suite.add_arguments(parser)

    def run(argv: list[str]) -> list[tuple[object, ...]]:
        args = parser.parse_args(["serving", *argv])
        calls.clear()
        serving.run(core.Context(args.full, Path("unused"), torch.device("cpu"), args))
        return list(calls)

    assert run([]) == [(3_000, 300, 1, 50, 10, True), (3_000, 300, 1, 50, 10, False)]
    assert run(["--full"]) == [
        (size, 1000, 1, 50, 10, explain) for size in (3_000, 30_000) for explain in (True, False)
    ]
    assert run(["--requests", "60", "--concurrency", "1", "4", "--k", "5"]) == [
        (3_000, 60, concurrency, 50, 5, explain) for explain in (True, False) for concurrency in (1, 4)
    ]


def test_the_deployment_timeline_splits_each_round_along_the_site_that_replied_last() -> None:
    """Stages add up to the round (send to next send); the first round (cold) and the last (no next send) are left
    out; the later site's stages are the ones reported."""
    coordinator = [
        {"event": "coordinator-send", "round": "1", "t": 0.0},
        {"event": "coordinator-reply", "round": "1", "t": 5.0},
        {"event": "coordinator-send", "round": "2", "t": 6.0},
        {"event": "coordinator-reply", "round": "2", "t": 8.0},
        {"event": "coordinator-reply", "round": "2", "t": 9.5},
        {"event": "coordinator-send", "round": "3", "t": 10.0},
        {"event": "coordinator-reply", "round": "3", "t": 12.0},
    ]

    def site(acquired: float, entered: float, end: float, training: float) -> list[dict]:
        return [
            {"event": "site-task-acquired", "t": 0.5},
            {"event": "site-trained", "round": 1, "t": 4.0, "entered": 1.0, "training": 2.0},
            {"event": "site-task-acquired", "t": acquired},
            {"event": "site-trained", "round": 2, "t": end, "entered": entered, "training": training, "data": 0.1,
             "calibration": 0.2},
        ]

    [row] = deployment.round_timelines(coordinator, [site(6.5, 6.6, 7.5, 0.5), site(7.0, 7.2, 9.0, 1.0)])
    assert row["round"] == 4.0 and row["trained"] == 1.0
    assert row["pull"] == 1.0 and row["start"] == pytest.approx(0.2) and row["training"] == pytest.approx(0.8)
    assert row["reply"] == 0.5 and row["aggregation"] == 0.5
    assert sum(row[stage] for stage in deployment.STAGES) == pytest.approx(row["round"])


def test_a_central_round_splits_into_the_sites_work_the_coordinators_and_flowers_rest() -> None:
    """Parts add up to the round (send to next send); sites' parts are summed over the sites; a round without a
    next send or a coordinator line is left out."""
    events = [
        {"event": "coordinator-send", "round": 1, "t": 10.0},
        {"event": "site-trained", "round": 1, "entered": 10.1, "t": 10.4, "clipped-sum": 0.2},
        {"event": "site-trained", "round": 1, "entered": 10.5, "t": 10.7, "clipped-sum": 0.1, "calibration": 0.05},
        {"event": "noise", "round": 1, "t": 10.8},  # another event: ignored
        {"event": "coordinator-round", "round": 1, "t": 11.0, "noise-and-step": 0.05, "validation": 0.3,
         "records": 0.02},
        {"event": "coordinator-send", "round": 2, "t": 11.5},
        {"event": "site-trained", "round": 2, "entered": 11.6, "t": 11.7, "clipped-sum": 0.05},
        {"event": "coordinator-round", "round": 2, "t": 11.9},
    ]
    [(number, row)] = rounds.round_parts(events).items()
    assert number == 1 and row["round"] == 1.5
    assert row["clipped_sum"] == pytest.approx(0.3) and row["site_other"] == pytest.approx(0.2)
    assert (row["noise_step"], row["validation"], row["records"]) == (0.05, 0.3, 0.02)
    assert row["flower"] == pytest.approx(1.5 - 0.3 - 0.2 - 0.05 - 0.3 - 0.02)
    assert sum(row[part] for part in rounds.PARTS) == pytest.approx(row["round"])


def test_one_noise_frontier_points_take_the_recipe_rules_choice_and_distributed_tolerates_two() -> None:
    spec = "synthetic:users=200,items=100,seed=1"
    site = frontier.placement_settings(spec, "site", 4.0, 5, 5, "out")
    assert (site.noise, site.rounds, site.dp, site.epsilon) == ("site", 5, True, 4.0)
    assert not frontier.placement_settings(spec, "central", None, 5, 5, "out").dp
    central = frontier.placement_settings(spec, "central", 4.0, 5, 5, "out")
    data = load_dataset(spec)
    recipe = choose_recipe(PublicFacts(simulated_estimate(data), 100, 5, 4.0, RunSettings.delta))
    assert central.noise == "central"
    assert (central.rounds, central.sample_rate, central.batch_size, central.server_learning_rate) == (
        recipe.rounds, recipe.sample_rate, recipe.batch_size, recipe.server_learning_rate)
    distributed = frontier.placement_settings(spec, "distributed", 4.0, 5, 5, "out")
    assert (distributed.min_sites, distributed.secure_aggregation_tolerated) == (5, 2)


def test_the_floor_benchmark_scores_the_exact_sum_and_each_placements_noise_at_each_epsilon() -> None:
    points = floor.bench_floor(["synthetic:users=400,items=80,seed=2"], (0.25, 100.0), sites=5, draws=2, delta=1e-5)
    exact = points[0]
    assert (exact.placement, exact.release_epsilon) == ("exact", None)
    by = {(p.placement, p.release_epsilon): p for p in points[1:]}
    assert set(by) == {(placement, eps) for placement in floor.PLACEMENTS for eps in (0.25, 100.0)}
    for placement in floor.PLACEMENTS:  # little noise: the exact ranking
        assert by[(placement, 100.0)].ndcg == pytest.approx(exact.ndcg, abs=0.01), placement
    assert by[("site", 0.25)].noise_multiplier == by[("central", 0.25)].noise_multiplier == popularity_step(
        0.25, 1e-5, 1.0)[0]
    assert "| synthetic:users=400,items=80,seed=2 | one (central) | 100 |" in floor.format_table(points)


def test_the_floor_is_scored_in_its_priors_order_whatever_the_scale() -> None:
    """Scored as probabilities, most-popular's tie-breaking offsets (up to 0.1) would decide the order instead."""
    noisy = torch.tensor([0.0, 5.0, -3.0, 40.0, 0.2, 12.5])
    counts = floor.floor_counts(noisy)
    assert list(np.argsort(-counts[1:], kind="stable")) == [2, 4, 0, 3, 1]
    prior = PopularityFloor(noisy).prior()[1:]
    torch.testing.assert_close(torch.from_numpy(counts[1:] / counts[1:].sum()).float(), prior)
