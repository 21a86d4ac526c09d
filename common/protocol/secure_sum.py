"""The secure sum's part of the protocol, checked the same way on both sides: the names on the wire, the value range.

A ``distributed`` round (and the popularity release under it) is one SecAgg+ sum (``client.secure_aggregation``
at the site, ``common.flower.secaggplus_driver`` at the coordinator). The coordinator sizes Flower's range with
``clipping_range`` so that any site's share fits; a site checks the coordinator's setup with ``protocol_problem``
before it sends anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

HEADROOM_STDS = 12.0
"""Flower's clipping range lies this many share standard deviations beyond the bound on a site's sum."""
STATE_NAMES = "state-names"
SUM_NAMES = "sum-names"
"""FitIns config keys: the global state's names in the order of FitIns' arrays, and the names (and order) of the
vector each site replies (the trainable parameters): public, the model's architecture."""
NAME_SEPARATOR = ","


def sum_bound(max_grad_norm: float, batch_size: int) -> float:
    """R: the public L2 radius a site's clipped sum is projected onto (the expected federation batch x C)."""
    return max_grad_norm * batch_size


def clipping_range(bound: float, share_std: float) -> float:
    """Flower's per-coordinate range: the bound on a site's sum plus ``HEADROOM_STDS`` standard deviations of its
    noise share (the mechanism's ``noise_std`` at the site)."""
    return bound + HEADROOM_STDS * share_std


def protocol_problem(protocol: Mapping[str, Any], shares: int, required_range: float) -> str:
    """Why this site will not send a share in the SecAgg+ round the coordinator set up; "" when it will.

    ``protocol`` is what Flower's ``secaggplus_mod`` kept from the coordinator's setup message. Public input only.
    """
    sites, threshold = int(protocol["sample_num"]), int(protocol["threshold"])
    if threshold < shares:
        return (
            f"declined: the coordinator's secure aggregation completes with as few as {threshold} of {sites} sites, "
            f"but this site's share assumes the shares of at least {shares} (node config secure-aggregation-sites)"
        )
    if sites - threshold >= threshold:
        return (
            f"declined: the coordinator's secure aggregation tolerates {sites - threshold} of {sites} sites missing, "
            f"as many as its reconstruction threshold {threshold}: that many colluding sites could unmask a share"
        )
    if sites * int(protocol["target_range"]) >= int(protocol["mod_range"]) or float(protocol["max_weight"]) != 1.0:
        return (
            "declined: the coordinator's secure aggregation could wrap around its modulus or rescale the shares "
            f"({sites} sites x quantization range {protocol['target_range']} vs modulus {protocol['mod_range']}, "
            f"max weight {protocol['max_weight']})"
        )
    if float(protocol["clipping_range"]) < required_range:
        return (
            f"declined: the coordinator's secure aggregation clips at {float(protocol['clipping_range']):g}, below "
            f"the {required_range:g} this site's share needs"
        )
    return ""
