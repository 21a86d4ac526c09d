"""The DP popularity floor's accounting: a Gaussian release of item popularity before round 1, and training's
noise calibrated on what the run's target epsilon leaves after it.

Each user contributes one vector over the catalogue: the indicator of the
items in their training example, divided by the square root of how many there
are, so its L2 norm is at most ``POPULARITY_BOUND`` (1) however many items the
user has. Adding or removing one user moves the site's sum by at most that
bound, and the site adds N(0, sigma^2) to every entry: the Gaussian mechanism,
which the accountants take as one step at sample rate 1 with noise multiplier
sigma (``MechanismStep`` (sigma, 1.0, 1)). Its ledger line is composed with the
training lines by the same accountants, so the run's target epsilon covers
both: training's noise is calibrated on the *composition* (``training_noise``),
which under RDP or PLD leaves training more than target minus the release's own epsilon.
Everything here is a function of public run settings only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

from common.errors import ConfigError
from common.privacy.accounting import ACCOUNTANT, MechanismStep, epsilon_from_history
from common.privacy.mechanisms import POPULARITY
from common.privacy.mechanisms.gaussian import GaussianMechanism

POPULARITY_ARRAY = "popularity"
"""The key of a site's noisy vector in its reply's ArrayRecord."""
POPULARITY_BOUND = 1.0
"""Largest L2 norm of one user's popularity vector: the release's sensitivity (add or remove one user)."""
POPULARITY_SAMPLE_RATE = 1.0
POPULARITY_STEPS = 1
LARGEST_NOISE = 1e6
"""Calibration gives up above this noise multiplier: the budget left is too small to be useful."""


def popularity_step(target_epsilon: float, delta: float, share: float) -> MechanismStep:
    """The release as the accountants see it: sigma at which it alone costs ``share`` of ``target_epsilon``."""
    sigma = training_noise((), share * target_epsilon, delta, POPULARITY_SAMPLE_RATE, POPULARITY_STEPS)
    return sigma, POPULARITY_SAMPLE_RATE, POPULARITY_STEPS


def popularity_mechanism(
    target_epsilon: float, delta: float, share: float, placement: str, shares: int = 1
) -> GaussianMechanism:
    """The release as one Gaussian mechanism: per-user vectors of L2 norm at most ``POPULARITY_BOUND``, the noise of
    ``popularity_step``, added where ``placement`` says (``shares``: H under ``distributed``)."""
    sigma, sample_rate, steps = popularity_step(target_epsilon, delta, share)
    return GaussianMechanism(sigma, POPULARITY_BOUND, sample_rate, steps, placement, shares, POPULARITY)


def popularity_sum_bound(batch_size: int, sample_rate: float) -> int:
    """The public L2 radius a site's popularity sum is projected onto before secure aggregation (``distributed``).

    Every user adds a vector of norm at most 1, so a site's sum has norm at most its user count, which is private.
    The run's expected federation size, batch-size / sample-rate, is public and bounds it for any site of a
    federation of about that size; the projection is nonexpansive, so a user still moves the sum by at most 1.
    """
    return math.ceil(batch_size / sample_rate)


def training_noise(
    before: Sequence[MechanismStep], target_epsilon: float, delta: float, sample_rate: float, steps: int,
    accountant: str = ACCOUNTANT,
) -> float:
    """The smallest noise multiplier (to 0.1%) at which ``before`` then ``steps`` steps at ``sample_rate`` cost at
    most ``target_epsilon`` together."""
    return _calibrate(tuple(before), float(target_epsilon), float(delta), float(sample_rate), int(steps), accountant)


@lru_cache(maxsize=256)
def _calibrate(
    before: tuple[MechanismStep, ...], target: float, delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    def cost(sigma: float) -> float:
        return epsilon_from_history([*before, (sigma, sample_rate, steps)], delta, accountant)

    if epsilon_from_history(before, delta, accountant) >= target:
        raise ConfigError(f"the popularity release alone spends the whole target epsilon {target:g}: lower "
                          "popularity-share")
    low, high = 0.0, 1.0
    while cost(high) > target:
        low, high = high, 2 * high
        if high > LARGEST_NOISE:
            raise ConfigError(f"no noise multiplier up to {LARGEST_NOISE:g} meets epsilon {target:g} at delta "
                              f"{delta:g} after the popularity release: raise epsilon or lower popularity-share")
    while high - low > 1e-3 * high:
        middle = (low + high) / 2
        low, high = (low, middle) if cost(middle) <= target else (middle, high)
    return high
