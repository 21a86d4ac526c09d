"""DP-SGD with Opacus at one site: the PrivacyEngine wiring and the training loops.

Per-user clipping happens in two places, one per grad-sample mode, both
built on ``client.clipping.clip_coefficients``: ``client.clipping`` for
Opacus' per-sample hooks and ``client.ghost_clipping`` for ghost clipping.
The round's mechanism (``common.privacy.mechanisms.gaussian``) gives Opacus
its clip and, under ``noise = site``, its noise multiplier: the noise is
Opacus' own, added in its DPOptimizer's step, drawn from a generator seeded
from the operating system (``secret_generator``), in Opacus' secure mode
(``gaussian_noise``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.optimizers import DPOptimizer
from opacus.utils.batch_memory_manager import BatchMemoryManager
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader, TensorDataset

from client.clipping import HooksClipping
from client.ghost_clipping import GhostClipping, use_fast_norm_samplers
from client.tied_grad_sampler import use_tied_samplers
from common.data.split import TrainingExamples, length_sorted_pieces, trim_left_padding
from common.privacy.accounting import HISTORY_RECORDER, MechanismStep
from common.privacy.mechanisms import SITE
from common.privacy.mechanisms.gaussian import secret_generator
from common.protocol.round_plan import LocalTraining, PrivacyPlan, RoundPlan, round_mechanism
from common.recommender.item_tables import trainable_parameters
from common.recommender.model import SASRec, per_user_loss

PIECE_USERS = 16
"""Batches are run in length-sorted pieces of this many users (``common.data.split.length_sorted_pieces``)."""

# Opacus' hooks on the embedding tables, whose inputs (item ids) take no gradient, make PyTorch warn on every
# backward pass; the hook still gets the output gradient it needs (tests/client/test_dp.py checks the clipping).
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect")


@dataclass
class PrivateTraining:
    """What Opacus hands back: train ``model`` with ``optimizer`` on ``loader``.

    ``loss(inputs, targets)`` runs the model and returns a loss whose
    ``backward()`` does what the mode needs (see ``GhostClipping``); always use
    it, never ``sequence_loss`` directly, on a private model.
    """

    engine: PrivacyEngine
    model: GradSampleModule
    optimizer: DPOptimizer
    loader: DataLoader[Any]
    loss: Callable[[torch.Tensor, torch.Tensor], Any]
    sums_over_pieces: bool
    """Whether several ``loss(...).backward()`` before one step add up to the batch's clipped sum (ghost
    clipping: yes; Opacus' per-sample hooks keep one batch's samples and would not)."""


class NoUsersSampler:
    """Poisson draws from a site with no users: every draw is empty, so each step adds pure noise.

    Opacus' sampler refuses zero samples, and a site that failed instead of
    training would tell the coordinator that it has no users.
    """

    def __init__(self, sample_rate: float) -> None:
        self.draws = int(1 / sample_rate)  # one pass, as UniformWithReplacementSampler counts it

    def __len__(self) -> int:
        return self.draws

    def __iter__(self) -> Iterator[list[int]]:
        return iter([[] for _ in range(self.draws)])


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

    Opacus runs the round mechanism's individual half (per-user clipping at
    its ``clip``) and, under ``noise = site``, its aggregate half (noise of
    the site's multiplier); under ``central`` the site's multiplier is 0 and
    the step only clips (``client.clipped_sum``). A ``distributed`` share is
    added to the projected sum, not per step (``client.secure_aggregation``).
    """
    mechanism = round_mechanism(privacy, plan)
    if mechanism.placement == "distributed":
        raise ValueError("a distributed noise share is added to the round's projected sum, not inside DP-SGD: "
                         "build the clipped sum with placement central (client.clipped_sum)")
    sampler: UniformWithReplacementSampler | NoUsersSampler = (
        UniformWithReplacementSampler(
            num_samples=len(examples), sample_rate=plan.sample_rate, generator=sampling_generator
        )
        if len(examples)
        else NoUsersSampler(plan.sample_rate)
    )
    loader = DataLoader(
        TensorDataset(examples.inputs, examples.targets), batch_sampler=sampler, collate_fn=_stack_users(examples)
    )
    optimizer = bounded_adam(model, training)
    use_tied_samplers()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=HISTORY_RECORDER)
        made = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=mechanism.noise_multiplier_at(SITE),
            max_grad_norm=mechanism.clip,
            poisson_sampling=False,  # the loader above already samples users independently at the plan's rate
            noise_generator=noise_generator,
            grad_sample_mode=training.grad_sample_mode,
        )
    ghost = training.grad_sample_mode == "ghost"
    if ghost:
        use_fast_norm_samplers()
        private_model, private_optimizer, _, private_loader = made  # Opacus' criterion: replaced, see GhostClipping
    else:
        private_model, private_optimizer, private_loader = made
        private_model.forbid_grad_accumulation()  # one backward per step, as Opacus does under Poisson sampling
    private_optimizer.expected_batch_size = training.batch_size
    private_optimizer.secure_mode = True  # Opacus' four-draw noise (``gaussian_noise``), from our generator
    private_optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=plan.sample_rate))
    loss = GhostClipping(private_model, training.loss) if ghost else HooksClipping(private_model, training.loss)
    return PrivateTraining(engine, private_model, private_optimizer, private_loader, loss, sums_over_pieces=ghost)


def bounded_adam(model: SASRec, training: LocalTraining) -> torch.optim.Adam:
    """Adam on the trainable weights, each projected onto the site's box after every step it takes.

    The box, |w| <= ``max_abs_weight`` (the site's node config), is what keeps
    every forward pass finite (``common.recommender.model.activation_bound``).
    Checking the coordinator's weights on arrival bounds only the first step:
    a learning rate or a noise draw large enough moves the weights past the
    box, and then a later step's forward pass overflows for some users, whose
    removal then depends on who was sampled. Projected after every step, every
    forward and backward pass of the round runs on bounded weights, whatever
    the run config. A non-finite weight (an overflowing update) goes to 0
    first, then everything is clamped.

    Under DP this is post-processing: the projection is a fixed function of
    the public box and of what the step already released (the noisy clipped
    sum, through Adam's state), so each step is still the subsampled Gaussian
    mechanism the ledger accounts for, run adaptively on weights that are a
    function of earlier noisy outputs, and the released weights are a function
    of the accounted steps alone. The hook sits on the inner optimizer, so it
    runs exactly when Opacus' ``DPOptimizer`` applies a noisy step (not for the
    pieces of a split batch), and never in ``client.clipped_sum``, which takes no step.
    """
    optimizer = torch.optim.Adam(trainable_parameters(model), lr=training.learning_rate)
    bound = training.max_abs_weight

    def project(*_: object) -> None:
        with torch.no_grad():
            for group in optimizer.param_groups:
                for parameter in group["params"]:
                    parameter.nan_to_num_(nan=0.0, posinf=bound, neginf=-bound).clamp_(-bound, bound)

    optimizer.register_step_post_hook(project)
    return optimizer


def poisson_sample(users: int, sample_rate: float, generator: torch.Generator) -> torch.Tensor:
    """The indices of one Poisson draw over ``users`` users at ``sample_rate``: Opacus' sampler, as DP-SGD's
    loader draws them (``make_private``); empty when there are no users."""
    if users == 0:  # Opacus' sampler refuses an empty dataset: nobody is drawn
        return torch.zeros(0, dtype=torch.long)
    draw = next(iter(UniformWithReplacementSampler(num_samples=users, sample_rate=sample_rate, generator=generator)))
    return torch.tensor(draw, dtype=torch.long)


def _stack_users(examples: TrainingExamples) -> Callable[[list[tuple[torch.Tensor, ...]]], list[torch.Tensor]]:
    """Collate sampled users into (inputs, targets); an empty Poisson draw gives [0, L] tensors."""

    def collate(rows: list[tuple[torch.Tensor, ...]]) -> list[torch.Tensor]:
        if not rows:
            return [examples.inputs[:0], examples.targets[:0]]
        return [torch.stack(column) for column in zip(*rows, strict=True)]

    return collate


def private_step(
    private: PrivateTraining, inputs: torch.Tensor, targets: torch.Tensor, piece_users: int = PIECE_USERS
) -> bool:
    """One DP-SGD (physical) step on a Poisson-sampled batch, possibly empty: noise is still added.

    Returns whether a logical step ended (the optimizer updated the weights and
    the accountant counted it); with physical batch splitting, the pieces before
    the last one of a logical batch only accumulate clipped gradients.
    """
    backward_clipped(private, inputs, targets, piece_users)
    private.optimizer.step()
    return not private.optimizer._is_last_step_skipped  # Opacus' own flag; no public accessor in 1.6


def backward_clipped(
    private: PrivateTraining, inputs: torch.Tensor, targets: torch.Tensor, piece_users: int = PIECE_USERS
) -> None:
    """The batch's backward passes, in length-sorted pieces where the mode sums over them; the optimizer clips.

    Afterwards ghost clipping holds the batch's clipped sum in ``.grad``, the
    hooks mode each user's gradient in ``grad_sample`` (clipped by the optimizer).
    """
    if private.sums_over_pieces:
        pieces = length_sorted_pieces(inputs, targets, piece_users)
    else:
        pieces = [trim_left_padding(inputs, targets) if len(inputs) else (inputs, targets)]
    private.optimizer.zero_grad(set_to_none=True)
    for piece_inputs, piece_targets in pieces:
        private.loss(piece_inputs, piece_targets).backward()  # ghost clipping adds each piece's clipped sum to .grad


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


def train_private(
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
    if len(recorded) != 1 or not all(math.isclose(a, b) for a, b in zip(recorded[0], planned, strict=True)):
        raise RuntimeError(f"Opacus recorded {recorded}, the plan was {planned}: refusing to release these weights")
    return recorded[0]


def train_non_private(
    model: SASRec,
    examples: TrainingExamples,
    training: LocalTraining,
    device: torch.device,
    generator: torch.Generator,
) -> None:
    """Shuffled batches of ``batch_size`` users for ``local_epochs`` epochs (only where the site allows it)."""
    model.to(device).train()
    optimizer = bounded_adam(model, training)
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
