"""The MMR re-ranker and its repetition penalty on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.data.split import EvaluationCases
from common.errors import ConfigError
from common.recommender.evaluation import evaluate
from common.recommender.metrics import exclusion_mask
from common.recommender.rerank import DiversityOptions, diversify, diversity_reorder, reranked_scores

# Items 1 and 2 are the same direction, 3 is orthogonal to both; 0 is padding.
UNIT = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
SCORES = torch.tensor([[5.0, 1.0, 0.9, 0.5]])
EXCLUDED = torch.tensor([[True, False, False, False]])


def test_no_diversity_keeps_the_models_order() -> None:
    order, _ = diversify(SCORES, EXCLUDED, UNIT, DiversityOptions(0.0, 0.0), depth=3)
    assert order.tolist() == [[1, 2, 3]]


def test_mmr_trades_relevance_against_similarity_to_what_was_chosen() -> None:
    # Relevance over the candidates: item 1 -> 1, item 2 -> (0.9 - 0.5) / 0.5 = 0.8, item 3 -> 0.
    # Step 1: item 1 (0.5 * 1). Step 2: item 2 is 0.5 * 0.8 - 0.5 * 1 = -0.1, item 3 is 0: item 3. Then item 2.
    order, values = diversify(SCORES, EXCLUDED, UNIT, DiversityOptions(diversity=0.5, repeat_penalty=0.0), depth=3)
    assert order.tolist() == [[1, 3, 2]]
    assert values[0].tolist() == pytest.approx([0.5, 0.0, -0.1])


def test_the_repetition_penalty_moves_shown_items_down() -> None:
    shown = torch.tensor([[False, True, False, False]])
    options = DiversityOptions(diversity=0.0, repeat_penalty=0.5)
    order, values = diversify(SCORES, EXCLUDED, UNIT, options, depth=3, shown=shown)
    assert order.tolist() == [[2, 1, 3]]  # item 1's relevance 1 - 0.5 falls below item 2's 0.8
    assert values[0].tolist() == pytest.approx([0.8, 0.5, 0.0])


def test_rows_with_few_items_left_end_in_infinite_values_and_keep_their_scores() -> None:
    excluded = torch.tensor([[True, False, True, True]])
    order, values = diversify(SCORES, excluded, UNIT, DiversityOptions(diversity=0.3, repeat_penalty=0.0), depth=3)
    assert order[0, 0] == 1 and torch.isneginf(values[0, 1:]).all()
    rescored = reranked_scores(SCORES, order, values)
    assert rescored[0, 1] > rescored[0, 0], "item 1 is lifted above everything"


def test_evaluation_ranks_targets_by_the_reranked_list() -> None:
    cases = EvaluationCases(
        inputs=torch.ones((1, 2), dtype=torch.long), targets=torch.tensor([3]),
        histories=[np.array([], dtype=np.int64)], training_lengths=np.array([1]), users=np.arange(1),
    )
    plain = evaluate(lambda inputs: SCORES, cases, np.array([0, 3, 2, 1]), num_users=1)
    mixed = evaluate(lambda inputs: SCORES, cases, np.array([0, 3, 2, 1]), num_users=1,
                     reorder=diversity_reorder(UNIT, DiversityOptions(diversity=0.5, repeat_penalty=0.0), depth=3))
    assert plain["overall"]["mrr@10"] == pytest.approx(1 / 3)
    assert mixed["overall"]["mrr@10"] == pytest.approx(1 / 2), "item 3 moved up to second"
    assert exclusion_mask(cases.histories, cases.targets, 4)[0, 0]


@pytest.mark.parametrize(("diversity", "penalty"), [(1.0, 0.0), (-0.1, 0.0), (0.2, 1.5)])
def test_options_out_of_range_are_refused(diversity: float, penalty: float) -> None:
    with pytest.raises(ConfigError, match="diversity"):
        DiversityOptions(diversity, penalty)
