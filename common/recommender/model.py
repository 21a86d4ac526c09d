"""SASRec (Kang & McAuley 2018): a causal self-attention next-item recommender, DP-ready.

Two choices here exist only so that Opacus' per-user clipping is real:

- attention is written from ``nn.Linear`` layers: Opacus rejects
  ``nn.MultiheadAttention`` and its ``DPMultiheadAttention`` replacement gives
  wrong outputs with batch-first inputs and causal masks;
- item scores come from an ``nn.Linear`` output layer, never from
  ``hidden @ item_embedding.weight.T``: Opacus computes per-sample gradients
  per module, and a bare matmul with a parameter escapes clipping, which
  silently voids the DP guarantee. ``tests/common/recommender/test_model.py`` checks every
  per-user gradient against plain autograd. With ``tied_items`` one
  ``TiedItemTable`` module both embeds and scores, so Opacus sees both uses
  of the shared table (its grad sampler: ``client.tied_grad_sampler``).

Shapes: B = batch (users), L = max_len positions, D = hidden size,
H = heads, N = num_items + 1 catalogue indices (0 is padding).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from common.data.catalog import PADDING_INDEX
from common.errors import ConfigError

LossName = Literal["ce", "bce"]
INIT_STD = 0.02
"""Standard deviation of the initial weights (as in SASRec / BERT-style models)."""


@dataclass(frozen=True)
class ModelOptions:
    """Hyper-parameters a user chooses; the single place their defaults live."""

    max_len: int = 50
    hidden: int = 64
    heads: int = 2
    blocks: int = 2
    dropout: float = 0.2
    tied_items: bool = False
    """One item table for the input embedding and the output scores (half the item parameters to noise)."""

    def __post_init__(self) -> None:
        if self.hidden < 1 or self.heads < 1:
            raise ConfigError(f"model hidden={self.hidden} and heads={self.heads}: both must be at least 1")
        if self.hidden % self.heads:
            raise ConfigError(f"model hidden={self.hidden} is not divisible by heads={self.heads}")
        if self.max_len < 1 or self.blocks < 1:
            raise ConfigError("model max_len and blocks must be at least 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model dropout={self.dropout}: must be in [0, 1)")

    def for_catalog(self, num_items: int) -> ModelConfig:
        return ModelConfig(num_items=num_items, **asdict(self))


@dataclass(frozen=True)
class ModelConfig(ModelOptions):
    """The options plus the catalogue size: everything needed to rebuild a saved model."""

    num_items: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_items < 1:
            raise ConfigError(f"model num_items={self.num_items}: the catalogue is empty")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def activation_bound(config: ModelOptions, max_abs_weight: float) -> float:
    """An upper bound on every magnitude a forward pass computes when no weight exceeds ``max_abs_weight``.

    It follows the architecture below, layer by layer, with the crudest
    triangle-inequality bounds: a LayerNorm output is at most sqrt(D) |gamma|
    + |beta| whatever its input, a linear layer multiplies a bound by D W and
    adds W, attention mixes values (a convex combination), dropout scales by
    at most 1 / (1 - p). Included are the attention scores, the squares a
    LayerNorm sums for its variance, and the output scores. A site refuses
    weights whose bound is not comfortably below float32's largest value
    (``client.policy``): then no user's forward pass can be non-finite, which
    is what lets per-user clipping drop a user whose *gradient* is not finite
    without that user's presence changing anything else.
    """
    d, w = float(config.hidden), float(max_abs_weight)
    scale = 1.0 / (1.0 - config.dropout)
    head_dim = d / config.heads

    def linear(magnitude: float) -> float:
        return d * w * magnitude + w

    normed = math.sqrt(d) * w + w
    residual = scale * (w * math.sqrt(d) + w)  # item embedding x sqrt(D) + position embedding
    largest = residual
    for _ in range(config.blocks):
        projected = linear(normed)  # query, key and value
        scores = math.sqrt(head_dim) * projected * projected
        residual += scale * linear(scale * projected)  # attention output, after mixing the values
        residual += scale * linear(scale * linear(normed))  # feed-forward (GELU shrinks magnitudes)
        largest = max(largest, scores, d * (2 * residual) ** 2)
    return max(largest, linear(normed))


class CausalSelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """x: [B, L, D]; allowed: [B, 1, L, L] bool, True where query t may attend to key s."""
        batch, length, hidden = x.shape
        head_dim = hidden // self.heads

        def split_heads(t: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, H, L, D/H]
            return t.view(batch, length, self.heads, head_dim).transpose(1, 2)

        q, k, v = split_heads(self.query(x)), split_heads(self.key(x)), split_heads(self.value(x))
        weights = (q @ k.transpose(-2, -1)) / math.sqrt(head_dim)  # [B, H, L, L]
        weights = weights.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        mixed = self.dropout(weights) @ v  # [B, H, L, D/H]
        return self.out(mixed.transpose(1, 2).reshape(batch, length, hidden))


class TransformerBlock(nn.Module):
    """Pre-norm block: attention then a position-wise feed-forward, each with a residual."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(hidden)
        self.attention = CausalSelfAttention(hidden, heads, dropout)
        self.feed_forward_norm = nn.LayerNorm(hidden)
        self.feed_forward = nn.Sequential(
            nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, hidden)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.attention_norm(x), allowed))
        return x + self.dropout(self.feed_forward(self.feed_forward_norm(x)))


class TiedItemTable(nn.Module):
    """One [N, D] table used twice: item ids in, it looks up their rows; hidden states in, it scores every item.

    Tying halves the item parameters DP noises (and those a site sends).
    Both uses go through this module's ``forward``, so Opacus' hooks see
    both, and its grad sampler sums the two contributions per user before
    the norm is taken; a tied ``nn.Linear`` weight used as ``embedding.weight``
    would be seen by two modules whose per-user parts Opacus never adds.
    Row 0 (padding) gets no gradient from a lookup, like
    ``nn.Embedding(padding_idx=0)``.
    """

    def __init__(self, num_rows: int, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_rows, hidden))  # [N, D]
        self.bias = nn.Parameter(torch.zeros(num_rows))  # [N] the output bias (scores only)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [...] integer item ids -> [..., D] rows; or [..., D] hidden states -> [..., N] scores."""
        if x.is_floating_point():
            return self.scores(x)
        return F.embedding(x, self.weight, padding_idx=PADDING_INDEX)

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., D] -> [..., N], past this module's hooks: only for ghost clipping, which measures and clips this
        part of the table's gradient itself (``client.tied_grad_sampler``)."""
        return F.linear(hidden, self.weight, self.bias)


class SASRec(nn.Module):
    item_embedding: nn.Embedding | None
    output: nn.Linear | TiedItemTable

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        n = config.num_items + 1
        tied = config.tied_items
        self.item_embedding = None if tied else nn.Embedding(n, config.hidden, padding_idx=PADDING_INDEX)
        self.position_embedding = nn.Embedding(config.max_len, config.hidden)
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(config.hidden, config.heads, config.dropout) for _ in range(config.blocks)
        )
        self.final_norm = nn.LayerNorm(config.hidden)
        self.output = TiedItemTable(n, config.hidden) if tied else nn.Linear(config.hidden, n)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding, TiedItemTable)):
                nn.init.normal_(module.weight, std=INIT_STD)
            if isinstance(module, (nn.Linear, TiedItemTable)) and module.bias is not None:
                nn.init.zeros_(module.bias)
        with torch.no_grad():
            self.item_tables()[0][PADDING_INDEX].zero_()

    def item_tables(self) -> list[torch.Tensor]:
        """The distinct [N, D] item tables, the input one first: two, or one when tied."""
        if self.item_embedding is None:
            return [self.output.weight]
        return [self.item_embedding.weight, self.output.weight]

    def embed_items(self, item_ids: torch.Tensor) -> torch.Tensor:
        """item_ids: [B, L] -> [B, L, D] input rows (padding rows are zero)."""
        if self.item_embedding is None:
            return self.output(item_ids)
        return self.item_embedding(item_ids)

    def forward(self, item_ids: torch.Tensor) -> torch.Tensor:
        """item_ids: [B, L] left-padded; returns scores [B, L, N] for the next item at every position."""
        return self.output(self.hidden_states(item_ids))

    def hidden_states(self, item_ids: torch.Tensor) -> torch.Tensor:
        """item_ids: [B, L] left-padded; returns [B, L, D], zero at padded positions."""
        batch, length = item_ids.shape
        if length > self.config.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len {self.config.max_len}")
        real = item_ids != PADDING_INDEX  # [B, L]
        # Positions count back from the most recent item, so "last item" always has the same embedding.
        positions = torch.arange(self.config.max_len - length, self.config.max_len, device=item_ids.device)
        positions = positions.unsqueeze(0).repeat(batch, 1)  # [B, L], contiguous (ghost clipping needs it)
        x = self.embed_items(item_ids) * math.sqrt(self.config.hidden) + self.position_embedding(positions)
        x = self.embedding_dropout(x) * real.unsqueeze(-1)

        causal = torch.ones(length, length, dtype=torch.bool, device=item_ids.device).tril()  # [L, L]
        diagonal = torch.eye(length, dtype=torch.bool, device=item_ids.device)
        # A padded position may attend only to itself: keeps softmax finite; its output is zeroed anyway.
        allowed = (causal & real.unsqueeze(1)) | diagonal  # [B, L, L]
        allowed = allowed.unsqueeze(1)  # [B, 1, L, L]
        for block in self.blocks:
            x = block(x, allowed) * real.unsqueeze(-1)
        return self.final_norm(x)

    def last_scores(self, item_ids: torch.Tensor) -> torch.Tensor:
        """Scores for the item after the most recent one: [B, N] (the output layer on the last position only)."""
        return self.output(self.hidden_states(item_ids)[:, -1, :])


def sequence_loss(
    scores: torch.Tensor, targets: torch.Tensor, loss: LossName = "ce", generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per-user loss averaged over the batch: each user weighs the same, whatever their length."""
    per_user = per_user_loss(scores, targets, loss, generator)
    # A mean that is 0, not NaN, on an empty batch: Poisson sampling can draw one, and DP-SGD still adds noise.
    return per_user.sum() / max(per_user.shape[0], 1)


def per_user_loss(
    scores: torch.Tensor, targets: torch.Tensor, loss: LossName = "ce", generator: torch.Generator | None = None
) -> torch.Tensor:
    """Each user's mean loss over their positions: [B].

    scores: [B, L, N]; targets: [B, L] with PADDING_INDEX where there is no next item.
    ``ce`` is full softmax cross-entropy over the catalogue; ``bce`` is the
    original SASRec objective with one uniformly sampled negative per position.
    Scores are always computed by the output layer and then gathered, so
    Opacus sees (and clips) every gradient either way.
    """
    real = (targets != PADDING_INDEX).float()  # [B, L]
    if loss == "ce":
        scores = scores.clone()
        scores[..., PADDING_INDEX] = float("-inf")
        # Over [B * L, N] rows, not the [B, N, L] layout cross_entropy takes for sequences: that one copies
        # the catalogue-sized tensor and runs a strided softmax (30% of a training step at 3,000 items).
        per_position = F.cross_entropy(
            scores.view(-1, scores.shape[-1]), targets.reshape(-1), reduction="none", ignore_index=PADDING_INDEX
        ).view(targets.shape)
    elif loss == "bce":
        negatives = torch.randint(
            1, scores.shape[-1], targets.shape, device=targets.device, generator=generator
        )  # may rarely hit the positive; the original SASRec tolerates this too
        positive = scores.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        negative = scores.gather(-1, negatives.unsqueeze(-1)).squeeze(-1)
        per_position = F.softplus(-positive) + F.softplus(negative)
    else:
        raise ConfigError(f"unknown loss '{loss}': use 'ce' or 'bce'")
    return (per_position * real).sum(dim=1) / real.sum(dim=1).clamp(min=1.0)
