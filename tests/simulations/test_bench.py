"""The benchmark suite's own machinery on tiny sizes: it must measure, not just print."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.privacy import GRAD_SAMPLE_MODES
from simulations import bench


def test_peak_rss_sees_a_large_allocation() -> None:
    with bench.peak_rss() as before:
        pass
    with bench.peak_rss() as during:
        block = np.ones(64 * 2**20 // 8)  # 64 MB, touched
        block.sum()
    assert during[0] - before[0] > 48 * 2**20


def test_dp_step_benchmark_measures_every_mode_against_non_private() -> None:
    results = bench.bench_dp_step([40], steps=2, device=torch.device("cpu"), batch=4)
    assert [r.mode for r in results] == ["non-private", *GRAD_SAMPLE_MODES]
    baseline = results[0]
    assert baseline.time_ratio == 1.0 and baseline.memory_ratio == 1.0
    for result in results:
        assert len(result.step_times_s) == 2 and all(t > 0 for t in result.step_times_s)
        assert result.median_s > 0 and result.time_ratio > 0


def test_pieces_benchmark_steps_the_same_batches_whole_and_in_pieces() -> None:
    results = bench.bench_pieces([("synthetic", 50)], steps=2, device=torch.device("cpu"))
    assert [r.piece_users for r in results] == list(bench.PIECE_SIZES)
    whole, *pieces = results
    assert whole.time_ratio == 1.0 and whole.mean_pieces == 1.0
    assert all(r.median_s > 0 for r in results)
    assert pieces[-1].mean_pieces > 1.0, "batches of 64 users with long-tailed lengths are cut in pieces of 8"


def test_the_page_is_assembled_from_the_saved_results(tmp_path: Path) -> None:
    point = bench.FrontierPoint("synthetic", 8.0, 0.12, 0.13, 0.05, 60.0)
    (tmp_path / "frontier.json").write_text(json.dumps({
        "benchmark": "frontier", "mode": "quick", "seconds": 61.0, "machine": {"cores": 2, "gpu": None},
        "device": "cpu", "results": [point.__dict__],
    }))
    page = bench.write_page(tmp_path).read_text()
    assert "## frontier" in page and "| synthetic | 8 | 0.1200 | 0.1300 | 0.0500 | 60 |" in page
    assert "## dp-step" not in page, "sections only for benchmarks that were run"


def test_unknown_benchmark_names_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench.main(["dp-steps"])
    assert "unknown benchmark(s) dp-steps" in capsys.readouterr().err
