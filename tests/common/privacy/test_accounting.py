"""The spending accountant's PLD: the same number as dp-accounting's own ``PLDAccountant``, however it is reused."""

from __future__ import annotations

import pytest

from common.privacy.accounting import MechanismStep, pld_epsilon
from tests.ledgers import fresh_pld_epsilon


def _lines(history: list[MechanismStep]) -> list[dict]:
    return [{"accountant": "pld", "noise_multiplier": sigma, "sample_rate": rate, "steps": steps}
            for sigma, rate, steps in history]


@pytest.mark.parametrize(
    "history",
    [
        [(1.3, 0.05, 1)],
        [(1.3, 0.05, 7)],
        [(1.3, 0.05, 7), (0.9, 0.2, 3)],  # another step's distribution in between
        [(1.3, 0.05, 8)],  # the first step's distribution, reused for another count
        [(0.6, 0.01, 40), (1.3, 0.05, 2)],  # a grid widened below sigma 1
        [(1.3, 0.0, 5), (1.3, 0.05, 2)],  # a rate of 0 costs nothing
    ],
)
def test_pld_epsilon_is_the_accountants_to_the_last_bit(history: list[MechanismStep]) -> None:
    assert pld_epsilon(history, 1e-5) == fresh_pld_epsilon(_lines(history), 1e-5)


def test_a_reused_step_distribution_is_not_changed_by_composing_it() -> None:
    before = pld_epsilon([(1.1, 0.1, 3)], 1e-5)
    pld_epsilon([(1.1, 0.1, 50), (1.1, 0.1, 2)], 1e-5)
    assert pld_epsilon([(1.1, 0.1, 3)], 1e-5) == before
