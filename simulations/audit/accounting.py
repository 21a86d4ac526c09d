"""Epsilon recomputed from a ledger's mechanism history by three accountants, whichever one the sites spent with.

Sites spend with dp-accounting's PLD (ledgers written before it: Opacus' RDP;
each line names its own). PLD and Opacus' PRV are two numerical accountants
from separate code bases that estimate the same exact epsilon from above, so
each cross-checks the other; RDP is a looser upper bound, shown beside them.
"""

from __future__ import annotations

from collections.abc import Sequence

from opacus.accountants import PRVAccountant

from common.privacy.accounting import MechanismStep, epsilon_from_history, merged_history
from simulations.audit.findings import RELATIVE_TOLERANCE

ACCOUNTANTS = ("opacus-rdp", "opacus-prv", "dp-accounting-pld")
BY_LEDGER_NAME = {"rdp": "opacus-rdp", "prv": "opacus-prv", "pld": "dp-accounting-pld"}
"""The audit's name for each accountant a ledger line may name (``common.privacy.accounting.ACCOUNTANTS``)."""
TIGHT_ACCOUNTANTS = ("opacus-prv", "dp-accounting-pld")
"""Numerical accountants of the exact epsilon (within their error bounds): a recorded epsilon below either one is
understated whatever the site spent with. RDP is an upper bound known to be looser, so a site that spent with PLD
records less than RDP recomputes, rightly."""
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
        ("dp-accounting-pld", lambda: epsilon_from_history(history, delta, "pld")),
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
