"""The DP popularity floor at a site: each user's contribution is clipped, the release is noised at the calibrated
sigma, charged in the ledger as its own line, composed with training by the same accountant, and training's noise is
calibrated on what the target leaves."""

from __future__ import annotations

import math
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting.pld import pld_privacy_accountant

from client.popularity import clipped_popularity_sum, release_site_popularity
from client.site_round import train_site_round
from common.data.split import training_examples
from common.errors import ConfigError
from common.federation import RunSettings
from common.privacy.accounting import PLD_DISCRETIZATION, epsilon_from_history
from common.privacy.ledger import Ledger
from common.privacy.mechanisms import CENTRAL_POPULARITY_TRUST, DISTRIBUTED_TRUST, POPULARITY
from common.privacy.popularity import (
    POPULARITY_ARRAY,
    POPULARITY_BOUND,
    popularity_mechanism,
    popularity_step,
    training_noise,
)
from common.protocol.round_plan import LocalTraining, PrivacyPlan, plan_round
from common.recommender.model import ModelConfig, SASRec

ITEMS = 60
BOUNDED = popularity_mechanism(8.0, 1e-5, 0.1, "site")
"""The release's mechanism: its individual half bounds each user's vector (its noise is not used here)."""
CONFIG = ModelConfig(num_items=ITEMS, max_len=8, hidden=16, heads=2, blocks=1, dropout=0.0)


def _examples(sizes: list[int], seed: int = 0):
    rng = np.random.default_rng(seed)
    sequences = [rng.choice(np.arange(1, ITEMS + 1), size=size, replace=False) for size in sizes]
    return training_examples(sequences, CONFIG.max_len)


def test_one_user_moves_the_sum_by_at_most_the_bound_however_many_items_they_have() -> None:
    others = _examples([3, 5, 9, 4], seed=1)
    for size in (2, 5, 40):  # the training example keeps the last max_len + 1 items: still many
        heavy = _examples([size], seed=size)
        both = type(others)(torch.cat([others.inputs, heavy.inputs]), torch.cat([others.targets, heavy.targets]))
        moved = clipped_popularity_sum(both, ITEMS, BOUNDED) - clipped_popularity_sum(others, ITEMS, BOUNDED)
        assert float(moved.norm()) == pytest.approx(POPULARITY_BOUND, rel=1e-9), size
        assert float(moved[0]) == 0.0, "padding is not an item"
        assert int((moved > 0).sum()) == len(set(heavy.inputs.flatten().tolist() + heavy.targets.flatten().tolist())
                                               - {0})


def test_the_release_is_charged_as_its_own_ledger_line_and_its_epsilon_recomputed(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "site-3.jsonl")
    privacy = PrivacyPlan(target_epsilon=4.0, delta=1e-4, popularity_share=0.25)
    outcome = release_site_popularity(_examples([4, 6, 7]), ITEMS, privacy, ledger, "run-a", "3")
    assert outcome.state_dict is not None and outcome.state_dict[POPULARITY_ARRAY].shape == (ITEMS + 1,)
    [line] = ledger.entries()
    assert (line["round"], line["sample_rate"], line["steps"], line["max_grad_norm"]) == (0, 1.0, 1, POPULARITY_BOUND)
    assert line["release"] == POPULARITY.release and line["users"] == 3
    fresh = pld_privacy_accountant.PLDAccountant(  # the site's accountant, built here
        dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE, value_discretization_interval=PLD_DISCRETIZATION
    )
    fresh.compose(dp_accounting.GaussianDpEvent(line["noise_multiplier"]))
    recomputed = fresh.get_epsilon(1e-4)
    assert line["accountant"] == "pld" and outcome.epsilon == pytest.approx(recomputed, rel=1e-3)
    assert recomputed <= 1.0 and recomputed == pytest.approx(1.0, abs=0.01), "a quarter of the target"


def test_the_released_vector_carries_noise_of_std_sigma(tmp_path: Path) -> None:
    items = 20_000
    examples = training_examples([np.arange(1, 6)], CONFIG.max_len)
    privacy = PrivacyPlan(target_epsilon=8.0, delta=1e-5, popularity_share=0.1)
    sigma = popularity_step(8.0, 1e-5, 0.1)[0]
    outcome = release_site_popularity(examples, items, privacy, Ledger(tmp_path / "s.jsonl"), "run-a", "1")
    assert outcome.state_dict is not None
    noise = outcome.state_dict[POPULARITY_ARRAY].double()[1:] - clipped_popularity_sum(examples, items, BOUNDED)[1:]
    assert float(noise.std()) == pytest.approx(sigma * POPULARITY_BOUND, rel=6 * math.sqrt(1 / (2 * items)) + 0.005)
    assert abs(float(noise.mean())) < 6.5 * sigma / math.sqrt(items)


def test_under_central_noise_the_site_sends_the_exact_clipped_sum_and_its_ledger_says_who_adds_the_noise(
    tmp_path: Path,
) -> None:
    ledger = Ledger(tmp_path / "site-2.jsonl")
    examples = _examples([4, 6, 7])
    privacy = PrivacyPlan(target_epsilon=4.0, delta=1e-4, popularity_share=0.25, noise_placement="central")
    outcome = release_site_popularity(examples, ITEMS, privacy, ledger, "run-a", "2")
    assert outcome.state_dict is not None
    exact = clipped_popularity_sum(examples, ITEMS, BOUNDED).float()
    assert torch.equal(outcome.state_dict[POPULARITY_ARRAY], exact), "no noise at the site: the coordinator adds it"
    [line] = ledger.entries()
    assert line["noise_placement"] == "central" and line["trust"] == CENTRAL_POPULARITY_TRUST
    assert line["noise_multiplier"] == popularity_step(4.0, 1e-4, 0.25)[0], "the noise the coordinator must add"
    assert outcome.epsilon == pytest.approx(epsilon_from_history([popularity_step(4.0, 1e-4, 0.25)], 1e-4))


def test_under_distributed_noise_the_site_adds_its_share_alone_and_records_the_fallback(tmp_path: Path) -> None:
    items, shares = 20_000, 4
    examples = training_examples([np.arange(1, 6)], CONFIG.max_len)
    privacy = PrivacyPlan(target_epsilon=8.0, delta=1e-5, popularity_share=0.1, noise_placement="distributed",
                          noise_shares=shares)
    sigma = popularity_step(8.0, 1e-5, 0.1)[0]
    ledger = Ledger(tmp_path / "site-1.jsonl")
    outcome = release_site_popularity(examples, items, privacy, ledger, "run-a", "1", sum_bound=100)
    assert outcome.state_dict is not None
    noise = outcome.state_dict[POPULARITY_ARRAY].double()[1:] - clipped_popularity_sum(examples, items, BOUNDED)[1:]
    share = sigma / math.sqrt(shares)
    assert float(noise.std()) == pytest.approx(share, rel=6 * math.sqrt(1 / (2 * items)) + 0.005)
    [line] = ledger.entries()
    assert line["noise_placement"] == "distributed" and line["trust"] == DISTRIBUTED_TRUST
    assert line["noise_multiplier"] == sigma and line["share_noise_multiplier"] == pytest.approx(share)
    alone = epsilon_from_history([(share, 1.0, 1)], 1e-5)
    assert line["fallback_epsilon_so_far"] == pytest.approx(alone) and alone > outcome.epsilon


def test_a_distributed_release_is_projected_onto_the_public_bound(tmp_path: Path) -> None:
    examples = _examples([4, 6, 7, 5, 8, 3] * 10)
    exact = clipped_popularity_sum(examples, ITEMS, BOUNDED)
    assert float(exact.norm()) > 5.0
    privacy = PrivacyPlan(target_epsilon=1e4, delta=1e-4, popularity_share=0.5, noise_placement="distributed")
    outcome = release_site_popularity(examples, ITEMS, privacy, Ledger(tmp_path / "s.jsonl"), "run-a", "1",
                                      sum_bound=5)
    assert outcome.state_dict is not None
    sent = outcome.state_dict[POPULARITY_ARRAY].double()
    sigma = popularity_step(1e4, 1e-4, 0.5)[0]
    expected = exact * (5.0 / float(exact.norm()))
    assert float((sent[1:] - expected[1:]).abs().max()) < 8 * sigma, "the projected sum plus a tiny noise"
    with pytest.raises(ConfigError, match="public bound"):
        release_site_popularity(examples, ITEMS, privacy, Ledger(tmp_path / "t.jsonl"), "run-a", "1")


def test_a_repeated_query_resends_the_release_and_a_site_over_budget_declines(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "site-3.jsonl")
    privacy = PrivacyPlan(target_epsilon=4.0, delta=1e-4, popularity_share=0.25)
    examples = _examples([4, 6, 7])
    first = release_site_popularity(examples, ITEMS, privacy, ledger, "run-a", "3")
    again = release_site_popularity(examples, ITEMS, privacy, ledger, "run-a", "3")
    assert len(ledger.entries()) == 1 and again.state_dict is not None and first.state_dict is not None
    assert torch.equal(again.state_dict[POPULARITY_ARRAY], first.state_dict[POPULARITY_ARRAY])
    tight = PrivacyPlan(target_epsilon=4.0, delta=1e-4, popularity_share=0.25, max_epsilon=1.2)
    declined = release_site_popularity(examples, ITEMS, tight, ledger, "run-b", "3")
    assert declined.state_dict is None and "above its budget of 1.2" in declined.declined_reason
    assert len(ledger.entries()) == 1


@pytest.mark.parametrize(("epsilon", "share"), [(8.0, 0.3), (1.0, 0.3)])
def test_training_noise_is_calibrated_on_what_the_release_leaves_and_the_total_meets_the_target(
    epsilon: float, share: float
) -> None:
    training = LocalTraining(sample_rate=0.1, local_epochs=1.0)
    alone = plan_round(training, PrivacyPlan(target_epsilon=epsilon, delta=1e-5, planned_rounds=20))
    after = plan_round(training, PrivacyPlan(target_epsilon=epsilon, delta=1e-5, planned_rounds=20,
                                             popularity_share=share))
    assert after.noise_multiplier > alone.noise_multiplier
    history = [popularity_step(epsilon, 1e-5, share), (after.noise_multiplier, after.sample_rate, after.steps * 20)]
    total = epsilon_from_history(history, 1e-5)
    assert total <= epsilon and total == pytest.approx(epsilon, rel=0.01)


def test_a_site_that_released_popularity_then_trains_every_round_within_the_target(tmp_path: Path) -> None:
    """The ledger's popularity line composes with the training lines: all planned rounds fit the target exactly."""
    ledger = Ledger(tmp_path / "site-1.jsonl")
    examples = _examples([5, 6, 7, 8, 9, 4, 5, 6])
    privacy = PrivacyPlan(target_epsilon=3.0, delta=1e-4, planned_rounds=2, popularity_share=0.3)
    assert release_site_popularity(examples, ITEMS, privacy, ledger, "run-a", "1").state_dict is not None
    training = LocalTraining(sample_rate=0.5, batch_size=4)
    model = SASRec(CONFIG)
    for round_number in (1, 2):
        outcome = train_site_round(model, examples, training, privacy, ledger, "run-a", round_number, "1",
                                   torch.device("cpu"), round_number)
        assert outcome.state_dict is not None, outcome.declined_reason
    assert [line["round"] for line in ledger.entries()] == [0, 1, 2]
    assert outcome.epsilon <= 3.0 and outcome.epsilon == pytest.approx(3.0, abs=0.05)


def test_a_share_that_leaves_nothing_is_refused() -> None:
    with pytest.raises(ConfigError, match="popularity-share=1.0"):
        RunSettings(popularity_share=1.0)
    with pytest.raises(ConfigError, match="the popularity release alone spends the whole target epsilon"):
        training_noise([(0.5, 1.0, 1)], 1.0, 1e-5, 0.1, 10)
