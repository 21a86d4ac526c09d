"""Ground truth for privacy tests: each user's gradient by plain autograd, one user at a time."""

from __future__ import annotations

import copy
import math

import torch

from common.recommender.model import SASRec, sequence_loss

Gradient = dict[str, torch.Tensor]


def true_per_user_gradients(model: SASRec, inputs: torch.Tensor, targets: torch.Tensor) -> list[Gradient]:
    reference = copy.deepcopy(model)
    gradients = []
    for user in range(len(inputs)):
        reference.zero_grad(set_to_none=True)
        sequence_loss(reference(inputs[user : user + 1]), targets[user : user + 1]).backward()
        gradients.append(
            {name: p.grad.detach().clone() for name, p in reference.named_parameters() if p.grad is not None}
        )
    return gradients


def norm(gradient: Gradient) -> float:
    return math.sqrt(sum(float(g.pow(2).sum()) for g in gradient.values()))


def mean_of_clipped(gradients: list[Gradient], clip: float, denominator: int) -> Gradient:
    """What DP-SGD with noise 0 must produce: each user's gradient clipped to ``clip``, summed, divided."""
    return {
        name: sum(g[name] * min(1.0, clip / norm(g)) for g in gradients) / denominator for name in gradients[0]
    }
