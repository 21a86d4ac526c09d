"""Turning membership guesses about canaries into a statistically valid epsilon lower bound.

The one-run audit of Steinke, Nasr & Jagielski (2023, "Privacy Auditing with
One (1) Training Run", Theorem 3.1 / Algorithm 2): m canaries, each included
independently with probability 1/2; an auditor guesses membership for r of
them from the trained model alone and is right v times. Under (epsilon,
delta)-DP, v is at most Binomial(r, e^eps / (1 + e^eps)) plus a delta term, so
an observed v that would be too unlikely under epsilon rules that epsilon out.

Only the guess counts fixed *before* looking at the outcome keep the bound
valid; several counts are tried with a Bonferroni correction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from common.errors import ConfigError

GUESS_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.5)
"""Share of canaries guessed "in" (highest scores) and, as many, "out" (lowest); declared in advance."""


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Probability of at least v correct out of r guesses (m canaries) if the training were (epsilon, delta)-DP."""
    if not 0 <= v <= r <= m:
        raise ConfigError(f"need 0 <= correct <= guesses <= canaries, got {v}, {r}, {m}")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of epsilon-DP randomized response
    beta = float(stats.binom.sf(v - 1, r, q))
    # alpha = max over i of P[v > Binomial(r, q) >= v - i] / i, the delta term's weight.
    below = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, q))
    alpha = float(np.max(below / np.arange(1, v + 1))) if v > 0 else 0.0
    return min(1.0, beta + alpha * delta * 2 * m)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, significance: float) -> float:
    """The largest epsilon ruled out at this significance (0 when none is)."""
    if p_value(m, r, v, 0.0, delta) >= significance:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < significance:
        low, high = high, high * 2
        if high > 100:
            return low
    for _ in range(40):
        middle = (low + high) / 2
        if p_value(m, r, v, middle, delta) < significance:
            low = middle
        else:
            high = middle
    return low


@dataclass(frozen=True)
class GuessOutcome:
    fraction: float
    guesses: int
    correct: int
    epsilon_lower_bound: float


@dataclass(frozen=True)
class EmpiricalBound:
    epsilon_lower_bound: float
    confidence: float
    canaries: int
    members: int
    best: GuessOutcome
    outcomes: list[GuessOutcome]


def audit_guesses(
    scores: ArrayLike, members: ArrayLike, delta: float, confidence: float = 0.95,
    fractions: Sequence[float] = GUESS_FRACTIONS,
) -> EmpiricalBound:
    """Guess "in" for the highest-scored canaries and "out" for the lowest, at each declared share.

    Each share is tested at significance (1 - confidence) / len(fractions), so
    the best of them is still a valid lower bound at ``confidence``.
    """
    score_array, member_array = np.asarray(scores, dtype=float), np.asarray(members, dtype=bool)
    m = len(score_array)
    if m == 0 or len(member_array) != m:
        raise ConfigError("need one membership flag per canary score, and at least one canary")
    order = np.argsort(-score_array, kind="stable")
    significance = (1.0 - confidence) / len(fractions)
    outcomes = []
    for fraction in fractions:
        k = max(1, min(m // 2, int(round(fraction * m))))
        guessed_in, guessed_out = order[:k], order[m - k :]
        correct = int(member_array[guessed_in].sum() + (~member_array[guessed_out]).sum())
        outcomes.append(
            GuessOutcome(fraction, 2 * k, correct, epsilon_lower_bound(m, 2 * k, correct, delta, significance))
        )
    best = max(outcomes, key=lambda outcome: outcome.epsilon_lower_bound)
    return EmpiricalBound(best.epsilon_lower_bound, confidence, m, int(member_array.sum()), best, outcomes)
