"""Ghost clipping: per-user gradient norms without per-user gradients, then one backward pass of the clipped sum.

Memory does not grow with batch x catalogue x hidden (the hooks mode's
per-user gradient of each item table); ``docs/benchmarks.md`` has the speed.
Opacus measures the norms through per-layer "norm samplers"; the two here
replace Opacus' own for embeddings and linear layers (faster, same values,
tested against explicit per-user gradients) and are registered by
``use_fast_norm_samplers``, which ``client.dp_sgd.make_private`` calls.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from opacus.grad_sample import GradSampleModuleFastGradientClipping, register_norm_sampler
from torch import nn

from client.clipping import clip_coefficients
from client.tied_grad_sampler import SCORE_PART, TiedScorePart
from common.data.catalog import PADDING_INDEX
from common.recommender.model import LossName, SASRec, TiedItemTable, per_user_loss


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

    A user whose loss or gradient norm is not finite (clip coefficient 0) is
    removed before the clipped pass, not multiplied by 0 in it: each weight
    gradient of that pass sums output gradient x activation over all users'
    rows, and 0 x inf is NaN, so a user with one non-finite activation would
    turn the whole sum into NaN exactly when they were sampled. The hidden
    states are then computed again with that user's history replaced by
    padding, under the random state of the first forward pass (the same
    dropout masks for every other user, so their gradients are the ones whose
    norms were measured); the clipped pass runs on that graph. Bounded weights
    (``client.dp_sgd.bounded_adam``) already keep every forward pass finite;
    this keeps the sum finite even where they would not, and costs nothing
    while no user is removed.
    """

    module: GradSampleModuleFastGradientClipping
    loss: LossName

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> GhostClippedLoss:
        model: SASRec = self.module._module  # Opacus' hooks sit on its layers, so they fire for these calls too
        random_state = _random_state(inputs.device)  # the dropout masks, should a user have to be removed
        # An empty batch has no norm to measure, and activations captured for it would never be consumed: the
        # next forward pass would then fail Opacus' parameter-tying check.
        with _hooks_off(self.module) if len(inputs) == 0 else nullcontext():
            hidden = model.hidden_states(inputs)  # [B, L, D]
            # A tied table's scores are measured with its lookup (client.tied_grad_sampler), not by a hook of theirs.
            scores = model.output.scores(hidden) if isinstance(model.output, TiedItemTable) else model.output(hidden)
        detached = scores.detach().requires_grad_()
        return GhostClippedLoss(
            self.module, model.output, hidden, scores, detached, per_user_loss(detached, targets, self.loss),
            inputs, random_state,
        )


@dataclass
class GhostClippedLoss:
    module: GradSampleModuleFastGradientClipping
    output_layer: nn.Linear | TiedItemTable
    hidden: torch.Tensor
    """[B, L, D] the output layer's input, with its graph"""
    scores: torch.Tensor
    """[B, L, N] the output layer's output, with its graph"""
    detached_scores: torch.Tensor
    per_user: torch.Tensor
    """[B] each user's loss, computed from ``detached_scores``"""
    inputs: torch.Tensor
    """[B, L] the item ids the forward pass ran on"""
    random_state: list[torch.Tensor]
    """the CPU's and the inputs' device's random state before that forward pass (``_random_state``)"""

    def backward(self) -> None:
        if self.per_user.numel() == 0:  # an empty Poisson batch: zero gradients, the optimizer adds the noise
            self._clipped_pass(self.scores, torch.zeros_like(self.scores))
            return
        batch = len(self.per_user)
        (score_gradients,) = torch.autograd.grad(self.per_user.sum(), self.detached_scores)  # row b: user b's alone
        for parameter in self.module.trainable_parameters:
            parameter._norm_sample = None
        lookups = (nn.Embedding, TiedItemTable)  # the tables indexed by id: their hooks fire when these are asked for
        entry = [m.weight for m in self.module.modules() if isinstance(m, lookups) and m.weight.requires_grad]
        tied = isinstance(self.output_layer, TiedItemTable)
        if tied:
            setattr(self.output_layer, SCORE_PART, TiedScorePart(score_gradients, self.hidden.detach()))
        try:
            # The gradient of the batch mean: the convention the hooks were built with ("mean": they rescale by B).
            hidden_gradient, *_ = torch.autograd.grad(
                self.scores, [self.hidden, *entry], grad_outputs=score_gradients / batch, retain_graph=True
            )
        finally:
            if tied:
                delattr(self.output_layer, SCORE_PART)
        unmeasured = [name for name, p in self.module.named_parameters() if p.requires_grad and p._norm_sample is None]
        if unmeasured:
            raise RuntimeError(f"ghost clipping measured no per-user norm for {unmeasured}: refusing to clip blind")
        coefficients = clip_coefficients(
            self.module.get_norm_sample(), self.per_user.detach(), self.module.max_grad_norm
        ).view(-1, 1, 1)  # [B, 1, 1]
        kept = coefficients > 0
        hidden = self.hidden if bool(kept.all()) else self._hidden_without(kept.view(-1))
        clipped_scores = torch.where(kept, score_gradients * coefficients, 0.0).flatten(0, 1)  # [B * L, N]
        if self.output_layer.weight.requires_grad:  # a frozen output table (item-tables=frozen) takes no gradient
            _accumulate(self.output_layer.weight, clipped_scores.T @ hidden.detach().flatten(0, 1))
        if self.output_layer.bias is not None and self.output_layer.bias.requires_grad:
            _accumulate(self.output_layer.bias, clipped_scores.sum(dim=0))
        self._clipped_pass(hidden, torch.where(kept, hidden_gradient * (batch * coefficients), 0.0))

    def _hidden_without(self, kept: torch.Tensor) -> torch.Tensor:
        """[B, L, D] the hidden states again, with the histories of the users not ``kept`` replaced by padding.

        Same shapes and the first pass's random state, so every kept user's
        rows (dropout masks included) are those of the first pass.
        """
        model: SASRec = self.module._module
        inputs = torch.where(kept.unsqueeze(1), self.inputs, PADDING_INDEX)
        devices = [inputs.device] if inputs.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), _hooks_off(self.module):
            _set_random_state(self.random_state, inputs.device)
            return model.hidden_states(inputs)

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


def _random_state(device: torch.device) -> list[torch.Tensor]:
    return [torch.get_rng_state(), *([torch.cuda.get_rng_state(device)] if device.type == "cuda" else [])]


def _set_random_state(state: list[torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state[1], device)


def _accumulate(parameter: torch.Tensor, gradient: torch.Tensor) -> None:
    parameter.grad = gradient if parameter.grad is None else parameter.grad + gradient


def embedding_norm_sample(
    layer: nn.Embedding, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[torch.Tensor, torch.Tensor]:
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


def linear_norm_sample(
    layer: nn.Linear, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[torch.Tensor, torch.Tensor]:
    """Per-user gradient norms of a linear layer over sequences (replaces Opacus' own).

    The weight's squared norm is <g g^T, a a^T> over position pairs (Opacus'
    formula). The bias gradient is the sum of the output gradients over
    positions, whose norm is direct; Opacus builds the [B, T, T] Gram matrix
    of the output gradients a second time for it, which on the output layer
    costs a catalogue-sized product per step.
    """
    inputs = activations[0].to(backprops.dtype).reshape(len(backprops), -1, activations[0].shape[-1])  # [B, T, in]
    grads = backprops.reshape(len(backprops), -1, backprops.shape[-1])  # [B, T, out]
    norms: dict[torch.Tensor, torch.Tensor] = {}
    if layer.weight.requires_grad:
        grad_gram = grads @ grads.transpose(1, 2)  # [B, T, T]
        input_gram = inputs @ inputs.transpose(1, 2)  # [B, T, T]
        norms[layer.weight] = (grad_gram * input_gram).sum(dim=(1, 2)).clamp(min=0).sqrt()
    if layer.bias is not None and layer.bias.requires_grad:
        norms[layer.bias] = grads.sum(dim=1).norm(dim=-1)
    return norms


def use_fast_norm_samplers() -> None:
    """Make Opacus measure embedding and linear layers with the two samplers above (idempotent)."""
    register_norm_sampler(nn.Embedding)(embedding_norm_sample)
    register_norm_sampler(nn.Linear)(linear_norm_sample)
