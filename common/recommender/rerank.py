"""A diversity- and fatigue-aware re-ranker over the model's scores, shared by serving, evaluation and replay.

Maximal marginal relevance (Carbonell & Goldstein 1998), greedily, over the model's top ``pool`` candidates: the
next item is the one with the highest

    (1 - diversity) * relevance - diversity * (largest similarity to an item already chosen)

where relevance is the model's score scaled to [0, 1] over the candidates and similarity is the cosine of the
items' vectors (``common.recommender.item_space``), negative values counted as 0 (unrelated). ``diversity`` 0 is
the model's own ranking. The repetition penalty lowers the relevance of items the user was already shown (and of
their history items, when those may be recommended again): a list that keeps repeating itself tires its reader.

The value each item was chosen with never grows from one position to the next (the similarity term only
grows as items are chosen), so it is the score a served list reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.errors import ConfigError
from common.recommender.evaluation import Reorder

POOL = 100
"""Candidates the re-ranker chooses among: the model's best ``POOL`` items that may be recommended (or the list's
length, when that is longer)."""


@dataclass(frozen=True)
class DiversityOptions:
    diversity: float = 0.2
    """Weight of redundancy against relevance, in [0, 1): 0 is the model's own ranking. The default, with the
    default tail penalty, raised intra-list diversity on every model measured, for at most 1.7% of NDCG@10
    (docs/results.md, "Beyond one accurate item")."""
    repeat_penalty: float = 0.2
    """Subtracted from the [0, 1] relevance of an item already shown (0: off; 1: shown items go last). The
    default cut the replay's repeat rate by 30% to 56%; its cumulative hits moved by +2% to -9%."""

    def __post_init__(self) -> None:
        if not 0 <= self.diversity < 1 or not 0 <= self.repeat_penalty <= 1:
            raise ConfigError(f"diversity {self.diversity:g} must be in [0, 1) and repeat penalty "
                              f"{self.repeat_penalty:g} in [0, 1]")

    @property
    def active(self) -> bool:
        return self.diversity > 0 or self.repeat_penalty > 0


def diversify(
    scores: torch.Tensor, excluded: torch.Tensor, unit: torch.Tensor, options: DiversityOptions, depth: int,
    shown: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The re-ranked top ``depth``: ([B, depth] item indices, [B, depth] the value each was chosen with).

    scores, excluded (never chosen), shown (the repetition penalty's items; None: none): [B, N]; unit: [N, d]
    unit item vectors. A row with fewer than ``depth`` items left has -inf values in its last slots.
    """
    pool = min(max(POOL, depth), scores.shape[1])
    masked = scores.float().masked_fill(excluded, float("-inf"))
    candidate_scores, candidates = masked.topk(pool, dim=1)  # [B, P]
    usable = torch.isfinite(candidate_scores)
    low = candidate_scores.masked_fill(~usable, float("inf")).min(dim=1, keepdim=True).values
    high = candidate_scores.max(dim=1, keepdim=True).values
    relevance = ((candidate_scores - low) / (high - low).clamp(min=1e-12)).masked_fill(~usable, 0.0)
    if shown is not None and options.repeat_penalty > 0:
        relevance = relevance - options.repeat_penalty * shown.gather(1, candidates).float()
    vectors = unit.to(scores.device)[candidates]  # [B, P, d]
    similarity = (vectors @ vectors.transpose(1, 2)).clamp(min=0.0)  # [B, P, P]
    closest = torch.zeros_like(relevance)  # largest similarity to a chosen item (0 before any is chosen)
    available = usable.clone()
    rows = torch.arange(scores.shape[0], device=scores.device)
    chosen, values = [], []
    for _ in range(min(depth, pool)):
        value = ((1 - options.diversity) * relevance - options.diversity * closest).masked_fill(~available,
                                                                                               float("-inf"))
        best = value.argmax(dim=1)
        chosen.append(candidates[rows, best])
        values.append(value[rows, best])
        available[rows, best] = False
        closest = torch.maximum(closest, similarity[rows, best])
    return torch.stack(chosen, dim=1), torch.stack(values, dim=1)


def reranked_scores(scores: torch.Tensor, order: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Scores whose ranking starts with ``order`` ([B, depth], its finite values) and goes on in ``scores``' order:
    what evaluation ranks targets by (exact up to rank ``depth``)."""
    out = scores.float().clone()
    ceiling = out.masked_fill(~torch.isfinite(out), float("-inf")).max(dim=1).values + 1
    depth = order.shape[1]
    for position in range(depth):
        rows = torch.isfinite(values[:, position]).nonzero().squeeze(1)  # a row with no item left: nothing to lift
        out[rows, order[rows, position]] = ceiling[rows] + (depth - position)
    return out


def diversity_reorder(unit: torch.Tensor, options: DiversityOptions, depth: int) -> Reorder:
    """The re-ranker as evaluation's ``reorder``: exact for metrics at cut-offs up to ``depth``."""

    def reorder(scores: torch.Tensor, excluded: torch.Tensor) -> torch.Tensor:
        order, values = diversify(scores, excluded, unit, options, depth)
        return reranked_scores(scores, order, values)

    return reorder
