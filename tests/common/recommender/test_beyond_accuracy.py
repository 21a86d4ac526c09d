"""Intra-list diversity and miscalibration against hand-computed values, and their place in the evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.data.split import EvaluationCases
from common.recommender.evaluation import evaluate, evaluate_with_baselines, model_scorer, popularity_scorer
from common.recommender.item_space import CATEGORY_CLUSTERS, ItemSpace, item_space
from common.recommender.metrics import intra_list_diversity, miscalibration, vector_clusters
from common.recommender.model import ModelConfig, SASRec
from simulations.report import format_metrics_table

# Items 1..3 (0 is padding): 1 and 2 orthogonal, 3 between them (cosine 0.6 with 1, 0.8 with 2).
UNIT = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
# Two categories: item 1 is all A, item 2 all B, item 3 half and half.
CATEGORIES = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])


def test_intra_list_diversity_is_the_mean_pairwise_cosine_distance() -> None:
    lists = np.array([[1, 2, 3], [1, 2, 0], [1, 3, 0], [2, 0, 0]])
    ild = intra_list_diversity(lists, UNIT)
    assert ild[0] == pytest.approx((1.0 + 0.4 + 0.2) / 3)  # pairs (1,2), (1,3), (2,3)
    assert ild[1] == pytest.approx(1.0), "padding is no item"
    assert ild[2] == pytest.approx(0.4)
    assert math.isnan(ild[3]), "one item has no pairs"


def test_miscalibration_is_steck_kl_with_smoothing() -> None:
    histories = [np.array([1, 1, 2]), np.array([1]), np.array([1, 2]), np.array([], dtype=np.int64)]
    lists = np.array([[2, 3], [2, 0], [3, 3], [1, 2]])
    values = miscalibration(histories, lists, CATEGORIES, alpha=0.01)
    p, q = np.array([2 / 3, 1 / 3]), np.array([0.25, 0.75])  # user 0: history mix, list mix
    smoothed = 0.99 * q + 0.01 * p
    assert values[0] == pytest.approx(float((p * np.log(p / smoothed)).sum()))
    assert values[1] == pytest.approx(math.log(1 / 0.01)), "all A against all B: finite only through alpha"
    assert values[2] == pytest.approx(0.0, abs=1e-12), "the list has the history's mix"
    assert math.isnan(values[3]), "no history, no calibration"


def test_vector_clusters_put_items_that_point_the_same_way_together() -> None:
    rng = np.random.default_rng(0)
    vectors = np.vstack([np.zeros((1, 3)), [1, 0, 0] + 0.05 * rng.normal(size=(5, 3)),
                         [0, 0, 1] + 0.05 * rng.normal(size=(5, 3))])
    one_hot = vector_clusters(vectors, clusters=2)
    labels = one_hot[1:].argmax(axis=1)
    assert one_hot[0].sum() == 0 and (one_hot[1:].sum(axis=1) == 1).all()
    assert len(set(labels[:5])) == 1 and len(set(labels[5:])) == 1 and labels[0] != labels[5]


def _cases() -> EvaluationCases:
    histories = [np.array([3]), np.array([3, 3]), np.array([3, 3, 3]), np.array([3, 3, 3, 3]), np.array([3] * 5)]
    return EvaluationCases(
        inputs=torch.full((5, 4), 3, dtype=torch.long),
        targets=torch.tensor([1, 2, 1, 2, 1]),
        histories=histories,
        training_lengths=np.array([len(h) for h in histories]),
        users=np.arange(5),
    )


def test_evaluation_reports_diversity_and_calibration_overall_and_per_group() -> None:
    space = ItemSpace(torch.from_numpy(UNIT).float(), CATEGORIES, "hand-made")
    popularity = np.array([0, 10, 5, 1])
    report = evaluate(popularity_scorer(popularity), _cases(), popularity, num_users=5, space=space)
    # Item 3 is in every history and excluded: every list is [1, 2], orthogonal, so ILD 1; history all item 3
    # (half A, half B) against a list half A, half B: perfectly calibrated.
    assert report["items"]["ild@10"] == pytest.approx(1.0)
    assert report["items"]["miscalibration@10"] == pytest.approx(0.0, abs=1e-12)
    for group in ("tail", "torso", "head"):
        assert report["groups"][group]["ild@10"] == pytest.approx(1.0)
        assert report["groups"][group]["coverage@10"] == pytest.approx(2 / 3)
    assert report["item_space"] == "hand-made"
    without = evaluate(popularity_scorer(popularity), _cases(), popularity, num_users=5)
    assert "ild@10" not in without["items"] and "coverage@10" not in without["groups"]["tail"]


def test_a_model_is_measured_in_its_own_item_space_and_the_table_shows_it_beside_most_popular() -> None:
    torch.manual_seed(0)
    model = SASRec(ModelConfig(num_items=30, max_len=4, hidden=8, heads=2, blocks=1))
    space = item_space(model)
    assert space.categories.shape == (31, CATEGORY_CLUSTERS) and space.categories[0].sum() == 0
    assert "learned" in space.description
    popularity = np.arange(31)
    report = evaluate_with_baselines(model_scorer(model, torch.device("cpu")), _cases(), popularity, num_users=5)
    assert {"ild@10", "miscalibration@10"} <= set(report["baselines"]["most_popular"]["items"])
    table = format_metrics_table(report)
    assert "model ILD@10" in table and "most-popular MISCALIBRATION@10" in table and "learned" in table
