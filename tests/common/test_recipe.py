"""The recipe rule of the one-noise placements (``common.recipe``): what it chooses, and that it keeps its promises."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from common.data.split import training_examples, users_with_training_pairs
from common.errors import ConfigError
from common.federation import RunSettings
from common.privacy.accounting import calibrate_noise
from common.recipe import (
    MAX_ROUNDS,
    MAX_SAMPLE_RATE,
    NOISE_ON_MEAN,
    PublicFacts,
    choose_recipe,
    expected_batch,
    round_grid,
    rounded_estimate,
)
from server.central_noise import central_noise_multiplier


def test_the_development_data_gets_the_recipe_it_was_set_on() -> None:
    """MovieLens-100K at epsilon 8 (about 940 users): 80 rounds at 0.25, the noise level the rule is anchored to."""
    recipe = choose_recipe(PublicFacts(940, 1682, 5, 8.0, 1e-5))
    assert (recipe.rounds, recipe.sample_rate, recipe.batch_size) == (80, 0.25, 235)
    assert recipe.server_learning_rate == pytest.approx(1e-2 * math.sqrt(0.5))
    assert recipe.noise_on_mean == pytest.approx(recipe.noise_multiplier / 235)
    assert "user_update" not in recipe.settings(), "each user's contribution stays the declared one-gradient default"


@pytest.mark.parametrize("users", [3_000, 6_000, 22_000])
def test_it_takes_the_most_rounds_whose_noise_on_the_mean_stays_under_the_level(users: int) -> None:
    facts = PublicFacts(users, 3000, 5, 8.0, 1e-5)
    recipe = choose_recipe(facts)
    assert recipe.rounds > 40, "a larger federation affords more, smaller steps"
    assert recipe.noise_on_mean <= NOISE_ON_MEAN
    assert recipe.rounds * recipe.sample_rate == pytest.approx(facts.passes), "the same gradient work"
    more = recipe.rounds * 2
    if more <= MAX_ROUNDS:  # the next candidate would have passed the level (recomputed, not read from the rule)
        rate = facts.passes / more
        assert calibrate_noise(8.0, 1e-5, rate, more) / expected_batch(rate, users) > NOISE_ON_MEAN
    assert recipe.server_learning_rate == pytest.approx(1e-2 * math.sqrt(40 / recipe.rounds))
    assert recipe.evaluate_every >= 1 and recipe.rounds / recipe.evaluate_every <= 8


def test_a_small_federation_or_epsilon_gets_the_fewest_rounds_at_the_largest_rate() -> None:
    recipe = choose_recipe(PublicFacts(600, 9000, 5, 1.0, 1e-5))
    assert (recipe.rounds, recipe.sample_rate) == (40, MAX_SAMPLE_RATE)
    assert recipe.noise_on_mean > NOISE_ON_MEAN and "above" in recipe.why


def test_more_users_never_means_fewer_rounds() -> None:
    rounds = [choose_recipe(PublicFacts(users, 1000, 5, 4.0, 1e-5)).rounds for users in (500, 2_000, 8_000, 32_000)]
    assert rounds == sorted(rounds) and rounds[-1] > rounds[0]


def test_the_run_calibrates_the_noise_the_rule_reasoned_with() -> None:
    recipe = choose_recipe(PublicFacts(3_000, 500, 5, 8.0, 1e-5))
    settings = RunSettings(noise="central", **recipe.settings())
    assert central_noise_multiplier(settings) == pytest.approx(recipe.noise_multiplier)


def test_the_grid_and_the_estimate() -> None:
    assert round_grid(20) == [40, 80, 160, 320, 640]
    assert round_grid(0.3) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    assert [rounded_estimate(n) for n in (7, 943, 6040, 22363)] == [7, 940, 6000, 22000]
    # users 1-4 train (lengths 2, 4, 5, 9: 1, 1, 2, 6 pairs); a history of 3 is only held out, one of 1 gives nothing
    frame = pd.DataFrame({"user": [1] * 2 + [2] * 4 + [3] * 5 + [4] * 9 + [5] * 3 + [6], "item": range(24),
                          "timestamp": range(24)})
    assert users_with_training_pairs(frame.groupby("user").size().to_numpy()) == 4
    sequences = [np.arange(n) for n in frame.groupby("user").size()]
    assert len(training_examples(sequences, max_len=10)) == 4, "the count the split itself trains on"


@pytest.mark.parametrize("facts, named", [
    (PublicFacts(1, 100, 5, 8.0, 1e-5), "users estimate 1"),
    (PublicFacts(900, 100, 5, 8.0, 1e-5, passes=0), "compute passes 0"),
    (PublicFacts(900, 100, 5, 0.0, 1e-5), "epsilon 0.0"),
])
def test_facts_it_cannot_use_are_named(facts: PublicFacts, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        choose_recipe(facts)
