"""Per-user gradients and gradient norms of the tied item table (``item-tables = tied``): both of its uses added
before clipping.

``common.recommender.model.TiedItemTable`` is called twice in a forward pass: once on the item ids (a lookup) and
once on the hidden states (the scores). A user's gradient of the table is the sum of the two parts, and it is that
sum that must be clipped.

- Per-sample hooks (``hooks``): Opacus runs a module's grad sampler once per call and, for a parameter whose module
  was called more than once, adds the per-user parts before it takes any norm (its ``_forward_counter``).
  ``tied_item_table_grad_sample`` gives each call's part.
- Ghost clipping (``ghost``): Opacus refuses a norm-measured module called twice, and the scores' part is not one
  Opacus could measure alone anyway (the norm of a sum is not a sum of norms). ``client.ghost_clipping`` scores
  through ``TiedItemTable.scores``, past the module's hooks (a hook that is off at the forward still fires at the
  backward), clips that part itself, and hands this module the score gradients and hidden states
  (``TiedScorePart``) before its norm pass, and ``tied_item_table_norm_sample`` measures the whole norm at the
  lookup, without materialising any per-user table:

      |W|^2 = |sum_t g_t h_t^T|^2 + |sum_s 1(x_s) e_s^T|^2 + 2 <sum_t g_t h_t^T, sum_s 1(x_s) e_s^T>
            = <G G^T, H H^T> + sum_{s,s'} [x_s = x_s'] <e_s, e_s'> + 2 sum_{t,s} G[t, x_s] <h_t, e_s>

  per user, with g_t the score gradient at position t (a row of G, [L, N]), h_t the hidden state (H, [L, D]), x_s
  the item id at input position s and e_s the gradient at its looked-up row (E, [L, D]). Every term is an [L, L]
  product. ``tests/client/test_tied_item_table.py`` checks the clipped result against per-user autograd.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from opacus.grad_sample import register_grad_sampler, register_norm_sampler

from common.data.catalog import PADDING_INDEX
from common.recommender.model import TiedItemTable

SCORE_PART = "tied_score_part"
"""The attribute ghost clipping sets on the table for the length of one norm pass."""


@dataclass(frozen=True)
class TiedScorePart:
    """What the scoring call contributes to each user's gradient of the tied table (ghost clipping)."""

    score_gradients: torch.Tensor
    """[B, L, N] each user's loss gradient with respect to their scores"""
    hidden: torch.Tensor
    """[B, L, D] the scoring call's input"""


def tied_item_table_grad_sample(
    layer: TiedItemTable, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[torch.Tensor, torch.Tensor]:
    """One call's per-user gradients: {weight: [B, N, D]} for a lookup, plus {bias: [B, N]} for the scores."""
    inputs = activations[0]
    users = len(backprops)
    rows, hidden = layer.weight.shape
    if not inputs.is_floating_point():  # a lookup: backprops [B, L, D] land on the rows the ids name
        ids = inputs.reshape(users, -1)  # [B, L]
        grads = backprops.reshape(users, ids.shape[1], hidden) * (ids != PADDING_INDEX).unsqueeze(-1)
        weight = torch.zeros(users, rows, hidden, dtype=backprops.dtype, device=backprops.device)
        weight.scatter_add_(1, ids.unsqueeze(-1).expand(-1, -1, hidden), grads)
        return {layer.weight: weight}
    states = inputs.to(backprops.dtype).reshape(users, -1, hidden)  # [B, L, D]
    grads = backprops.reshape(users, -1, rows)  # [B, L, N]
    return {layer.weight: torch.einsum("bln,bld->bnd", grads, states), layer.bias: grads.sum(dim=1)}


def tied_item_table_norm_sample(
    layer: TiedItemTable, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[torch.Tensor, torch.Tensor]:
    """Per-user norms of the whole tied gradient, measured at the lookup (the only call Opacus sees in ghost mode)."""
    part = getattr(layer, SCORE_PART, None)
    if not isinstance(part, TiedScorePart):
        raise RuntimeError("the tied item table's norm needs its score part (client.ghost_clipping sets it)")
    ids = activations[0]
    if ids.is_floating_point():
        raise RuntimeError("the tied item table's scoring call reached Opacus' hooks: use TiedItemTable.scores")
    users = len(backprops)
    ids = ids.reshape(users, -1)  # [B, S]
    lookup = backprops.reshape(users, ids.shape[1], -1) * (ids != PADDING_INDEX).unsqueeze(-1)  # [B, S, D] E
    scores = part.score_gradients.to(lookup.dtype)  # [B, T, N] G
    hidden = part.hidden.to(lookup.dtype)  # [B, T, D] H
    scored = ((scores @ scores.transpose(1, 2)) * (hidden @ hidden.transpose(1, 2))).sum(dim=(1, 2))
    same_row = (ids.unsqueeze(2) == ids.unsqueeze(1)) & (ids != PADDING_INDEX).unsqueeze(2)  # [B, S, S]
    looked_up = ((lookup @ lookup.transpose(1, 2)) * same_row).sum(dim=(1, 2))
    at_ids = scores.gather(2, ids.unsqueeze(1).expand(-1, scores.shape[1], -1))  # [B, T, S]: G[t, x_s]
    cross = (at_ids * (hidden @ lookup.transpose(1, 2))).sum(dim=(1, 2))
    norms: dict[torch.Tensor, torch.Tensor] = {layer.weight: (scored + looked_up + 2 * cross).clamp(min=0).sqrt()}
    if layer.bias.requires_grad:
        norms[layer.bias] = scores.sum(dim=1).norm(dim=-1)
    return norms


def use_tied_samplers() -> None:
    """Make Opacus use the two samplers above for ``TiedItemTable`` (idempotent)."""
    register_grad_sampler(TiedItemTable)(tied_item_table_grad_sample)
    register_norm_sampler(TiedItemTable)(tied_item_table_norm_sample)
