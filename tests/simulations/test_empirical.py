"""The one-run epsilon lower bound: valid (never above the truth too often) and not vacuous."""

from __future__ import annotations

import math

import numpy as np
import pytest

from simulations.empirical import audit_guesses, epsilon_lower_bound, p_value


def test_p_value_falls_as_the_null_epsilon_falls() -> None:
    values = [p_value(1000, 200, 150, eps, 1e-5) for eps in (0.0, 0.5, 1.0, 2.0)]
    assert values == sorted(values)
    assert values[0] < 1e-3  # 150 of 200 right is far beyond coin flipping (the rest is the delta term)


def test_chance_guesses_give_no_bound() -> None:
    rng = np.random.default_rng(0)
    members = rng.random(2000) < 0.5
    assert audit_guesses(rng.normal(size=2000), members, 1e-5).epsilon_lower_bound == 0.0


def test_perfect_guesses_give_a_clearly_positive_bound() -> None:
    rng = np.random.default_rng(1)
    members = rng.random(1000) < 0.5
    bound = audit_guesses(members + rng.normal(scale=0.01, size=1000), members, 1e-5)
    assert bound.epsilon_lower_bound > 3
    assert bound.best.correct == bound.best.guesses


def _randomized_response_scores(members: np.ndarray, epsilon: float, rng: np.random.Generator) -> np.ndarray:
    """An epsilon-DP release of each membership bit: the strongest attack epsilon allows."""
    keep = rng.random(len(members)) < math.exp(epsilon) / (1 + math.exp(epsilon))
    said = np.where(keep, members, ~members)
    return said + rng.normal(scale=1e-3, size=len(members))  # ties broken at random


def test_the_bound_is_valid_against_an_exactly_epsilon_dp_mechanism() -> None:
    """At 95% confidence, a bound above the true epsilon may happen in at most about 5% of audits."""
    rng = np.random.default_rng(2)
    true_epsilon, audits, above = 1.0, 60, 0
    bounds = []
    for _ in range(audits):
        members = rng.random(1000) < 0.5
        bound = audit_guesses(_randomized_response_scores(members, true_epsilon, rng), members, 0.0).epsilon_lower_bound
        bounds.append(bound)
        above += bound > true_epsilon
    assert above <= 0.1 * audits
    assert np.median(bounds) > 0.5 * true_epsilon  # and the audit is not vacuous against it


def test_the_bound_search_is_monotone_in_correct_guesses() -> None:
    bounds = [epsilon_lower_bound(1000, 100, v, 1e-5, 0.05) for v in (50, 70, 90, 100)]
    assert bounds[0] == 0.0 and bounds == sorted(bounds) and bounds[-1] > bounds[-2]


def test_bad_counts_are_rejected() -> None:
    with pytest.raises(Exception, match="correct <= guesses <= canaries"):
        p_value(10, 20, 5, 1.0, 0.0)
