"""What a site's ledger is worth if the trust a line relies on failed: each step counted with the noise the site
added itself.

- ``site``: the site added the whole noise; nothing changes.
- ``distributed``: the site added one share (``share_noise_multiplier``); if Flower's secure aggregation failed
  (a coordinator that deviates from the protocol, or more colluding sites than it tolerates), the coordinator may
  hold this site's noisy share alone, which is DP with that share's noise multiplier.
- ``central``: the site added no noise; its release to the coordinator is not private (infinite epsilon).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from common.privacy.accounting import ACCOUNTANT, MechanismStep, epsilon_from_history


def own_noise_multiplier(entry: Mapping[str, Any]) -> float:
    """The noise multiplier of what the site itself added in this ledger line (0: none)."""
    placement = entry.get("noise_placement", "site")
    if placement == "distributed":
        return float(entry["share_noise_multiplier"])
    if placement == "central":
        return 0.0
    return float(entry["noise_multiplier"])


def fallback_history(entries: Iterable[Mapping[str, Any]]) -> list[MechanismStep]:
    """The ledger's steps with the site's own noise only, for ``epsilon_from_history``."""
    return [(own_noise_multiplier(e), float(e["sample_rate"]), int(e["steps"])) for e in entries]


def fallback_epsilon(entries: Iterable[Mapping[str, Any]], delta: float, accountant: str = ACCOUNTANT) -> float:
    """The site's epsilon if every trust its lines rely on failed: infinite once a line added no noise of its own."""
    history = fallback_history(entries)
    if any(noise <= 0 for noise, _, _ in history):
        return float("inf")
    return epsilon_from_history(history, delta, accountant)
