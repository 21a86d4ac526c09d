"""What a site's round will do, fixed before any training from public values only.

Privacy unit: the user. Each user is one training example (their most recent
``max_len`` items). Under DP a round is ``ceil(local_epochs / sample_rate)``
steps of DP-SGD; each step samples every user independently with the run's
public ``sample_rate``, clips each user's gradient to ``max_grad_norm`` and
adds Gaussian noise of std ``noise_multiplier * max_grad_norm`` to the sum. The
noise multiplier is calibrated so that *all planned rounds together* cost the
target epsilon. Nothing here depends on how many users a site has: the
coordinator sees these numbers (through epsilon), so they must not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from client.policy import SitePolicy
from common.errors import ConfigError
from common.federation import RunSettings
from common.model import LossName
from common.privacy import GradSampleMode, calibrate_noise


@dataclass(frozen=True)
class LocalTraining:
    """Public per-round training parameters, the same at every site.

    Under DP nothing here may depend on a site's exact user count: users are
    Poisson-sampled at the run's ``sample_rate``, a round is
    ceil(local_epochs / sample_rate) steps, and each step's noisy sum is
    divided by the public ``batch_size``. A site of n users then draws batches
    of about n x sample_rate users. Without DP (a site that allows it) the
    site shuffles into batches of ``batch_size``.
    """

    sample_rate: float = RunSettings.sample_rate
    batch_size: int = RunSettings.batch_size
    local_epochs: float = RunSettings.local_epochs
    learning_rate: float = RunSettings.learning_rate
    loss: LossName = RunSettings.loss  # type: ignore[assignment]
    grad_sample_mode: GradSampleMode = RunSettings.grad_sample_mode  # type: ignore[assignment]
    max_physical_batch_size: int = RunSettings.max_physical_batch_size
    """Split larger Poisson batches into pieces of at most this many users (0: never split); privacy is unchanged."""

    @classmethod
    def from_settings(cls, settings: RunSettings) -> LocalTraining:
        return cls(
            settings.sample_rate,
            settings.batch_size,
            settings.local_epochs,
            settings.learning_rate,
            settings.loss,  # type: ignore[arg-type]
            settings.grad_sample_mode,  # type: ignore[arg-type]
            settings.max_physical_batch_size,
        )


@dataclass(frozen=True)
class PrivacyPlan:
    """The run's privacy target and the site's own budget; ``enabled=False`` is the non-private baseline.

    ``delta`` is the run's: the noise is calibrated, and replies report
    epsilon, at it. ``site_delta`` is the site's (node config): its ledger
    composes and its budget is checked at that delta, whatever a run asks, so
    a coordinator cannot make past spending look smaller by asking a larger
    delta (``client.policy`` declines such a run).
    """

    enabled: bool = RunSettings.dp
    target_epsilon: float = RunSettings.epsilon
    delta: float = RunSettings.delta
    max_grad_norm: float = RunSettings.max_grad_norm
    planned_rounds: int = RunSettings.rounds
    max_epsilon: float | None = None
    """The site's budget over all runs on these users; defaults to the target."""
    site_delta: float | None = None
    """The delta of the site's budget and ledger; defaults to ``delta``."""

    def __post_init__(self) -> None:
        if self.enabled and self.delta > self.budget_delta:
            raise ConfigError(f"the run's delta={self.delta:g} is above the site's delta={self.budget_delta:g}")

    @classmethod
    def from_settings(cls, settings: RunSettings, policy: SitePolicy | None = None) -> PrivacyPlan:
        """The run's target under the site's own budget and delta (from its node config)."""
        return cls(
            settings.dp,
            settings.epsilon,
            settings.delta,
            settings.max_grad_norm,
            settings.rounds,
            None if policy is None else policy.max_epsilon,
            None if policy is None else policy.delta,
        )

    @property
    def budget(self) -> float:
        return self.target_epsilon if self.max_epsilon is None else self.max_epsilon

    @property
    def budget_delta(self) -> float:
        return self.delta if self.site_delta is None else self.site_delta


@dataclass(frozen=True)
class RoundPlan:
    """What one round will do at this site, known before any training, from public values only."""

    sample_rate: float
    steps: int
    noise_multiplier: float


def plan_round(training: LocalTraining, privacy: PrivacyPlan) -> RoundPlan:
    steps = max(1, math.ceil(training.local_epochs / training.sample_rate))
    noise = 0.0
    if privacy.enabled:
        noise = calibrate_noise(privacy.target_epsilon, privacy.delta, training.sample_rate, steps * privacy.planned_rounds)
    return RoundPlan(training.sample_rate, steps, noise)
