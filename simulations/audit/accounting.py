"""Epsilon recomputed from a ledger's mechanism history by three accountants, two of them independent of the sites'.

Opacus' RDP is what the sites spend with; Opacus' PRV and Google's
dp-accounting PLD (another code base) are tighter numerical accountants that
cross-check it.
"""

from __future__ import annotations

from collections.abc import Sequence

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant
from opacus.accountants import PRVAccountant

from common.privacy.accounting import MechanismStep, epsilon_from_history, merged_history
from simulations.audit.findings import RELATIVE_TOLERANCE

ACCOUNTANTS = ("opacus-rdp", "opacus-prv", "dp-accounting-pld")
SPENDING_ACCOUNTANT = "opacus-rdp"
PLD_DISCRETIZATION = 1e-3
PRV_COARSE_ERROR, PRV_FINEST_ERROR = 0.01, 1e-3


def independent_epsilons(history: Sequence[MechanismStep], delta: float) -> dict[str, float | None]:
    """Epsilon of the whole history from each accountant; None where one cannot evaluate it (the caller reports it).

    Each accountant gets the history with equal mechanisms' steps added up (``merged_history``: the same
    composition), so that a ledger of many one-step rounds costs one evaluation per distinct mechanism.
    """
    history = merged_history(history)
    results: dict[str, float | None] = {}
    for name, compute in (
        ("opacus-rdp", lambda: epsilon_from_history(history, delta, "rdp")),
        ("opacus-prv", lambda: prv_epsilon(history, delta)),
        ("dp-accounting-pld", lambda: pld_epsilon(history, delta)),
    ):
        try:
            results[name] = float(compute()) if history else 0.0
        except (ValueError, RuntimeError, OverflowError):
            results[name] = None
    return results


def prv_epsilon(history: Sequence[MechanismStep], delta: float) -> float:
    """Opacus' PRV accountant; it reports the upper end of its error window, so small epsilons get a finer one."""
    accountant = PRVAccountant()
    accountant.history = list(history)
    coarse = float(accountant.get_epsilon(delta, eps_error=PRV_COARSE_ERROR))
    if coarse > PRV_COARSE_ERROR / (RELATIVE_TOLERANCE / 4):
        return coarse
    return float(accountant.get_epsilon(delta, eps_error=max(PRV_FINEST_ERROR, coarse * RELATIVE_TOLERANCE / 4)))


def pld_epsilon(history: Sequence[MechanismStep], delta: float) -> float:
    """Google's dp-accounting privacy-loss-distribution accountant over the same Poisson-subsampled Gaussian steps."""
    accountant = pld_privacy_accountant.PLDAccountant(
        dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE, value_discretization_interval=PLD_DISCRETIZATION
    )
    accountant.compose(
        dp_accounting.ComposedDpEvent(
            [
                dp_accounting.SelfComposedDpEvent(
                    dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(sigma)), steps
                )
                for sigma, rate, steps in history
            ]
        )
    )
    return float(accountant.get_epsilon(delta))
