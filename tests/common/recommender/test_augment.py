"""Pseudo-prior items: the reversed model's predecessors, and how short histories are extended with them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.errors import ConfigError
from common.recommender.augment import AugmentOptions, PseudoPrior, augmented_inputs
from common.recommender.model import ModelConfig, SASRec
from common.recommender.ranking import model_prior

# Item i's predecessors, best first: 1 <- 2 <- 3 <- 4, and 4's best predecessor is 1 (already used, so 2).
TABLE = np.array([[0, 0, 0], [2, 3, 4], [3, 1, 4], [4, 1, 2], [1, 2, 3]])


def test_generation_walks_back_from_the_first_item_and_never_repeats_one() -> None:
    pseudo = PseudoPrior(TABLE)
    assert pseudo.generate([1], 2) == [3, 2]
    assert pseudo.generate([1, 4], 3) == [3, 2], "4 is in the history; from 3 every predecessor is used"
    assert pseudo.generate([], 3) == [], "a cold start has no first item to walk back from"


def test_short_histories_get_pseudo_items_before_them_up_to_the_target_length() -> None:
    inputs = torch.tensor([[0, 0, 0, 0, 1], [0, 0, 0, 0, 0], [0, 1, 2, 3, 4]])
    out = augmented_inputs(inputs, PseudoPrior(TABLE), AugmentOptions(augment_to=3))
    assert out.tolist() == [[0, 0, 3, 2, 1], [0, 0, 0, 0, 0], [0, 1, 2, 3, 4]]
    assert torch.equal(augmented_inputs(inputs, PseudoPrior(TABLE), AugmentOptions()), inputs), "0 is off"


def test_the_predecessors_are_the_bayes_reversal_of_the_forward_model() -> None:
    torch.manual_seed(3)
    model = SASRec(ModelConfig(num_items=12, max_len=4, hidden=8, heads=2, blocks=1)).eval()
    pseudo = PseudoPrior.from_model(model)
    with torch.no_grad():
        log_next = torch.log_softmax(model.last_scores(torch.arange(1, 13).unsqueeze(1)), dim=1)  # row j - 1
    log_prior = torch.log(model_prior(model))
    for item in range(1, 13):
        joint = {j: float(log_next[j - 1, item] + log_prior[j]) for j in range(1, 13) if j != item}
        assert pseudo.predecessors[item, 0] == max(joint, key=joint.get)
        assert item not in pseudo.predecessors[item].tolist()


def test_a_negative_length_is_refused() -> None:
    with pytest.raises(ConfigError, match="augment-to"):
        AugmentOptions(-1)
