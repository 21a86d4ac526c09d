"""Metrics on hand-computed cases: known rankings give known numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.data.split import EvaluationCases
from common.errors import NonFiniteError
from common.recommender.evaluation import evaluate, model_scorer, popularity_scorer
from common.recommender.metrics import exclusion_mask, item_metrics, rank_targets, ranking_metrics, top_k, user_groups
from common.recommender.model import ModelConfig, SASRec


def test_known_ranks_give_known_hr_ndcg_mrr() -> None:
    metrics = ranking_metrics(np.array([0, 1, 9, 10, 25]), ks=(10, 20))
    assert metrics["hr@10"] == pytest.approx(3 / 5)
    assert metrics["hr@20"] == pytest.approx(4 / 5)
    expected_ndcg10 = (1 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(11)) / 5
    assert metrics["ndcg@10"] == pytest.approx(expected_ndcg10)
    assert metrics["ndcg@20"] == pytest.approx(expected_ndcg10 + (1 / math.log2(12)) / 5)
    assert metrics["mrr@10"] == pytest.approx((1 + 1 / 2 + 1 / 10) / 5)


def test_rank_over_the_full_catalogue_excludes_seen_items_but_not_the_target() -> None:
    # indices 0..5; 0 is padding. Scores: item 5 best, then 4, 3, 2, 1.
    scores = torch.tensor([[9.0, 1.0, 2.0, 3.0, 4.0, 5.0], [9.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    targets = torch.tensor([3, 4])
    histories = [np.array([5, 4]), np.array([4, 1])]  # user 2's target is a repeat of a seen item
    excluded = exclusion_mask(histories, targets, 6)
    assert excluded[:, 0].all(), "padding is never recommended"
    assert excluded[0, 5] and excluded[0, 4] and not excluded[0, 3]
    assert not excluded[1, 4], "the target stays rankable even if seen before"
    ranks = rank_targets(scores, targets, excluded)
    # user 1: 5 and 4 are excluded, padding too: item 3 is first. user 2: only item 5 beats item 4.
    assert ranks.tolist() == [0, 1]
    assert top_k(scores, excluded, 2).tolist() == [[3, 2], [5, 4]]


def test_without_exclusion_seen_items_would_push_the_target_down() -> None:
    scores = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    targets = torch.tensor([1])
    no_history = exclusion_mask([np.array([], dtype=np.int64)], targets, 4)
    with_history = exclusion_mask([np.array([2, 3])], targets, 4)
    assert rank_targets(scores, targets, no_history).item() == 2
    assert rank_targets(scores, targets, with_history).item() == 0


def test_ties_with_the_target_count_against_it() -> None:
    scores = torch.zeros((1, 5))
    targets = torch.tensor([2])
    excluded = exclusion_mask([np.array([], dtype=np.int64)], targets, 5)
    assert rank_targets(scores, targets, excluded).item() == 3, "a constant scorer must not get credit"


def test_groups_split_bottom_and_top_20_percent_and_keep_ties_together() -> None:
    lengths = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    groups = user_groups(lengths)
    assert groups.tolist() == ["tail"] * 2 + ["torso"] * 6 + ["head"] * 2
    tied = np.array([3, 3, 3, 3, 5, 6, 7, 9, 9, 9])
    groups = user_groups(tied)
    assert set(groups[tied == 3]) == {"tail"}, "users of the tail threshold length are all tail"
    assert set(groups[tied == 9]) == {"head"}
    assert (groups == "tail").sum() == 4 and (groups == "head").sum() == 3


def test_groups_never_overlap_when_almost_everyone_has_the_same_length() -> None:
    lengths = np.array([3] * 9 + [50])
    groups = user_groups(lengths)
    assert (groups == "tail").sum() == 9
    assert groups[-1] == "head"
    assert user_groups(np.array([4] * 5)).tolist() == ["tail"] * 5


def test_item_metrics_on_a_hand_computed_case() -> None:
    # 5 items (indices 1..5); popularity: item 1 most popular (the top 20% = 1 item).
    popularity = np.array([0, 10, 5, 3, 1, 0])
    recommended = np.array([[1, 2], [1, 3]])
    metrics = item_metrics(recommended, popularity, num_users=10, k=2)
    assert metrics["coverage@2"] == pytest.approx(3 / 5)
    assert metrics["tail_share@2"] == pytest.approx(2 / 4)
    counts = np.sort(np.array([2, 1, 1, 0, 0], dtype=float))
    n = 5
    gini = sum((2 * (i + 1) - n - 1) * c for i, c in enumerate(counts)) / (n * counts.sum())
    assert metrics["gini@2"] == pytest.approx(gini)
    info = lambda count: -math.log2((count + 1) / 11)  # noqa: E731
    assert metrics["novelty@2"] == pytest.approx((2 * info(10) + info(5) + info(3)) / 4)


def test_evaluate_reports_overall_groups_and_items_with_sizes() -> None:
    popularity = np.array([0, 50, 40, 30, 20, 10, 5, 1, 0, 0, 0])
    histories = [np.array([1] * length) for length in (1, 1, 2, 3, 4, 5, 6, 7, 8, 9)]
    cases = EvaluationCases(
        inputs=torch.ones((10, 4), dtype=torch.long),
        targets=torch.tensor([2, 3, 4, 5, 6, 7, 8, 9, 10, 2]),
        histories=histories,
        training_lengths=np.array([len(h) for h in histories]),
        users=np.arange(10),
    )
    report = evaluate(popularity_scorer(popularity), cases, popularity, num_users=10)
    # Most-popular with item 1 excluded ranks 2, 3, 4, ... so target 2 has rank 0, target 3 rank 1, ...
    expected_ranks = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 0])
    assert report["overall"]["ndcg@10"] == pytest.approx(ranking_metrics(expected_ranks)["ndcg@10"])
    assert report["overall"]["users"] == 10
    assert {g: report["groups"][g]["users"] for g in ("tail", "torso", "head")} == {"tail": 2, "torso": 6, "head": 2}
    assert report["groups"]["tail"]["hr@10"] == pytest.approx(1.0)
    assert report["items"]["coverage@10"] == pytest.approx(9 / 10)


def test_top_k_never_returns_excluded_items_when_few_are_left() -> None:
    scores = torch.tensor([[0.0, 3.0, 2.0, 1.0]])
    excluded = exclusion_mask([np.array([1, 2])], torch.tensor([3]), 4)
    assert top_k(scores, excluded, 3).tolist() == [[3, 0, 0]]
    metrics = item_metrics(np.array([[3, 0, 0]]), np.array([0, 5, 3, 1]), num_users=4, k=3)
    assert metrics["coverage@3"] == pytest.approx(1 / 3)
    assert metrics["tail_share@3"] == pytest.approx(1.0)


def _cases(users: int, items: int) -> EvaluationCases:
    histories = [np.array([1 + u % items]) for u in range(users)]
    return EvaluationCases(
        inputs=torch.tensor([[0, 1 + u % items] for u in range(users)]),
        targets=torch.tensor([1 + (u + 1) % items for u in range(users)]),
        histories=histories,
        training_lengths=np.ones(users, dtype=np.int64),
        users=np.arange(users),
    )


def test_an_all_nan_model_is_refused_rather_than_scored_perfect() -> None:
    """NaN >= NaN is false: ranked by #(scores >= target score), every target of a NaN model would rank first and
    score NDCG@10 = 1.0. Evaluation refuses it with one line and reports nothing."""
    model = SASRec(ModelConfig(num_items=20, max_len=4, hidden=8, heads=2, blocks=1))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(float("nan"))
    popularity = np.arange(21)
    with pytest.raises(NonFiniteError, match="evaluation refused: the model's scores hold NaN or infinity for 12 of 12"
                       ) as refused:
        evaluate(model_scorer(model, torch.device("cpu")), _cases(12, 20), popularity, num_users=12)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_one_non_finite_score_is_refused_and_minus_infinity_ranks_last(bad: float) -> None:
    scores = torch.tensor([[0.0, 3.0, 2.0, 1.0], [0.0, 1.0, 2.0, 3.0]])
    excluded = torch.zeros((2, 4), dtype=torch.bool)
    targets = torch.tensor([3, 3])
    broken = scores.clone()
    broken[1, 2] = bad
    with pytest.raises(NonFiniteError, match="for 1 of 2 users"):
        rank_targets(broken, targets, excluded)
    never = scores.clone()
    never[0, 3] = float("-inf")  # re-ranking's "never recommend": ranks last, and is no error
    assert rank_targets(never, targets, excluded).tolist() == [3, 0]
