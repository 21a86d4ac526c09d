"""The recipe of a one-noise run (``noise = central`` or ``distributed``), chosen by a rule from public facts.

Under one noise over the federation every round is one DP-SGD step over all
sites' users (``server.central_noise``), so the run's sample rate ``q``, its
number of rounds ``T`` and the server's learning rate decide how much it can
learn. A fixed recipe (40 rounds at ``q = 0.5``) fits one size of data: on a
federation 6x MovieLens-100K's it stopped while validation was still rising,
because with 6x the users each step's mean gradient carries 1/6 the noise and
could have afforded many more steps.

The rule reads only public facts: an estimate of the user count (never a
site's exact count; the guarantee does not depend on it, only the utility
does), epsilon and delta, the number of sites, the item count, and a compute
budget stated as expected passes over every user (``compute-passes``:
``q * T``, so the gradient work is the same whatever ``T`` the rule picks).

1. Noise on each step's mean: ``nu(q, T) = sigma(q, T) / (q * N)``, the
   standard deviation the Gaussian adds to the mean clipped gradient, in units
   of the clip norm. Sander et al. (ICML 2023, "TAN without a burn") show that
   DP training at a fixed number of steps is governed by this ratio, not by
   ``sigma`` and the batch separately.
2. More steps while ``nu`` stays at or below ``NOISE_ON_MEAN``: the largest
   ``T`` on a doubling grid from ``passes / MAX_SAMPLE_RATE`` up to
   ``MAX_ROUNDS`` with ``q = passes / T``. Noise per step grows with ``T``
   (at fixed ``passes``, ``sigma / q`` grows like ``sqrt(T)``), the signal per
   step does not, so the rule stops where the noise would pass the level at
   which the development data learned best. Small federations and small
   epsilons cannot reach it even at the fewest steps: they get
   ``passes / MAX_SAMPLE_RATE`` rounds at ``MAX_SAMPLE_RATE``, the largest
   batch that keeps amplification by sampling.
3. The server's Adam learning rate: ``BASE_LEARNING_RATE * sqrt(BASE_ROUNDS /
   T)``. When noise dominates the mean gradient Adam moves every coordinate by
   about the learning rate per step in a random direction; scaling by
   ``1/sqrt(T)`` keeps that random walk's length where the development runs had
   it, while the signal's drift still grows with ``sqrt(T)``.
4. Validation about ``VALIDATIONS`` times per run (free: post-processing).
5. The expected batch ``q * N`` is the public divisor of each noisy sum.

The constants were set on public development data only (MovieLens-100K and the
built-in synthetic data; docs/results.md, "The recipe rule"), never on a site's
users, so choosing them spends no site's budget; the rule was then checked on
data of other sizes without changing them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from common.data.datasets import Dataset
from common.data.split import users_with_training_pairs
from common.errors import ConfigError
from common.privacy.accounting import calibrate_noise

NOISE_ON_MEAN = 0.0067
"""The noise std on each step's mean clipped gradient (clip norm 1) the rule allows: MovieLens-100K's at epsilon 8
with 80 rounds at sample rate 0.25 (sigma 1.572 over an expected batch of 235 users). Of the levels the two
development data sets' sweeps allow (40 to 320 rounds at the same 20 passes, docs/results.md) it scores best on
both together: both peaked at 80 rounds, and it puts the synthetic data at 160 (within 1% of its best)."""
MAX_SAMPLE_RATE = 0.5
"""The largest sample rate: above it subsampling amplifies little, and every user is in most steps."""
MAX_ROUNDS = 1024
"""The most rounds the rule picks: past it the per-round overhead of a federated round dominates the run."""
DEFAULT_PASSES = 20.0
"""The default compute budget: 20 expected passes over every user (the fixed recipe's 40 rounds at 0.5)."""
BASE_ROUNDS, BASE_LEARNING_RATE = 40, 1e-2
"""The server's Adam learning rate at 40 rounds (measured against 3e-2 on the development data); the rule's
``1/sqrt(T)`` scaling was checked at 160 rounds on MovieLens-100K (0.005 scored 0.0610, 0.01 scored 0.0511) and at
640 on Amazon Beauty (0.0025: 0.0128, 0.01: 0.0103)."""
VALIDATIONS = 8
"""About this many validations per run; model selection chooses among them."""
ONE_NOISE_PLACEMENTS = ("central", "distributed")
"""The placements whose rounds are single DP steps, and so whose recipe the rule chooses."""
FILLS = ("rounds", "sample_rate", "batch_size", "server_learning_rate", "evaluate_every")
"""The ``RunSettings`` fields the recipe fills when the command line does not give them."""


@dataclass(frozen=True)
class PublicFacts:
    """What the rule may read: nothing here is a site's private count."""

    users_estimate: int
    items: int
    sites: int
    epsilon: float
    delta: float
    passes: float = DEFAULT_PASSES


@dataclass(frozen=True)
class Recipe:
    """The run settings the rule fills in, and the facts and reasons behind them."""

    rounds: int
    sample_rate: float
    batch_size: int
    server_learning_rate: float
    evaluate_every: int
    noise_multiplier: float
    noise_on_mean: float
    why: str

    def settings(self) -> dict[str, Any]:
        """The ``FILLS`` fields (the command line's own values win over these)."""
        return {name: getattr(self, name) for name in FILLS}


def round_grid(passes: float) -> list[int]:
    """The candidate round counts: from ``passes / MAX_SAMPLE_RATE`` doubling up to ``MAX_ROUNDS``."""
    fewest = max(1, math.ceil(passes / MAX_SAMPLE_RATE))
    grid = [fewest]
    while grid[-1] * 2 <= MAX_ROUNDS:
        grid.append(grid[-1] * 2)
    return grid


def choose_recipe(facts: PublicFacts) -> Recipe:
    """The recipe for ``facts`` (see the module's docstring for the rule)."""
    problems = [
        f"users estimate {facts.users_estimate}: must be at least 2" * (facts.users_estimate < 2),
        f"compute passes {facts.passes}: must be positive" * (not facts.passes > 0),
        f"epsilon {facts.epsilon}: must be positive" * (not facts.epsilon > 0),
    ]
    if any(problems):
        raise ConfigError("recipe: " + "; ".join(p for p in problems if p))
    chosen: tuple[int, float, float] | None = None
    for rounds in round_grid(facts.passes):
        rate = min(MAX_SAMPLE_RATE, facts.passes / rounds)
        sigma = calibrate_noise(facts.epsilon, facts.delta, rate, rounds)
        if chosen is None or sigma / expected_batch(rate, facts.users_estimate) <= NOISE_ON_MEAN:
            chosen = (rounds, rate, sigma)
        else:
            break
    assert chosen is not None  # the grid is never empty
    rounds, rate, sigma = chosen
    batch = expected_batch(rate, facts.users_estimate)
    noise_on_mean = sigma / batch
    learning_rate = BASE_LEARNING_RATE * math.sqrt(BASE_ROUNDS / rounds)
    met = noise_on_mean <= NOISE_ON_MEAN
    why = (
        f"about {facts.users_estimate:,} users (public estimate), {facts.items:,} items, {facts.sites} sites, "
        f"epsilon {facts.epsilon:g}, delta {facts.delta:g}, {facts.passes:g} passes over every user: "
        f"{rounds} rounds at sample rate {rate:.4g} (expected batch {batch:,}), noise multiplier {sigma:.3f}, "
        f"noise on each step's mean {noise_on_mean:.4f} x clip "
        + (f"(at most {NOISE_ON_MEAN}: more rounds would pass it)" if met and rounds * 2 <= MAX_ROUNDS
           else f"(at most {NOISE_ON_MEAN}; the cap of {MAX_ROUNDS} rounds stops it)" if met
           else f"(above {NOISE_ON_MEAN} even at the fewest rounds: a small federation or a small epsilon)")
        + f"; the server's Adam at {learning_rate:.2g}"
    )
    return Recipe(rounds, rate, batch, learning_rate, max(1, math.ceil(rounds / VALIDATIONS)), sigma,
                  noise_on_mean, why)


def expected_batch(rate: float, users_estimate: int) -> int:
    """The public divisor of each noisy sum: the expected number of sampled users."""
    return max(1, round(rate * users_estimate))


def simulated_estimate(data: Dataset) -> int:
    """A simulation's public estimate of its federation's users: those with training pairs, to 2 significant digits
    (a simulation's operator owns the data; a deployment states its own estimate)."""
    return rounded_estimate(users_with_training_pairs(data.frame.groupby("user", sort=False).size().to_numpy()))


def rounded_estimate(count: int) -> int:
    """A simulation's public estimate of its user count: the count rounded to 2 significant digits."""
    if count < 1:
        return count
    digits = max(0, int(math.floor(math.log10(count))) - 1)
    return int(round(count, -digits))
