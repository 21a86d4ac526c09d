"""User-level DP-FedAvg at one site: the sum of sampled users' clipped model deltas, without noise.

With ``user-update = delta`` (under ``noise = central`` or ``distributed``), a
sampled user's contribution is not their gradient at the global weights but
what a few steps of local training on their own history alone would do to
the weights (McMahan et al., ICLR 2018; the algorithm of Gboard and
pfl-research): ``user-steps`` steps of plain SGD at ``user-learning-rate``,
from the coordinator's weights, and the delta theta_K - theta_0 clipped to
norm C. The site returns the sum of the clipped deltas; the coordinator adds
the same noise as for gradients and steps against -(noisy mean delta).

Privacy: the sampling is the same Poisson sampling at the public rate as
DP-SGD's, and each user's clipped delta is a function of that user's history
and of the global weights alone, of norm at most C: one user moves the sum by
at most C, exactly the sensitivity of the clipped-gradient sum. The release is
the same subsampled Gaussian mechanism, accounted as one step per round.

Every user's local training runs apart from every other's: vectorised over
users with ``torch.func`` (``vmap`` of ``grad``, dropout drawn per user), in
length-sorted chunks of at most ``chunk_users`` users to bound memory, each
user with their own copy of the weights. After every local step each user's
weights are projected onto the site's box (``client.dp_sgd.project_onto_box``),
so every forward pass runs on bounded weights whatever the learning rate; a
user whose loss or gradient was not finite at any step adds exactly 0, as if
absent (``client.clipping.clip_coefficients``), and, their training being
their own, cannot reach another user's delta.
"""

from __future__ import annotations

import torch
from torch.func import functional_call, grad_and_value, vmap

from client.clipping import clip_coefficients
from client.dp_sgd import poisson_sample
from common.data.split import TrainingExamples, length_sorted_pieces
from common.privacy.mechanisms.gaussian import secret_generator
from common.protocol.round_plan import LocalTraining
from common.recommender.model import SASRec, per_user_loss

Weights = dict[str, torch.Tensor]
CHUNK_USERS = 8
"""Users trained side by side: each holds a copy of the weights and their gradient (the item table's is dense), so
memory grows with chunk x catalogue x hidden; on CPU 8 was faster than 16, 32 or 64 at 12,000 items (cache)."""


def clipped_delta_sum(
    model: SASRec,
    examples: TrainingExamples,
    training: LocalTraining,
    max_norm: float,
    device: torch.device,
    chunk_users: int = CHUNK_USERS,
) -> Weights:
    """Sum over one Poisson sample (rate ``training.sample_rate``) of each user's model delta clipped to ``max_norm``.

    Returns one tensor per trainable parameter, on the CPU; an empty sample
    gives zeros. The model's weights are left as they were. The sampling
    generator is seeded from the operating system (``secret_generator``).
    """
    model.to(device).train()
    total = {name: torch.zeros_like(p) for name, p in model.named_parameters() if p.requires_grad}
    sampled = poisson_sample(len(examples), training.sample_rate, secret_generator(torch.device("cpu")))
    if len(sampled):
        for inputs, targets in chunks(examples.inputs[sampled], examples.targets[sampled], chunk_users):
            deltas, finite = user_deltas(model, inputs.to(device), targets.to(device), training)
            kept, coefficients = clip_factors(deltas, finite, max_norm)
            for name, delta in deltas.items():
                # Only the kept users' rows enter the product: 0 x NaN would be NaN.
                total[name] += torch.tensordot(coefficients[kept], delta[kept] if not kept.all() else delta, dims=1)
    return {name: value.detach().cpu() for name, value in total.items()}


def chunks(inputs: torch.Tensor, targets: torch.Tensor, chunk_users: int) -> list[tuple[torch.Tensor, ...]]:
    """Length-sorted, trimmed pieces (``length_sorted_pieces``) of at most ``chunk_users`` users each."""
    return [
        chunk
        for piece_inputs, piece_targets in length_sorted_pieces(inputs, targets, chunk_users)
        for chunk in zip(piece_inputs.split(chunk_users), piece_targets.split(chunk_users), strict=True)
    ]


def clip_factors(deltas: Weights, finite: torch.Tensor, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Which users are kept ([B] bool) and each one's factor min(1, C / norm) ([B]; 0 for a user not kept).

    A user is not kept when their training was not ``finite`` or their delta's norm is not
    (``clip_coefficients``)."""
    norms = torch.stack([delta.flatten(1).norm(dim=1) for delta in deltas.values()]).norm(dim=0)  # [B]
    coefficients = clip_coefficients(norms, torch.where(finite, 0.0, torch.nan), max_norm)
    return coefficients > 0, coefficients


def user_deltas(
    model: SASRec, inputs: torch.Tensor, targets: torch.Tensor, training: LocalTraining
) -> tuple[Weights, torch.Tensor]:
    """Each user's theta_K - theta_0 after ``training.user_steps`` SGD steps on their own history ([B, ...] per
    trainable parameter), and whether each user's loss was finite at every step ([B] bool).

    The loss is the training loss (``per_user_loss``: the user's mean over their positions); dropout follows the
    model's mode, with masks drawn independently per user (``randomness="different"``).
    """
    if training.user_steps < 1:  # the run config's rule; without a step the delta would be taken in place of theta_0
        raise ValueError(f"user-steps={training.user_steps}: must be at least 1")
    start = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    fixed = {name: p.detach() for name, p in model.named_parameters() if not p.requires_grad}
    fixed |= dict(model.named_buffers())
    bound, rate = training.max_abs_weight, training.user_learning_rate

    def loss(weights: Weights, user_inputs: torch.Tensor, user_targets: torch.Tensor) -> torch.Tensor:
        scores = functional_call(model, {**weights, **fixed}, (user_inputs.unsqueeze(0),))
        return per_user_loss(scores, user_targets.unsqueeze(0), training.loss)[0]

    finite = torch.ones(len(inputs), dtype=torch.bool, device=inputs.device)
    weights: Weights = start
    for step in range(training.user_steps):
        shared = step == 0  # every user starts from the same weights: no copies for the first step
        step_fn = vmap(grad_and_value(loss), in_dims=(None if shared else 0, 0, 0), randomness="different")
        gradients, losses = step_fn(weights, inputs, targets)
        finite &= torch.isfinite(losses)
        # Clamped, not nan_to_num'd: an infinity goes to the box's end, a NaN stays and drops its user.
        weights = {name: gradient.mul_(-rate).add_(weights[name]).clamp_(-bound, bound)
                   for name, gradient in gradients.items()}
    return {name: weights[name].sub_(start[name]) for name in start}, finite
