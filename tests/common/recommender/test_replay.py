"""The replay loop on a tiny deterministic model: "the next item is the last one plus 1"."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.data.catalog import PADDING_INDEX
from common.recommender.replay import Reranking, replay
from common.recommender.rerank import DiversityOptions

ITEMS = 8  # indices 0 (padding) .. 7


def next_one(inputs: torch.Tensor) -> torch.Tensor:
    """Scores -|i - (last + 1)|: the item after the last one first, then its neighbours."""
    last = inputs[:, -1].float().unsqueeze(1)
    return -(torch.arange(ITEMS).float().unsqueeze(0) - (last + 1)).abs()


SEQUENCES = [np.array([1, 2, 3, 4, 5]), np.array([6, 7])]  # the second user is too short for 3 steps


def test_a_model_that_follows_the_user_hits_every_step_and_repeats_what_it_showed() -> None:
    report = replay(next_one, SEQUENCES, steps=3, max_len=6, k=2)
    # Lists: [3, 4], [4, 5], [5, 6]: every step hits; steps 2 and 3 each repeat one of their 2 slots.
    overall = report["overall"]
    assert overall["users"] == 1
    assert overall["cumulative_hits"] == pytest.approx([1.0, 2.0, 3.0])
    assert overall["first_hit_step"] == 1.0 and overall["no_hit_share"] == 0.0
    assert overall["repeat_rate"] == pytest.approx(2 / 4)


def test_the_repetition_penalty_stops_repeats_at_a_cost_in_hits() -> None:
    unit = torch.eye(ITEMS)[:, :ITEMS]
    unit[PADDING_INDEX] = 0.0
    report = replay(next_one, SEQUENCES, steps=3, max_len=6, k=2,
                    reranking=Reranking(unit, DiversityOptions(diversity=0.0, repeat_penalty=1.0)))
    # Step 2: item 4 was shown, its relevance 1 - 1 = 0 falls below 5's 2/3 and 6's 1/3: [5, 6], a miss.
    # Step 3: 5 (1 - 1 = 0) ties with 7 (0) and comes first by score: [5, 7], a hit, one repeat.
    overall = report["overall"]
    assert overall["cumulative_hits"] == pytest.approx([1.0, 1.0, 2.0])
    assert overall["repeat_rate"] == pytest.approx(1 / 4)


def test_groups_split_the_replayed_users() -> None:
    sequences = [np.arange(1, n + 1) % 7 + 1 for n in (4, 5, 6, 6, 7)]
    report = replay(next_one, sequences, steps=2, max_len=8, k=3)
    assert sum(report["groups"][g]["users"] for g in ("tail", "torso", "head")) == report["overall"]["users"] == 5
    assert len(report["groups"]["tail"]["cumulative_hits"]) == 2
