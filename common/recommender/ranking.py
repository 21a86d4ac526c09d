"""Long-tail re-ranking on top of the model's scores, shared by serving and evaluation.

Two switches: the blend is off by default, the tail penalty on (at 0.5):

- cold-start blend: for a user with few known items the model has little to go
  on, so its next-item distribution is mixed with a prior distribution over
  items, with a weight that fades linearly to 0 at ``cold_start_fade`` items;
- tail penalty: ``score - tail_penalty * log(prior)``, which lifts items the
  prior considers rare (catalogue coverage, tail exposure) at some cost in
  accuracy; ``tail_penalty`` is the knob.

The prior is a probability vector over catalogue indices: the model's own
prediction for an empty history (learned under DP, so it costs nothing more),
or public item popularity when an operator has it. The cold-start blend can
instead use a per-user content prior (``cold_start_prior="content"``): items
whose public metadata resembles the user's known items (``content_prior``).
That is information the model may lack for a short history, where the
model's own prior only repeats what the model already says.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.errors import ConfigError
from common.recommender.model import PADDING_INDEX, SASRec

COLD_START_PRIORS = ("model", "content")


@dataclass(frozen=True)
class RankingOptions:
    cold_start_weight: float = 0.0
    """Weight of the prior for an empty history; 0 switches the blend off."""
    cold_start_fade: int = 5
    """History length at which the prior's weight has faded to 0."""
    tail_penalty: float = 0.5
    """The default lifts the tail-item share of the diversity re-ranker's lists (``common.recommender.rerank``),
    which MMR alone can lower (docs/results.md, "Beyond one accurate item"); 0 switches it off."""
    cold_start_prior: str = "model"
    """What the blend mixes in: "model" (the global prior) or "content" (items like the user's, per user)."""
    content_temperature: float = 0.1
    """Sharpness of the content prior: softmax of cosine similarity / temperature."""

    def __post_init__(self) -> None:
        if not 0 <= self.cold_start_weight <= 1 or self.cold_start_fade < 1 or self.tail_penalty < 0:
            raise ConfigError("need cold-start weight in [0, 1], fade >= 1 and a non-negative tail penalty")
        if self.cold_start_prior not in COLD_START_PRIORS or self.content_temperature <= 0:
            raise ConfigError(
                f"cold-start prior '{self.cold_start_prior}': use one of {', '.join(COLD_START_PRIORS)}, "
                f"with a positive content temperature (got {self.content_temperature:g})"
            )

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


def unit_rows(item_vectors: torch.Tensor) -> torch.Tensor:
    """Content vectors scaled to length 1 (items without content stay zero): what ``content_prior`` takes,
    computed once per model rather than once per request."""
    return torch.nn.functional.normalize(item_vectors.float(), dim=1)


def content_prior(inputs: torch.Tensor, unit: torch.Tensor, fallback: torch.Tensor, temperature: float) -> torch.Tensor:
    """inputs: [B, L] item indices (0 = padding); unit: [N, d] content vectors from ``unit_rows``; fallback: [N].

    Returns [B, N] probabilities: softmax over items of cosine(item, mean of the user's known items) /
    temperature, padding at 0; a row with no known item (or none with content) gets ``fallback``.
    """
    unit = unit.to(inputs.device)
    profile = unit[inputs].sum(dim=1)  # [B, d]: padding and items without content add nothing
    similarity = torch.nn.functional.normalize(profile, dim=1) @ unit.T  # [B, N]
    similarity[:, PADDING_INDEX] = float("-inf")
    prior = torch.softmax(similarity / temperature, dim=1)
    has_profile = profile.abs().sum(dim=1) > 0
    return torch.where(has_profile.unsqueeze(1), prior, fallback.to(prior.device).unsqueeze(0))


def rerank(
    scores: torch.Tensor,
    history_lengths: torch.Tensor,
    prior: torch.Tensor,
    options: RankingOptions,
    blend_prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """scores: [B, N] model logits; history_lengths: [B]; prior: [N] probabilities (the tail penalty's, and the
    blend's unless ``blend_prior`` gives [B, N] per-user ones). Returns [B, N] ranking scores."""
    if not options.active:
        return scores
    prior = prior.to(scores.device).clamp(min=1e-12)
    ranked = torch.log_softmax(scores.float(), dim=-1)
    if options.cold_start_weight > 0:
        fade = (1 - history_lengths.float().to(scores.device) / options.cold_start_fade).clamp(min=0)
        weight = (options.cold_start_weight * fade).unsqueeze(-1)  # [B, 1]
        mixed_in = prior.unsqueeze(0) if blend_prior is None else blend_prior.to(scores.device)
        ranked = torch.log((1 - weight) * ranked.exp() + weight * mixed_in)
    if options.tail_penalty > 0:
        ranked = ranked - options.tail_penalty * torch.log(prior).unsqueeze(0)
    return ranked
