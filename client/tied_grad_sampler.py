"""Per-user gradients of the tied item table (``item-tables = tied``): both of its uses, added before clipping.

``common.recommender.model.TiedItemTable`` is called twice in a forward pass:
once on the item ids (a lookup) and once on the hidden states (the scores).
Opacus runs a module's grad sampler once per call and, for a parameter
whose module was called more than once, adds the per-user parts before it
takes any norm (its ``_forward_counter``), so each user's gradient of the
shared table is the sum of the two uses and is clipped as one vector.
Ghost clipping has no norm sampler for a module called twice; for this
module Opacus falls back to this grad sampler in that mode too, which
materialises [B, N, D] per piece of users (16 by default,
``client.dp_sgd.PIECE_USERS``).
"""

from __future__ import annotations

import torch
from opacus.grad_sample import register_grad_sampler

from common.data.catalog import PADDING_INDEX
from common.recommender.model import TiedItemTable


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


def use_tied_grad_sampler() -> None:
    """Make Opacus use the sampler above for ``TiedItemTable`` in every grad-sample mode (idempotent)."""
    register_grad_sampler(TiedItemTable)(tied_item_table_grad_sample)
