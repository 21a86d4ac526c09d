"""What a site's round will do, fixed before any training from public values only.

Privacy unit: the user. Each user is one training example (their most recent
``max_len`` items). Under DP a round is ``ceil(local_epochs / sample_rate)``
steps of DP-SGD; each step samples every user independently with the run's
public ``sample_rate``, clips each user's gradient to ``max_grad_norm`` and
adds Gaussian noise of std ``noise_multiplier * max_grad_norm`` to the sum. The
noise multiplier is calibrated so that *all planned rounds together* cost the
target epsilon. Nothing here depends on how many users a site has: the
coordinator sees these numbers (through epsilon), so they must not.

With ``noise = central`` (or ``distributed``) a round is exactly one step, whose noise the
coordinator adds once over all sites' sums: the noise multiplier is then that
of the total noise, calibrated on ``rounds`` steps at the same public rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from common.federation import RunSettings, steps_per_round
from common.privacy.accounting import GradSampleMode, calibrate_noise
from common.privacy.mechanisms.gaussian import GaussianMechanism
from common.privacy.popularity import popularity_step, training_noise
from common.recommender.model import LossName

DEFAULT_MAX_ABS_WEIGHT = 100.0
"""A site's weight box when its node config sets no ``max-abs-weight`` (``client.policy``)."""


class SiteLimits(Protocol):
    """What a site's own node config sets for its privacy plan (``client.policy.SitePolicy``, kept at the site)."""

    @property
    def delta(self) -> float: ...
    @property
    def max_epsilon(self) -> float: ...
    @property
    def window_epsilon(self) -> float: ...
    @property
    def secure_aggregation_sites(self) -> float: ...
    @property
    def fallback_cap(self) -> float: ...
    @property
    def max_abs_weight(self) -> float: ...


@dataclass(frozen=True)
class LocalTraining:
    """Public per-round training parameters, the same at every site.

    Under DP nothing here may depend on a site's exact user count: users are
    Poisson-sampled at the run's ``sample_rate``, a round is
    ceil(local_epochs / sample_rate) steps, and each step's noisy sum is
    divided by the public ``batch_size``. A site of n users then draws batches
    of about n x sample_rate users. Without DP (a site that allows it) the
    site shuffles into batches of ``batch_size``. ``max_abs_weight`` is the
    site's own (public) box, which every local step's weights are projected onto.
    """

    sample_rate: float = RunSettings.sample_rate
    batch_size: int = RunSettings.batch_size
    local_epochs: float = RunSettings.local_epochs
    learning_rate: float = RunSettings.learning_rate
    loss: LossName = RunSettings.loss  # type: ignore[assignment]
    grad_sample_mode: GradSampleMode = RunSettings.grad_sample_mode  # type: ignore[assignment]
    max_physical_batch_size: int = RunSettings.max_physical_batch_size
    """Split larger Poisson batches into pieces of at most this many users (0: never split); privacy is unchanged."""
    max_abs_weight: float = DEFAULT_MAX_ABS_WEIGHT
    """The site's node config ``max-abs-weight``: after every local step each trainable weight is projected onto
    [-max_abs_weight, max_abs_weight] (``client.dp_sgd.bounded_adam``)."""
    user_update: str = RunSettings.user_update
    """``noise = central`` / ``distributed``: what a sampled user adds to the site's sum: their clipped gradient
    (``client.clipped_sum``) or their clipped model delta after ``user_steps`` local steps (``client.delta_sum``)."""
    user_steps: int = RunSettings.user_steps
    user_learning_rate: float = RunSettings.user_learning_rate

    @classmethod
    def from_settings(cls, settings: RunSettings, policy: SiteLimits | None = None) -> LocalTraining:
        return cls(
            settings.sample_rate,
            settings.batch_size,
            settings.local_epochs,
            settings.learning_rate,
            settings.loss,  # type: ignore[arg-type]
            settings.grad_sample_mode,  # type: ignore[arg-type]
            settings.max_physical_batch_size,
            policy.max_abs_weight if policy else DEFAULT_MAX_ABS_WEIGHT,
            settings.user_update,
            settings.user_steps,
            settings.user_learning_rate,
        )


@dataclass(frozen=True)
class PrivacyPlan:
    """The run's privacy target at the site's delta and under its budget; ``enabled=False`` is non-private."""

    enabled: bool = RunSettings.dp
    target_epsilon: float = RunSettings.epsilon
    delta: float = RunSettings.delta
    max_grad_norm: float = RunSettings.max_grad_norm
    planned_rounds: int = RunSettings.rounds
    max_epsilon: float | None = None
    """The site's budget over all runs on these users; defaults to the target."""
    popularity_share: float = RunSettings.popularity_share
    """Share of the target spent on the popularity release before round 1 (``common.privacy.popularity``)."""
    whole_run: bool = False
    """Check the run's remaining rounds against the budget at once (a site with a window-epsilon): a window that
    would cross the lifetime cap is declined whole rather than trained in part."""
    noise_placement: str = RunSettings.noise
    """Who adds the noise: the site (``site``) or the coordinator, once over all sites' sums (``central``), or the
    sites in shares summed by secure aggregation (``distributed``)."""
    noise_shares: int = 1
    """``distributed``: the fewest sites' noise shares every sum holds (the site's node config); each share then has
    1 / noise_shares of the total noise's variance."""
    max_fallback_epsilon: float | None = None
    """``distributed``: the most the ledger's fallback epsilon (the site's own shares alone) may reach; defaults to
    the budget."""

    @classmethod
    def from_settings(cls, settings: RunSettings, policy: SiteLimits | None = None) -> PrivacyPlan:
        """The run's target under the site's own budget and delta (``client.policy`` declined any other delta)."""
        if policy is None:
            return cls(settings.dp, settings.epsilon, settings.delta, settings.max_grad_norm, settings.rounds,
                       popularity_share=settings.popularity_share, noise_placement=settings.noise)
        return cls(settings.dp, settings.epsilon, policy.delta, settings.max_grad_norm, settings.rounds,
                   policy.max_epsilon, settings.popularity_share, policy.window_epsilon > 0, settings.noise,
                   int(policy.secure_aggregation_sites), policy.fallback_cap)

    @property
    def budget(self) -> float:
        return self.target_epsilon if self.max_epsilon is None else self.max_epsilon

    @property
    def fallback_cap(self) -> float:
        return self.budget if self.max_fallback_epsilon is None else self.max_fallback_epsilon


@dataclass(frozen=True)
class RoundPlan:
    """What one round will do at this site, known before any training, from public values only."""

    sample_rate: float
    steps: int
    noise_multiplier: float


def plan_round(training: LocalTraining, privacy: PrivacyPlan) -> RoundPlan:
    steps = steps_per_round(privacy.noise_placement, training.local_epochs, training.sample_rate)
    noise = 0.0
    if privacy.enabled and privacy.popularity_share > 0:  # the target covers the popularity release too
        before = popularity_step(privacy.target_epsilon, privacy.delta, privacy.popularity_share)
        noise = training_noise(
            [before], privacy.target_epsilon, privacy.delta, training.sample_rate, steps * privacy.planned_rounds
        )
    elif privacy.enabled:
        noise = calibrate_noise(
            privacy.target_epsilon, privacy.delta, training.sample_rate, steps * privacy.planned_rounds
        )
    return RoundPlan(training.sample_rate, steps, noise)


def round_mechanism(privacy: PrivacyPlan, plan: RoundPlan) -> GaussianMechanism:
    """The round's Gaussian mechanism at this site: the plan's noise, rate and steps, the run's clip, the site's
    placement and its number of noise shares (``distributed``)."""
    return GaussianMechanism(plan.noise_multiplier, privacy.max_grad_norm, plan.sample_rate, plan.steps,
                             privacy.noise_placement, privacy.noise_shares)
