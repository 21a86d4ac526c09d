"""One site's local training for one round: DP-SGD with Opacus, budgeted by the site's ledger.

Privacy unit: the user. Each user is one training example (their most recent
``max_len`` items), users are Poisson-sampled at rate q = 1 / ceil(n / B) (B
the expected batch), every per-user gradient is clipped to ``max_grad_norm``
and Gaussian noise of std ``noise_multiplier * max_grad_norm`` is added to the
sum. The noise multiplier is calibrated so that *all planned rounds together*
cost the target epsilon. Before training, the round's cost is checked against
the site's own budget using the ledger on the site's disk; a round that would
overspend is declined and nothing is trained. A round retried with the same
global model re-sends the update already released (``client.replay``).
"""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping, register_norm_sampler
from opacus.optimizers import DPOptimizer
from opacus.utils.batch_memory_manager import BatchMemoryManager
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.errors import ConfigError
from common.federation import RunSettings
from client.policy import SitePolicy
from client.replay import ReleasedUpdate, weights_fingerprint
from common.ledger import Ledger, Spend
from common.model import LossName, SASRec, per_user_loss, sequence_loss
from common.privacy import (
    ACCOUNTANT,
    GRAD_SAMPLE_MODES,
    GradSampleMode,
    MechanismStep,
    calibrate_noise,
    epsilon_from_history,
)
from common.split import TrainingExamples, length_sorted_pieces, trim_left_padding

BUDGET_TOLERANCE = 1e-9
PIECE_USERS = 16
"""Batches are run in length-sorted pieces of this many users (``common.split.length_sorted_pieces``)."""

# Opacus' hooks on the embedding tables, whose inputs (item ids) take no gradient, make PyTorch warn on every
# backward pass; the hook still gets the output gradient it needs (tests/client/test_dp.py checks the clipping).
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect")


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

    sample_rate: float = 0.1
    batch_size: int = 64
    local_epochs: float = 1.0
    learning_rate: float = 1e-3
    loss: LossName = "ce"
    grad_sample_mode: GradSampleMode = "ghost"
    max_physical_batch_size: int = 0
    """Split larger Poisson batches into pieces of at most this many users (0: never split); privacy is unchanged."""

    def __post_init__(self) -> None:
        if not 0 < self.sample_rate <= 1:
            raise ConfigError(f"sample-rate={self.sample_rate}: must be in (0, 1]")
        if self.batch_size < 1 or self.local_epochs <= 0 or self.learning_rate <= 0:
            raise ConfigError("batch size, local epochs and learning rate must be positive")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ConfigError(
                f"grad-sample-mode='{self.grad_sample_mode}': use one of {', '.join(GRAD_SAMPLE_MODES)}"
            )
        if self.max_physical_batch_size < 0:
            raise ConfigError(f"max-physical-batch-size={self.max_physical_batch_size}: must be 0 (off) or positive")

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

    enabled: bool = True
    target_epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    planned_rounds: int = 10
    max_epsilon: float | None = None
    """The site's budget over all runs on these users; defaults to the target."""
    site_delta: float | None = None
    """The delta of the site's budget and ledger; defaults to ``delta``."""

    def __post_init__(self) -> None:
        if self.enabled and (self.target_epsilon <= 0 or not 0 < self.delta < 1 or self.max_grad_norm <= 0):
            raise ConfigError("DP needs epsilon > 0, 0 < delta < 1 and a positive clipping norm")
        if self.enabled and self.delta > self.budget_delta:
            raise ConfigError(f"the run's delta={self.delta:g} is above the site's delta={self.budget_delta:g}")
        if self.planned_rounds < 1:
            raise ConfigError("planned rounds must be at least 1")

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


@dataclass(frozen=True)
class RoundOutcome:
    """``state_dict`` is None when the site declined; ``epsilon`` is the site's total after this round."""

    state_dict: dict[str, torch.Tensor] | None
    epsilon: float
    declined_reason: str = ""


def check_delta(num_users: int, delta: float) -> None:
    """The operator's rule for choosing a delta: checked by ``fedtail deploy check`` and a simulation's launcher.

    Not applied in a round: whether it holds depends on the exact user count,
    so a round declined for it would tell the coordinator about that count.
    """
    if delta >= 1.0 / max(num_users, 1):
        raise ConfigError(
            f"delta={delta:g} is not below 1/users = 1/{num_users} at this site; "
            "a delta that large allows releasing a user's data outright"
        )


def train_site_round(
    model: SASRec,
    examples: TrainingExamples,
    training: LocalTraining,
    privacy: PrivacyPlan,
    ledger: Ledger | None,
    run_id: str,
    round_number: int,
    site: str,
    device: torch.device,
    seed: int,
) -> RoundOutcome:
    """Train ``model`` (holding the global weights) for one round; record the spend before returning.

    Under DP every outcome (trained, replayed, declined for the budget) and
    every number in it is a function of public values and of the ledger's
    history, never of how many users the site has: a site with no users at
    all trains too, and releases pure noise.
    """
    torch.manual_seed(seed)  # dropout and the like: public randomness is fine there
    if not privacy.enabled:
        warnings.warn("NON-PRIVATE training at this site: no clipping, no noise, no privacy guarantee", stacklevel=2)
        _train_non_private(model, examples, training, device, torch.Generator().manual_seed(seed))
        return RoundOutcome(_weights(model), float("inf"))

    if ledger is None:
        raise ConfigError("DP training needs a ledger on the site's disk")
    plan = plan_round(training, privacy)
    released = ReleasedUpdate(ledger.path.with_suffix(".last-update.pt"))
    global_fingerprint = weights_fingerprint(model.state_dict())
    history = ledger.history()
    replay = released.find(run_id, round_number, global_fingerprint)
    if replay is not None:
        return RoundOutcome(replay, epsilon_from_history(history, privacy.delta))
    spent = epsilon_from_history(history, privacy.budget_delta)
    after = epsilon_from_history([*history, (plan.noise_multiplier, plan.sample_rate, plan.steps)], privacy.budget_delta)
    if after > privacy.budget + BUDGET_TOLERANCE:
        return RoundOutcome(
            None,
            epsilon_from_history(history, privacy.delta),
            f"declined: this round would raise the site's epsilon from {spent:.3f} to {after:.3f} at its delta "
            f"{privacy.budget_delta:g}, above its budget of {privacy.budget:g}",
        )
    noise_multiplier, sample_rate, steps = _train_private(model, examples, training, privacy, plan, device)
    ledger.append(
        Spend(
            run_id=run_id,
            round=round_number,
            site=site,
            sample_rate=sample_rate,
            noise_multiplier=noise_multiplier,
            max_grad_norm=privacy.max_grad_norm,
            steps=steps,
            delta=privacy.budget_delta,
            accountant=ACCOUNTANT,
            library_versions={name: version(name) for name in ("opacus", "torch", "flwr")},
            users=len(examples),
        )
    )
    weights = _weights(model)
    released.save(run_id, round_number, global_fingerprint, weights)
    return RoundOutcome(weights, epsilon_from_history(ledger.history(), privacy.delta))


def secret_generator(device: torch.device) -> torch.Generator:
    """Seeded from the operating system's entropy, never from run parameters.

    Which users a step samples and the noise it adds must be unpredictable to
    the server: with a seed it could compute, it could subtract the noise or
    know the batch, and the accounted epsilon would be a fiction.
    """
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


@dataclass
class PrivateTraining:
    """What Opacus hands back: train ``model`` with ``optimizer`` on ``loader``.

    ``loss(inputs, targets)`` runs the model and returns a loss whose
    ``backward()`` does what the mode needs (see ``GhostClipping``); always use
    it, never ``sequence_loss`` directly, on a private model.
    """

    engine: PrivacyEngine
    model: torch.nn.Module
    optimizer: DPOptimizer
    loader: DataLoader[Any]
    loss: Callable[[torch.Tensor, torch.Tensor], Any]
    sums_over_pieces: bool
    """Whether several ``loss(...).backward()`` before one step add up to the batch's clipped sum (ghost
    clipping: yes; Opacus' per-sample hooks keep one batch's samples and would not)."""


def make_private(
    model: SASRec,
    examples: TrainingExamples,
    training: LocalTraining,
    privacy: PrivacyPlan,
    plan: RoundPlan,
    sampling_generator: torch.Generator,
    noise_generator: torch.Generator,
) -> PrivateTraining:
    """Opacus' PrivacyEngine over one user per example, Poisson sampling, flat per-user clipping.

    The loader samples at the plan's public rate, and the optimizer divides by
    the public ``batch_size``: Opacus would derive both from the number of
    users (1 / len(loader) and users x rate), which the coordinator must not
    learn. The noise generator must live on the model's device (Opacus draws
    the noise there).
    """
    sampler = UniformWithReplacementSampler(
        num_samples=len(examples), sample_rate=plan.sample_rate, generator=sampling_generator
    )
    loader = DataLoader(
        TensorDataset(examples.inputs, examples.targets), batch_sampler=sampler, collate_fn=_stack_users(examples)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=training.learning_rate)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=ACCOUNTANT)
        made = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=privacy.max_grad_norm,
            poisson_sampling=False,  # the loader above already samples users independently at the plan's rate
            noise_generator=noise_generator,
            grad_sample_mode=training.grad_sample_mode,
        )
    ghost = training.grad_sample_mode == "ghost"
    if ghost:
        private_model, private_optimizer, _, private_loader = made  # Opacus' criterion: replaced, see GhostClipping
    else:
        private_model, private_optimizer, private_loader = made
        private_model.forbid_grad_accumulation()  # one backward per step, as Opacus does under Poisson sampling
    private_optimizer.expected_batch_size = training.batch_size
    private_optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=plan.sample_rate))
    loss = GhostClipping(private_model, training.loss) if ghost else HooksClipping(private_model, training.loss)
    return PrivateTraining(engine, private_model, private_optimizer, private_loader, loss, sums_over_pieces=ghost)


def _stack_users(examples: TrainingExamples) -> Callable[[list[tuple[torch.Tensor, ...]]], list[torch.Tensor]]:
    """Collate sampled users into (inputs, targets); an empty Poisson draw gives [0, L] tensors."""

    def collate(rows: list[tuple[torch.Tensor, ...]]) -> list[torch.Tensor]:
        if not rows:
            return [examples.inputs[:0], examples.targets[:0]]
        return [torch.stack(column) for column in zip(*rows)]

    return collate


def clip_coefficients(norms: torch.Tensor, per_user: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """min(1, C / norm) per user, and exactly 0 for a user whose loss or gradient norm is not finite: [B].

    Opacus' own coefficient stays NaN for a NaN norm, and one such user turns
    the whole noisy sum into NaN: a release that says whether that user was
    sampled. With coefficient 0 (and their gradient rows replaced, not
    multiplied, since 0 x inf is NaN) such a user adds exactly nothing, as if
    absent.
    """
    finite = torch.isfinite(norms) & torch.isfinite(per_user)
    return torch.where(finite, (max_grad_norm / (norms + 1e-6)).clamp(max=1.0), torch.zeros_like(norms))


@dataclass
class HooksClipping:
    """The loss for Opacus' per-sample hooks: ``loss(inputs, targets).backward()`` leaves per-user gradients.

    Opacus clips them in ``optimizer.step()``; before that, the gradients of a
    user whose loss or gradient is not finite are set to zero, so Opacus gives
    that user a norm of 0 and adds nothing for them (``clip_coefficients``).
    """

    module: GradSampleModule
    loss: LossName

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> HooksClippedLoss:
        return HooksClippedLoss(self.module, per_user_loss(self.module(inputs), targets, self.loss))


@dataclass
class HooksClippedLoss:
    module: GradSampleModule
    per_user: torch.Tensor
    """[B] each user's loss"""

    def backward(self) -> None:
        (self.per_user.sum() / max(len(self.per_user), 1)).backward()  # the batch mean, as sequence_loss
        samples = [p for p in self.module.parameters() if p.requires_grad and p.grad_sample is not None]
        if not samples or len(self.per_user) == 0:
            return
        norms = torch.stack([p.grad_sample.flatten(1).norm(dim=1) for p in samples]).norm(dim=0)  # [B]
        keep = clip_coefficients(norms, self.per_user.detach(), 1.0) > 0
        for p in samples:
            p.grad_sample = torch.where(keep.view(-1, *[1] * (p.grad_sample.dim() - 1)), p.grad_sample, 0.0)


@dataclass
class GhostClipping:
    """The loss for ghost clipping: ``loss(inputs, targets).backward()`` leaves the clipped sum in ``.grad``.

    Replaces Opacus' ``DPLossFastGradientClipping``, which backpropagates the
    whole graph twice, once to measure the per-user norms and once for the
    clipped sum. Every user's loss depends only on their own rows, so the
    second pass's output gradients are the first pass's scaled per user by the
    clipping coefficient; what is done once here instead of twice:

    - the loss's gradient with respect to the scores (the softmax over the
      catalogue);
    - the output layer's input gradient (a catalogue-sized product): the
      clipped pass starts below the output layer from the first pass's
      hidden-state gradient, and the output layer's weight gradient is one
      product of the clipped score gradients with the hidden states;
    - every other weight gradient: the norm pass asks autograd only for the
      hidden states and the embedding tables (the parameters nearest the
      input), so each layer's output gradient is computed, and Opacus' hooks
      measure every per-user norm, but no weight gradient is computed to be
      discarded.
    """

    module: GradSampleModuleFastGradientClipping
    loss: LossName

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> GhostClippedLoss:
        model: SASRec = self.module._module  # Opacus' hooks sit on its layers, so they fire for these calls too
        # An empty batch has no norm to measure, and activations captured for it would never be consumed: the
        # next forward pass would then fail Opacus' parameter-tying check.
        with _hooks_off(self.module) if len(inputs) == 0 else nullcontext():
            hidden = model.hidden_states(inputs)  # [B, L, D]
            scores = model.output(hidden)  # [B, L, N]
        detached = scores.detach().requires_grad_()
        return GhostClippedLoss(
            self.module, model.output, hidden, scores, detached, per_user_loss(detached, targets, self.loss)
        )


@dataclass
class GhostClippedLoss:
    module: GradSampleModuleFastGradientClipping
    output_layer: nn.Linear
    hidden: torch.Tensor
    """[B, L, D] the output layer's input, with its graph"""
    scores: torch.Tensor
    """[B, L, N] the output layer's output, with its graph"""
    detached_scores: torch.Tensor
    per_user: torch.Tensor
    """[B] each user's loss, computed from ``detached_scores``"""

    def backward(self) -> None:
        if self.per_user.numel() == 0:  # an empty Poisson batch: zero gradients, the optimizer adds the noise
            self._clipped_pass(self.scores, torch.zeros_like(self.scores))
            return
        batch = len(self.per_user)
        (score_gradients,) = torch.autograd.grad(self.per_user.sum(), self.detached_scores)  # row b: user b's alone
        for parameter in self.module.trainable_parameters:
            parameter._norm_sample = None  # type: ignore[attr-defined]
        entry = [m.weight for m in self.module.modules() if isinstance(m, nn.Embedding) and m.weight.requires_grad]
        # The gradient of the batch mean: the convention the hooks were built with ("mean": they rescale by B).
        hidden_gradient, *_ = torch.autograd.grad(
            self.scores, [self.hidden, *entry], grad_outputs=score_gradients / batch, retain_graph=True
        )
        unmeasured = [name for name, p in self.module.named_parameters() if p.requires_grad and p._norm_sample is None]
        if unmeasured:
            raise RuntimeError(f"ghost clipping measured no per-user norm for {unmeasured}: refusing to clip blind")
        coefficients = clip_coefficients(
            self.module.get_norm_sample(), self.per_user.detach(), self.module.max_grad_norm
        ).view(-1, 1, 1)  # [B, 1, 1]
        kept = coefficients > 0
        clipped_scores = torch.where(kept, score_gradients * coefficients, 0.0).flatten(0, 1)  # [B * L, N]
        _accumulate(self.output_layer.weight, clipped_scores.T @ self.hidden.detach().flatten(0, 1))
        if self.output_layer.bias is not None:
            _accumulate(self.output_layer.bias, clipped_scores.sum(dim=0))
        self._clipped_pass(self.hidden, torch.where(kept, hidden_gradient * (batch * coefficients), 0.0))

    def _clipped_pass(self, output: torch.Tensor, gradient: torch.Tensor) -> None:
        """The sum of clipped per-user gradients into ``.grad``, with Opacus' hooks off."""
        with _hooks_off(self.module):
            output.backward(gradient)


@contextmanager
def _hooks_off(module: GradSampleModuleFastGradientClipping) -> Iterator[None]:
    module.disable_hooks()
    try:
        yield
    finally:
        module.enable_hooks()


def _accumulate(parameter: nn.Parameter, gradient: torch.Tensor) -> None:
    parameter.grad = gradient if parameter.grad is None else parameter.grad + gradient


@register_norm_sampler(nn.Embedding)
def embedding_norm_sample(
    layer: nn.Embedding, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-user gradient norms of an embedding table in one batched product (replaces Opacus' own).

    A user's gradient for row r is the sum of the output gradients at the
    positions holding r, so its squared norm is the sum of <g_t, g_s> over the
    pairs of positions holding the same index (the padding row gets no
    gradient). Opacus' version loops over index pairs element by element:
    a fifth of a ghost-clipping step at 3,000 items.
    """
    ids = activations[0].reshape(len(backprops), -1)  # [B, T]
    grads = backprops.reshape(len(backprops), ids.shape[1], -1)  # [B, T, D]
    same_row = ids.unsqueeze(2) == ids.unsqueeze(1)  # [B, T, T]
    if layer.padding_idx is not None:
        same_row &= (ids != layer.padding_idx).unsqueeze(2)
    gram = grads @ grads.transpose(1, 2)  # [B, T, T]
    return {layer.weight: (gram * same_row).sum(dim=(1, 2)).clamp(min=0).sqrt()}


@register_norm_sampler(nn.Linear)
def linear_norm_sample(
    layer: nn.Linear, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-user gradient norms of a linear layer over sequences (replaces Opacus' own).

    The weight's squared norm is <g g^T, a a^T> over position pairs (Opacus'
    formula). The bias gradient is the sum of the output gradients over
    positions, whose norm is direct; Opacus builds the [B, T, T] Gram matrix
    of the output gradients a second time for it, which on the output layer
    costs a catalogue-sized product per step.
    """
    inputs = activations[0].to(backprops.dtype).reshape(len(backprops), -1, activations[0].shape[-1])  # [B, T, in]
    grads = backprops.reshape(len(backprops), -1, backprops.shape[-1])  # [B, T, out]
    norms = {}
    if layer.weight.requires_grad:
        grad_gram = grads @ grads.transpose(1, 2)  # [B, T, T]
        input_gram = inputs @ inputs.transpose(1, 2)  # [B, T, T]
        norms[layer.weight] = (grad_gram * input_gram).sum(dim=(1, 2)).clamp(min=0).sqrt()
    if layer.bias is not None and layer.bias.requires_grad:
        norms[layer.bias] = grads.sum(dim=1).norm(dim=-1)
    return norms


def private_step(
    private: PrivateTraining, inputs: torch.Tensor, targets: torch.Tensor, piece_users: int = PIECE_USERS
) -> bool:
    """One DP-SGD (physical) step on a Poisson-sampled batch, possibly empty: noise is still added.

    Returns whether a logical step ended (the optimizer updated the weights and
    the accountant counted it); with physical batch splitting, the pieces before
    the last one of a logical batch only accumulate clipped gradients.
    """
    if private.sums_over_pieces:
        pieces = length_sorted_pieces(inputs, targets, piece_users)
    else:
        pieces = [trim_left_padding(inputs, targets) if len(inputs) else (inputs, targets)]
    private.optimizer.zero_grad(set_to_none=True)
    for piece_inputs, piece_targets in pieces:
        private.loss(piece_inputs, piece_targets).backward()  # ghost clipping adds each piece's clipped sum to .grad
    private.optimizer.step()
    return not private.optimizer._is_last_step_skipped  # Opacus' own flag; no public accessor in 1.6


@contextmanager
def physical_batches(private: PrivateTraining, training: LocalTraining) -> Iterator[DataLoader[Any]]:
    """The private loader, split by Opacus' BatchMemoryManager when a physical batch limit is set."""
    if training.max_physical_batch_size == 0:
        yield private.loader
        return
    with BatchMemoryManager(
        data_loader=private.loader,
        max_physical_batch_size=training.max_physical_batch_size,
        optimizer=private.optimizer,
    ) as loader:
        yield loader


def _train_private(
    model: SASRec,
    examples: TrainingExamples,
    training: LocalTraining,
    privacy: PrivacyPlan,
    plan: RoundPlan,
    device: torch.device,
) -> MechanismStep:
    """Run the round's DP-SGD steps; returns what Opacus' own accountant recorded (the ledger's source)."""
    model.to(device).train()
    private = make_private(
        model, examples, training, privacy, plan, secret_generator(torch.device("cpu")), secret_generator(device)
    )
    steps_done = 0
    with physical_batches(private, training) as loader:
        while steps_done < plan.steps:
            for inputs, targets in loader:
                steps_done += private_step(private, inputs.to(device), targets.to(device))
                if steps_done == plan.steps:
                    break
    private.model.cleanup()  # the model goes back to plain PyTorch (no hooks, no grad_sample attributes)
    recorded = private.engine.accountant.history
    planned = (plan.noise_multiplier, plan.sample_rate, plan.steps)
    if len(recorded) != 1 or not all(math.isclose(a, b) for a, b in zip(recorded[0], planned)):
        raise RuntimeError(f"Opacus recorded {recorded}, the plan was {planned}: refusing to release these weights")
    return recorded[0]


def _train_non_private(
    model: SASRec,
    examples: TrainingExamples,
    training: LocalTraining,
    device: torch.device,
    generator: torch.Generator,
) -> None:
    """Shuffled batches of ``batch_size`` users for ``local_epochs`` epochs (only where the site allows it)."""
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=training.learning_rate)
    batch = training.batch_size
    steps = max(1, math.ceil(training.local_epochs * math.ceil(len(examples) / batch)))
    steps_done = 0
    while steps_done < steps and len(examples):
        order = torch.randperm(len(examples), generator=generator)
        for start in range(0, len(examples), batch):
            rows = order[start : start + batch]
            optimizer.zero_grad(set_to_none=True)
            for inputs, targets in length_sorted_pieces(examples.inputs[rows], examples.targets[rows], PIECE_USERS):
                per_user = per_user_loss(model(inputs.to(device)), targets.to(device), training.loss)
                (per_user.sum() / len(rows)).backward()  # the pieces' gradients add up to the batch mean's
            optimizer.step()
            steps_done += 1
            if steps_done == steps:
                break


def _weights(model: SASRec) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
