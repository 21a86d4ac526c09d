"""Privacy mechanisms as one interface: an individual half that bounds one user's contribution, and an aggregate half
that adds the noise, each run where the mechanism's placement says (after Apple's pfl-research
``pfl/privacy/privacy_mechanism.py``).

The individual half (``constrain_sensitivity``) always runs at the site, on its own users: it is what makes one
user's effect on a sum at most the mechanism's bound, whoever adds the noise. The aggregate half (``add_noise``)
runs on a sum, at the party the placement names:

| placement | individual half | aggregate half |
|---|---|---|
| ``site`` | the site | the site, on its own release (for DP-SGD: Opacus' DPOptimizer, inside its step) |
| ``central`` | the site | the coordinator, once over the sum of every site's release |
| ``distributed`` | the site | every site a share of 1/H of the variance; the sum through SecAgg+ |

A mechanism also holds its accounting parameters (``step``: the accountants' ``MechanismStep``) and what its ledger
line records (``ledger_fields``), so that the site that spends, the coordinator that adds noise and the auditor that
reads the line all take them from one place. Each mechanism lives in a module named for it
(``common.privacy.mechanisms.gaussian``).

The trust statements below are what a ledger line (the site's words) and the run summary (the coordinator's) say a
placement relies on; the audit reads them back, so their words stay as they were first written.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from common.privacy.accounting import MechanismStep

SITE, COORDINATOR = "site", "coordinator"
"""The two parties a half can run at."""
PLACEMENTS = ("site", "central", "distributed")
"""Where a mechanism's aggregate half runs (``noise`` in the run config): each site on its own release (``site``), or
once by the coordinator over the sum of every site's release (``central``: sites must trust the coordinator;
``server.central_noise``), or by the sites in shares summed by Flower's secure aggregation (``distributed``: sites
must trust the SecAgg+ protocol; ``server.distributed_noise``)."""

SITE_TRUST = "no one: the site adds the noise to its own release"
CENTRAL_TRUST = (
    "the coordinator: this site sent it the un-noised sum of its sampled users' clipped gradients (or clipped model "
    "deltas, with user-update = delta), and the epsilon "
    "holds only if the coordinator added Gaussian noise of std noise_multiplier x max_grad_norm once to the sum over "
    "all sites; against the coordinator itself this release is NOT private"
)
CENTRAL_POPULARITY_TRUST = (
    "the coordinator: this site sent it the un-noised sum of its users' popularity vectors (each of L2 norm at most "
    "1), and the epsilon holds only if the coordinator added Gaussian noise of std noise_multiplier once to the sum "
    "over all sites; against the coordinator itself this release is NOT private"
)
DISTRIBUTED_TRUST = (
    "Flower's secure aggregation (SecAgg+) and the other sites: this site added only a share of the noise (std "
    "noise_multiplier x max_grad_norm / sqrt(secure_aggregation_sites)); the epsilon holds if the coordinator saw "
    "only the sum over the sites and every sum held the shares of at least secure_aggregation_sites sites that did "
    "not collude with it. Flower's SecAgg+ is secure against a coordinator that follows the protocol, not one that "
    "deviates from it; if it failed, the fallback epsilon (this site's own share alone) is what holds"
)
CENTRAL_STATEMENT = (
    "central: each site trusts the coordinator to add the noise; against the coordinator itself a site's release "
    "is NOT private (it sends the un-noised sum of its users' clipped gradients, or clipped model deltas). The "
    "guarantee holds against "
    "everyone who sees only the global models, provided the coordinator added the noise."
)
DISTRIBUTED_STATEMENT = (
    "distributed: each site added a share of the noise and trusted Flower's secure aggregation (SecAgg+) to show the "
    "coordinator only the sum over the sites; the guarantee holds against everyone, the coordinator included, if the "
    "coordinator followed the protocol and no more sites than tolerated dropped out or colluded with it. Otherwise "
    "a site's release is protected by its own noise share alone: see each site's fallback epsilon in its ledger."
)
PLACEMENT_STATEMENTS = {"central": CENTRAL_STATEMENT, "distributed": DISTRIBUTED_STATEMENT}
"""What the coordinator's summary says a placement relies on (``site`` relies on no one: no statement)."""


@dataclass(frozen=True)
class Statistic:
    """What a mechanism releases: the ledger's ``release`` words and what a site trusts under ``central``."""

    release: str
    central_trust: str


GRADIENT_SUM = Statistic("dp-sgd training", CENTRAL_TRUST)
"""DP-SGD: the sum of the sampled users' clipped gradients (the ledger's default release)."""
POPULARITY = Statistic("gaussian sum of per-user item indicators, each scaled to L2 norm 1", CENTRAL_POPULARITY_TRUST)
"""The popularity floor: the sum of per-user item-indicator vectors (``common.privacy.popularity``)."""


class PrivacyMechanism(ABC):
    """A mechanism's two halves, its accounting and its ledger line (see the module's docstring)."""

    placement: str

    @abstractmethod
    def constrain_sensitivity(self, contributions: torch.Tensor) -> torch.Tensor:
        """The individual half: ``contributions`` [users, ...] with each user's row bounded so that adding or
        removing that user moves their sum by at most the mechanism's sensitivity."""

    @abstractmethod
    def noise_std(self, party: str) -> float:
        """The std of the noise ``party`` (``SITE`` or ``COORDINATOR``) adds per coordinate under the placement."""

    @abstractmethod
    def add_noise(
        self, aggregate: Mapping[str, torch.Tensor], party: str, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """The aggregate half as ``party`` runs it: ``aggregate`` plus that party's noise (unchanged when the
        placement gives it none)."""

    @property
    @abstractmethod
    def step(self) -> MechanismStep:
        """What the accountants compose: the mechanism's whole noise (all shares together)."""

    @abstractmethod
    def ledger_fields(self) -> dict[str, Any]:
        """The ledger line's fields this mechanism decides (release, noise, clip, rate, steps, placement, trust)."""


def placement_problem(placement: str, shares: int) -> str:
    """Why (``placement``, ``shares``) names no placement; "" when it does."""
    if placement not in PLACEMENTS:
        return f"noise placement '{placement}': use one of {', '.join(PLACEMENTS)}"
    if shares < 1:
        return f"{shares} noise shares: every sum holds at least 1"
    return ""
