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
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer
from torch.utils.data import DataLoader, TensorDataset

from common.errors import ConfigError
from client.replay import ReleasedUpdate, weights_fingerprint
from common.ledger import Ledger, Spend
from common.model import LossName, SASRec, sequence_loss
from common.privacy import ACCOUNTANT, MechanismStep, calibrate_noise, epsilon_from_history
from common.split import TrainingExamples, trim_left_padding

BUDGET_TOLERANCE = 1e-9


@dataclass(frozen=True)
class LocalTraining:
    """Public per-round training parameters, the same at every site."""

    expected_batch_size: int = 64
    local_epochs: float = 1.0
    learning_rate: float = 1e-3
    loss: LossName = "ce"

    def __post_init__(self) -> None:
        if self.expected_batch_size < 1 or self.local_epochs <= 0 or self.learning_rate <= 0:
            raise ConfigError("batch size, local epochs and learning rate must be positive")


@dataclass(frozen=True)
class PrivacyPlan:
    """The run's privacy target and the site's own cap; ``enabled=False`` is the non-private baseline."""

    enabled: bool = True
    target_epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    planned_rounds: int = 10
    max_epsilon: float | None = None
    """The site's budget over all runs on these users; defaults to the target."""

    def __post_init__(self) -> None:
        if self.enabled and (self.target_epsilon <= 0 or not 0 < self.delta < 1 or self.max_grad_norm <= 0):
            raise ConfigError("DP needs epsilon > 0, 0 < delta < 1 and a positive clipping norm")
        if self.planned_rounds < 1:
            raise ConfigError("planned rounds must be at least 1")

    @property
    def budget(self) -> float:
        return self.target_epsilon if self.max_epsilon is None else self.max_epsilon


@dataclass(frozen=True)
class RoundPlan:
    """What one round will do at this site, known before any training."""

    sample_rate: float
    steps: int
    noise_multiplier: float


def plan_round(num_users: int, training: LocalTraining, privacy: PrivacyPlan) -> RoundPlan:
    batches_per_epoch = math.ceil(num_users / training.expected_batch_size)
    sample_rate = 1.0 / batches_per_epoch  # exactly what Opacus derives from the data loader
    steps = max(1, math.ceil(training.local_epochs * batches_per_epoch))
    noise = 0.0
    if privacy.enabled:
        noise = calibrate_noise(privacy.target_epsilon, privacy.delta, sample_rate, steps * privacy.planned_rounds)
    return RoundPlan(sample_rate, steps, noise)


@dataclass(frozen=True)
class RoundOutcome:
    """``state_dict`` is None when the site declined; ``epsilon`` is the site's total after this round."""

    state_dict: dict[str, torch.Tensor] | None
    epsilon: float
    declined_reason: str = ""


def check_delta(num_users: int, delta: float) -> None:
    if delta >= 1.0 / num_users:
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
    """Train ``model`` (holding the global weights) for one round; record the spend before returning."""
    if len(examples) == 0:
        return RoundOutcome(None, 0.0, "this site has no user with two or more training interactions")
    torch.manual_seed(seed)  # dropout and the like: public randomness is fine there
    plan = plan_round(len(examples), training, privacy)
    if not privacy.enabled:
        warnings.warn("NON-PRIVATE training at this site: no clipping, no noise, no privacy guarantee", stacklevel=2)
        _train_non_private(model, examples, training, plan, device, torch.Generator().manual_seed(seed))
        return RoundOutcome(_weights(model), float("inf"))

    if ledger is None:
        raise ConfigError("DP training needs a ledger on the site's disk")
    check_delta(len(examples), privacy.delta)
    released = ReleasedUpdate(ledger.path.with_suffix(".last-update.pt"))
    global_fingerprint = weights_fingerprint(model.state_dict())
    history = ledger.history()
    spent = epsilon_from_history(history, privacy.delta)
    replay = released.find(run_id, round_number, global_fingerprint)
    if replay is not None:
        return RoundOutcome(replay, spent)
    after = epsilon_from_history([*history, (plan.noise_multiplier, plan.sample_rate, plan.steps)], privacy.delta)
    if after > privacy.budget + BUDGET_TOLERANCE:
        return RoundOutcome(
            None,
            spent,
            f"declined: this round would raise the site's epsilon from {spent:.3f} to {after:.3f}, "
            f"above its budget of {privacy.budget:g}",
        )
    noise_multiplier, sample_rate, steps = _train_private(model, examples, training, privacy, plan, device)
    entry = ledger.append(
        Spend(
            run_id=run_id,
            round=round_number,
            site=site,
            sample_rate=sample_rate,
            noise_multiplier=noise_multiplier,
            max_grad_norm=privacy.max_grad_norm,
            steps=steps,
            delta=privacy.delta,
            accountant=ACCOUNTANT,
            library_versions={name: version(name) for name in ("opacus", "torch", "flwr")},
            users=len(examples),
        )
    )
    weights = _weights(model)
    released.save(run_id, round_number, global_fingerprint, weights)
    return RoundOutcome(weights, float(entry["epsilon_so_far"]))


def secret_generator(device: torch.device) -> torch.Generator:
    """Seeded from the operating system's entropy, never from run parameters.

    Which users a step samples and the noise it adds must be unpredictable to
    the server: with a seed it could compute, it could subtract the noise or
    know the batch, and the accounted epsilon would be a fiction.
    """
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


def make_private(
    model: SASRec,
    examples: TrainingExamples,
    training: LocalTraining,
    privacy: PrivacyPlan,
    plan: RoundPlan,
    sampling_generator: torch.Generator,
    noise_generator: torch.Generator,
) -> tuple[PrivacyEngine, torch.nn.Module, DPOptimizer, DataLoader[Any]]:
    """Opacus' PrivacyEngine over one user per example, Poisson sampling, flat per-user clipping.

    The noise generator must live on the model's device (Opacus draws the noise there).
    """
    loader = DataLoader(
        TensorDataset(examples.inputs, examples.targets),
        batch_size=training.expected_batch_size,
        generator=sampling_generator,
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=training.learning_rate)
    engine = PrivacyEngine(accountant=ACCOUNTANT)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        private_model, private_optimizer, private_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=privacy.max_grad_norm,
            poisson_sampling=True,
            noise_generator=noise_generator,
        )
    return engine, private_model, private_optimizer, private_loader


def private_step(
    model: torch.nn.Module, optimizer: DPOptimizer, inputs: torch.Tensor, targets: torch.Tensor, loss: LossName
) -> None:
    """One DP-SGD step on a Poisson-sampled batch (possibly empty: noise is still added)."""
    if len(inputs):
        inputs, targets = trim_left_padding(inputs, targets)
    optimizer.zero_grad(set_to_none=True)
    value = sequence_loss(model(inputs), targets, loss)
    value.backward()
    optimizer.step()


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
    engine, private_model, optimizer, loader = make_private(
        model, examples, training, privacy, plan, secret_generator(torch.device("cpu")), secret_generator(device)
    )
    steps_done = 0
    while steps_done < plan.steps:
        for inputs, targets in loader:
            private_step(private_model, optimizer, inputs.to(device), targets.to(device), training.loss)
            steps_done += 1
            if steps_done == plan.steps:
                break
    private_model.cleanup()  # the model goes back to plain PyTorch (no hooks, no grad_sample attributes)
    recorded = engine.accountant.history
    planned = (plan.noise_multiplier, plan.sample_rate, plan.steps)
    if len(recorded) != 1 or not all(math.isclose(a, b) for a, b in zip(recorded[0], planned)):
        raise RuntimeError(f"Opacus recorded {recorded}, the plan was {planned}: refusing to release these weights")
    return recorded[0]


def _train_non_private(
    model: SASRec,
    examples: TrainingExamples,
    training: LocalTraining,
    plan: RoundPlan,
    device: torch.device,
    generator: torch.Generator,
) -> None:
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=training.learning_rate)
    batch = training.expected_batch_size
    steps_done = 0
    while steps_done < plan.steps:
        order = torch.randperm(len(examples), generator=generator)
        for start in range(0, len(examples), batch):
            rows = order[start : start + batch]
            inputs, targets = trim_left_padding(examples.inputs[rows], examples.targets[rows])
            optimizer.zero_grad(set_to_none=True)
            sequence_loss(model(inputs.to(device)), targets.to(device), training.loss).backward()
            optimizer.step()
            steps_done += 1
            if steps_done == plan.steps:
                break


def _weights(model: SASRec) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
