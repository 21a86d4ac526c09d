"""Long-tail re-ranking on top of the model's scores, shared by serving and evaluation.

Two switches, both off by default:

- cold-start blend: for a user with few known items the model has little to go
  on, so its next-item distribution is mixed with a prior distribution over
  items, with a weight that fades linearly to 0 at ``cold_start_fade`` items;
- tail penalty: ``score - tail_penalty * log(prior)``, which lifts items the
  prior considers rare (catalogue coverage, tail exposure) at some cost in
  accuracy; ``tail_penalty`` is the knob.

The prior is a probability vector over catalogue indices: the model's own
prediction for an empty history (learned under DP, so it costs nothing more),
or public item popularity when an operator has it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.errors import ConfigError
from common.model import PADDING_INDEX, SASRec


@dataclass(frozen=True)
class RankingOptions:
    cold_start_weight: float = 0.0
    """Weight of the prior for an empty history; 0 switches the blend off."""
    cold_start_fade: int = 5
    """History length at which the prior's weight has faded to 0."""
    tail_penalty: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.cold_start_weight <= 1 or self.cold_start_fade < 1 or self.tail_penalty < 0:
            raise ConfigError("need cold-start weight in [0, 1], fade >= 1 and a non-negative tail penalty")

    @property
    def active(self) -> bool:
        return self.cold_start_weight > 0 or self.tail_penalty > 0


def model_prior(model: SASRec) -> torch.Tensor:
    """The model's next-item distribution for a user with no history: [N], padding given probability 0."""
    with torch.no_grad():
        device = next(model.parameters()).device
        scores = model.last_scores(torch.zeros((1, 1), dtype=torch.long, device=device))[0]
        scores[PADDING_INDEX] = float("-inf")
        return torch.softmax(scores.float(), dim=0).cpu()


def rerank(scores: torch.Tensor, history_lengths: torch.Tensor, prior: torch.Tensor, options: RankingOptions) -> torch.Tensor:
    """scores: [B, N] model logits; history_lengths: [B]; prior: [N] probabilities. Returns [B, N] ranking scores."""
    if not options.active:
        return scores
    prior = prior.to(scores.device).clamp(min=1e-12)
    ranked = torch.log_softmax(scores.float(), dim=-1)
    if options.cold_start_weight > 0:
        fade = (1 - history_lengths.float().to(scores.device) / options.cold_start_fade).clamp(min=0)
        weight = (options.cold_start_weight * fade).unsqueeze(-1)  # [B, 1]
        ranked = torch.log((1 - weight) * ranked.exp() + weight * prior.unsqueeze(0))
    if options.tail_penalty > 0:
        ranked = ranked - options.tail_penalty * torch.log(prior).unsqueeze(0)
    return ranked
