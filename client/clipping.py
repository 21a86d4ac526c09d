"""Per-user clipping: the coefficient rule both grad-sample modes share, and the loss for Opacus' per-sample hooks.

A user's clipped gradient is their gradient times ``min(1, C / norm)``, so
that no user moves the sum by more than C; the Gaussian noise is calibrated
to that bound. Ghost clipping (``client.ghost_clipping``) applies the same
coefficients without materialising per-user gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from opacus.grad_sample import GradSampleModule

from common.recommender.model import LossName, per_user_loss


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
    Unlike ghost clipping's clipped pass (``client.ghost_clipping``), nothing
    here sums over users before that replacement: each user's ``grad_sample``
    row comes from their own activations and output gradients alone, so a
    non-finite user cannot reach another user's row, and replacing theirs
    removes them. (The summed ``.grad`` this backward also leaves is never
    used: Opacus' optimizer overwrites it with the clipped, noised sum.)
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
