"""The centralized SASRec learns the synthetic data's sequential structure, tail users included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.data.datasets import load_dataset
from common.recommender.content import load_item_vectors
from common.recommender.model import ModelOptions
from common.recommender.training import TrainConfig
from simulations.centralized import train_centralized


def _assert_beats_most_popular_twice(report: dict, factor: float = 2.0) -> None:
    baseline = report["baselines"]["most_popular"]
    assert report["overall"]["ndcg@10"] >= factor * baseline["overall"]["ndcg@10"]
    assert report["groups"]["tail"]["ndcg@10"] >= factor * baseline["groups"]["tail"]["ndcg@10"]


def test_sasrec_beats_most_popular_twice_on_small_synthetic(tmp_path: Path) -> None:
    dataset = load_dataset("synthetic:users=800,items=300,seed=11")
    attributes = tmp_path / "item2attributes.json"  # public metadata: content-initialised items, no extra needed
    attributes.write_text(json.dumps({str(item): [item % 7, 10 + item % 5] for item in range(1, 301)}))
    report = train_centralized(
        dataset,
        tmp_path / "model",
        ModelOptions(max_len=20, hidden=32, heads=1, blocks=1, dropout=0.1),
        TrainConfig(epochs=12, eval_every=3, patience=2, learning_rate=3e-3),
        item_text=attributes,
    )
    _assert_beats_most_popular_twice(report)
    assert report["run"]["fit"]["best_epoch"] > 0
    assert report["run"]["item_init"] == f"content: {attributes}"
    vectors = load_item_vectors(tmp_path / "model", 300)  # kept for the content cold-start prior
    assert vectors is not None and vectors.shape == (301, 32)


@pytest.mark.slow
def test_sasrec_beats_most_popular_twice_on_the_default_synthetic(tmp_path: Path) -> None:
    report = train_centralized(load_dataset(), tmp_path, ModelOptions(), TrainConfig())
    _assert_beats_most_popular_twice(report)
