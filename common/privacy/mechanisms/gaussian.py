"""The Gaussian mechanism with per-user L2 clipping: DP-SGD's step and the popularity floor's release.

Individual half: each user's contribution (a gradient, a popularity vector) is scaled to L2 norm at most ``clip``
(C), so one user moves a sum by at most C. For DP-SGD Opacus clips inside its per-sample hooks or ghost clipping
with this mechanism's ``clip`` (``client.dp_sgd.make_private``); ``constrain_sensitivity`` is the same bound on
explicit per-user rows. Aggregate half: N(0, sigma^2 C^2) on every coordinate of the sum, added

- at the site (``site``): by Opacus' DPOptimizer in its step for DP-SGD (``make_private`` hands it this
  mechanism's multiplier and clip), by ``add_noise`` for the popularity release;
- at the coordinator (``central``): once, over the sum of the sites' un-noised releases;
- at every site in shares (``distributed``): each share has std sigma C / sqrt(H), so any H shares together carry
  the whole variance sigma^2 C^2; the site first projects its sum onto a public radius (``project``), which is
  nonexpansive and so leaves the sensitivity at C.

Accounting: ``step`` = (sigma, sample rate, steps), the accountants' ``MechanismStep``; under ``distributed``
``share_step`` is the same with the share's multiplier, which the fallback epsilon composes (what the site's own
noise is worth if secure aggregation failed).

The noise is drawn as Opacus' secure mode draws it (``gaussian_noise``), from a generator seeded by the operating
system (``secret_generator``), whichever party draws it.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from opacus.optimizers.optimizer import _generate_noise

from common.errors import ConfigError
from common.privacy.accounting import MechanismStep
from common.privacy.mechanisms import (
    COORDINATOR,
    DISTRIBUTED_TRUST,
    GRADIENT_SUM,
    SITE,
    SITE_TRUST,
    PrivacyMechanism,
    Statistic,
    placement_problem,
)


def secret_generator(device: torch.device) -> torch.Generator:
    """Seeded from the operating system's entropy, never from run parameters.

    Which users a step samples and the noise it adds must be unpredictable to
    the server: with a seed it could compute, it could subtract the noise or
    know the batch, and the accounted epsilon would be a fiction.
    """
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


def gaussian_noise(
    std: float, shape: torch.Size | tuple[int, ...], generator: torch.Generator, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """N(0, std^2) noise as Opacus' secure mode draws it: (Z1 + Z2 + Z3 + Z4) / 2, four draws per value.

    A single floating-point Gaussian draw takes only a sparse set of values, and whether ``release - f(D)`` lies
    in that set can tell neighbouring datasets apart (Mironov, CCS 2012; Jin et al., IEEE S&P 2022). Summing 2n = 4
    draws makes that test cost about 2^159 work (Holohan & Braghin 2021, section 5.1); the distribution, and so
    the accounting, is the same N(0, std^2). The generator stays ``secret_generator``'s (PyTorch's, seeded with
    63 bits from the operating system), not a cryptographic one: docs/privacy.md says what that leaves.
    """
    return _generate_noise(std, torch.zeros(shape, dtype=dtype, device=generator.device), generator, secure_mode=True)


def project(tensors: Mapping[str, torch.Tensor], radius: float) -> dict[str, torch.Tensor]:
    """``tensors`` (float64) scaled onto the L2 ball of ``radius`` when their joint norm exceeds it: the public bound
    a ``distributed`` site's sum is held to before its share is added, so that it fits the secure sum's range."""
    norm = math.sqrt(sum(float(tensor.double().pow(2).sum()) for tensor in tensors.values()))
    scale = 1.0 if norm <= radius else radius / norm
    return {name: tensor.double() * scale for name, tensor in tensors.items()}


@dataclass(frozen=True)
class GaussianMechanism(PrivacyMechanism):
    """N(0, (``noise_multiplier`` x ``clip``)^2) on a sum of per-user contributions of L2 norm at most ``clip``."""

    noise_multiplier: float
    """sigma: the whole noise's std over ``clip`` (under ``distributed``: all shares together)."""
    clip: float
    """C: the largest L2 norm of one user's contribution, the sum's sensitivity."""
    sample_rate: float = 1.0
    steps: int = 1
    placement: str = "site"
    shares: int = 1
    """``distributed``: H, the fewest shares every sum holds; ignored by the other placements."""
    statistic: Statistic = GRADIENT_SUM

    def __post_init__(self) -> None:
        problem = (
            placement_problem(self.placement, self.shares)
            or f"noise multiplier {self.noise_multiplier!r}: must be a finite number >= 0"
            * (not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0))
            or f"clip {self.clip!r}: must be a finite positive number"
            * (not (math.isfinite(self.clip) and self.clip > 0))
        )
        if problem:
            raise ConfigError(f"Gaussian mechanism: {problem}")

    @property
    def share_noise_multiplier(self) -> float:
        """One site's share under ``distributed``: any ``shares`` shares together carry the whole variance."""
        return self.noise_multiplier / math.sqrt(self.shares)

    def noise_multiplier_at(self, party: str) -> float:
        """The multiplier of the noise ``party`` adds (0: none there)."""
        if party not in (SITE, COORDINATOR):
            raise ValueError(f"party '{party}': use '{SITE}' or '{COORDINATOR}'")
        if self.placement == "distributed":
            return self.share_noise_multiplier if party == SITE else 0.0
        adds = SITE if self.placement == "site" else COORDINATOR
        return self.noise_multiplier if party == adds else 0.0

    def noise_std(self, party: str) -> float:
        return self.noise_multiplier_at(party) * self.clip

    def constrain_sensitivity(self, contributions: torch.Tensor) -> torch.Tensor:
        """Each row (one user) scaled by min(1, C / its L2 norm); a zero row stays zero."""
        norms = contributions.flatten(1).norm(dim=1)
        factors = (self.clip / norms).clamp(max=1.0)
        return contributions * factors.view(-1, *[1] * (contributions.dim() - 1)).to(contributions.dtype)

    def add_noise(
        self, aggregate: Mapping[str, torch.Tensor], party: str, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        std = self.noise_std(party)
        if std == 0:
            return dict(aggregate)
        generator = generator or secret_generator(torch.device("cpu"))
        return {
            name: tensor + gaussian_noise(std, tensor.shape, generator, tensor.dtype).to(tensor.device)
            for name, tensor in aggregate.items()
        }

    @property
    def step(self) -> MechanismStep:
        return self.noise_multiplier, self.sample_rate, self.steps

    @property
    def share_step(self) -> MechanismStep:
        """``distributed``: the step of this site's own share alone (the fallback epsilon's)."""
        return self.share_noise_multiplier, self.sample_rate, self.steps

    def ledger_fields(self, fallback_epsilon_so_far: float | None = None) -> dict[str, Any]:
        """The ledger line's mechanism fields; ``fallback_epsilon_so_far``: the site's fallback after this step
        (``distributed`` only)."""
        fields: dict[str, Any] = {
            "sample_rate": self.sample_rate,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.clip,
            "steps": self.steps,
            "release": self.statistic.release,
            "noise_placement": self.placement,
            "trust": {"site": SITE_TRUST, "central": self.statistic.central_trust}.get(self.placement,
                                                                                       DISTRIBUTED_TRUST),
        }
        if self.placement == "distributed":
            fields |= {"share_noise_multiplier": self.share_noise_multiplier,
                       "fallback_epsilon_so_far": fallback_epsilon_so_far}
        return fields
