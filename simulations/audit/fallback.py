"""The guarantee of a ``distributed`` ledger if secure aggregation failed, recomputed and stated with its assumption.

A ``distributed`` line's epsilon (``epsilon_so_far``, recomputed by the audit like every line's) assumes that the
coordinator saw only the secure sum of the sites' noisy shares, and that every sum held the shares of at least
``secure-aggregation-sites`` sites not colluding with it. If that failed, the coordinator may hold one site's noisy
share alone, which is a Gaussian mechanism with the share's own noise multiplier: the fallback epsilon. The audit
recomputes it from each line's ``share_noise_multiplier`` with two accountants and compares it with the last line's
``fallback_epsilon_so_far``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from common.privacy.fallback import fallback_history
from simulations.audit.accounting import BY_LEDGER_NAME, TIGHT_ACCOUNTANTS, independent_epsilons
from simulations.audit.findings import Finding, exceeds
from simulations.audit.ledgers import Entry

FALLBACK_ACCOUNTANTS = ("opacus-rdp", "dp-accounting-pld")


def fallback_findings(site: str, entries: Sequence[Entry], delta: float) -> list[Finding]:
    """Notes stating both guarantees of a site with ``distributed`` lines, and an error if its ledger understates the
    fallback; nothing for a site without them."""
    distributed = [e for e in entries if e.data.get("noise_placement") == "distributed"]
    if not distributed:
        return []
    where = f"site {site}"
    shares = [e.data.get("share_noise_multiplier") for e in distributed]
    if not all(isinstance(s, int | float) and not isinstance(s, bool) and s > 0 for s in shares):
        return [Finding("error", where, "a distributed ledger line records no positive share_noise_multiplier")]
    history = fallback_history(e.data for e in entries)
    if any(noise <= 0 for noise, _, _ in history):
        return [
            Finding(
                "note",
                where,
                "if secure aggregation failed: NOT private against the coordinator (some lines are central noise, "
                "where the site added no noise of its own)",
            )
        ]
    recomputed = {k: v for k, v in independent_epsilons(history, delta).items() if k in FALLBACK_ACCOUNTANTS}
    values = [v for v in recomputed.values() if v is not None]
    findings: list[Finding] = []
    recorded = distributed[-1].data.get("fallback_epsilon_so_far")
    last_is_distributed = distributed[-1] is entries[-1]
    own = BY_LEDGER_NAME[distributed[-1].accountant]  # the accountant the site computed its fallback with
    checked = [v for k, v in recomputed.items() if v is not None and k in {own, *TIGHT_ACCOUNTANTS}]
    if last_is_distributed and isinstance(recorded, int | float) and any(exceeds(v, recorded) for v in checked):
        findings.append(
            Finding(
                "error",
                where,
                f"fallback epsilon UNDERSTATED: the ledger's last line claims {recorded:.4f}, recomputed "
                + ", ".join(f"{k} {v:.4f}" for k, v in recomputed.items() if v is not None),
            )
        )
    fallback = recomputed.get(own) or (max(values) if values else math.inf)
    findings.append(
        Finding(
            "note",
            where,
            f"{len(distributed)} of {len(entries)} lines used distributed noise (Flower's SecAgg+). The site's epsilon "
            "above assumes the coordinator saw only the secure sum and every sum held the noise shares of enough "
            "sites not colluding with it. If secure aggregation failed (a coordinator deviating from the protocol, "
            "or more sites dropped out or colluding than tolerated), each release is protected by this site's own "
            f"share alone: fallback epsilon {fallback:.4f} at delta {delta:g} (recomputed: "
            + ", ".join(f"{k} {'n/a' if v is None else f'{v:.4f}'}" for k, v in recomputed.items())
            + ")",
        )
    )
    return findings
