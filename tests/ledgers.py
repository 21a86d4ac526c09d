"""Epsilon of a ledger recomputed by a PLD accountant built in the test, independently of the site's own code."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant

from common.privacy.accounting import PLD_DISCRETIZATION


def fresh_pld_epsilon(lines: Sequence[Mapping[str, Any]], delta: float) -> float:
    """The sites calibrate, check and record with PLD (the grid widens below sigma 1, as the site's does)."""
    assert {line["accountant"] for line in lines} == {"pld"}
    smallest = min(line["noise_multiplier"] for line in lines)
    accountant = pld_privacy_accountant.PLDAccountant(
        dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
        value_discretization_interval=PLD_DISCRETIZATION * max(1.0, 1 / smallest),
    )
    for line in lines:
        gaussian = dp_accounting.GaussianDpEvent(line["noise_multiplier"])
        step = dp_accounting.PoissonSampledDpEvent(line["sample_rate"], gaussian)
        accountant.compose(dp_accounting.SelfComposedDpEvent(step, line["steps"]))
    return float(accountant.get_epsilon(delta))
