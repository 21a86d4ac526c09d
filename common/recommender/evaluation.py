"""Evaluate a scorer (a model or a baseline) into the ``metrics.json`` layout.

Layout (other issues and tools read it)::

    {"overall": {"ndcg@10", "hr@10", "mrr@10", "ndcg@20", "hr@20", "mrr@20", "users"},
     "groups": {"tail": {... , "users": n}, "torso": {...}, "head": {...}},
     "items": {"coverage@10", "gini@10", "tail_share@10", "novelty@10"}}
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from common.data.catalog import PADDING_INDEX
from common.data.split import EvaluationCases, trim_left_padding
from common.errors import ConfigError
from common.recommender.metrics import (
    exclusion_mask,
    grouped_ranking_metrics,
    item_metrics,
    rank_targets,
    ranking_metrics,
    top_k,
)
from common.recommender.model import SASRec
from common.recommender.ranking import RankingOptions, content_prior, rerank, unit_rows

Scorer = Callable[[torch.Tensor], torch.Tensor]
"""Maps left-padded inputs [B, L] to scores over the catalogue [B, N] (on the CPU)."""

ITEM_METRICS_K = 10


def model_scorer(model: SASRec, device: torch.device) -> Scorer:
    def score(inputs: torch.Tensor) -> torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                (trimmed,) = trim_left_padding(inputs)
                return model.last_scores(trimmed.to(device)).float().cpu()
        finally:
            model.train(was_training)

    return score


def reranked_scorer(
    base: Scorer, prior: torch.Tensor, options: RankingOptions, item_vectors: torch.Tensor | None = None
) -> Scorer:
    """``base`` re-ranked for the long tail (``common.recommender.ranking``), each case by its own history length.

    ``item_vectors`` ([N, d] public content vectors) are needed for ``cold_start_prior="content"``.
    """
    if options.cold_start_prior == "content" and item_vectors is None:
        raise ConfigError("the content cold-start prior needs item content vectors (train with --item-text)")
    blends_content = options.cold_start_prior == "content" and options.cold_start_weight > 0
    unit = unit_rows(item_vectors) if blends_content and item_vectors is not None else None

    def score(inputs: torch.Tensor) -> torch.Tensor:
        blend = None if unit is None else content_prior(inputs, unit, prior, options.content_temperature)
        return rerank(base(inputs), (inputs != PADDING_INDEX).sum(dim=1), prior, options, blend)

    return score


def popularity_scorer(popularity: np.ndarray) -> Scorer:
    """Most-popular baseline; ties broken by index so that it is not penalised for them."""
    tie_break = -np.arange(len(popularity)) / (10.0 * len(popularity))
    scores = torch.from_numpy(popularity.astype(np.float64) + tie_break).float()

    def score(inputs: torch.Tensor) -> torch.Tensor:
        return scores.unsqueeze(0).expand(inputs.shape[0], -1)

    return score


def evaluate(
    scorer: Scorer, cases: EvaluationCases, popularity: np.ndarray, num_users: int, batch_size: int = 256
) -> dict[str, Any]:
    """Rank every case's target over the full catalogue; ``popularity`` feeds the item-side metrics."""
    ranks: list[torch.Tensor] = []
    recommended: list[torch.Tensor] = []
    # Cases in order of history length so that batches trim well; results go back to case order below.
    order = torch.from_numpy(np.argsort((cases.inputs != PADDING_INDEX).sum(dim=1).numpy(), kind="stable"))
    for rows in order.split(batch_size):
        scores = scorer(cases.inputs[rows])
        targets = cases.targets[rows]
        excluded = exclusion_mask([cases.histories[i] for i in rows.tolist()], targets, scores.shape[1])
        ranks.append(rank_targets(scores, targets, excluded))
        recommended.append(top_k(scores, excluded, ITEM_METRICS_K))
    if not ranks:
        empty = np.zeros(0)
        return {
            "overall": {**ranking_metrics(empty), "users": 0},
            "groups": grouped_ranking_metrics(empty, empty),
            "items": {},
        }
    all_ranks = np.empty(len(cases), dtype=np.int64)
    all_ranks[order.numpy()] = torch.cat(ranks).numpy()
    return {
        "overall": {**ranking_metrics(all_ranks), "users": len(all_ranks)},
        "groups": grouped_ranking_metrics(all_ranks, cases.training_lengths),
        "items": item_metrics(torch.cat(recommended).numpy(), popularity, num_users, ITEM_METRICS_K),
    }


def evaluate_with_baselines(
    scorer: Scorer, cases: EvaluationCases, popularity: np.ndarray, num_users: int
) -> dict[str, Any]:
    """The model's metrics with most-popular beside them, as every accuracy table must have."""
    report = evaluate(scorer, cases, popularity, num_users)
    report["baselines"] = {"most_popular": evaluate(popularity_scorer(popularity), cases, popularity, num_users)}
    return report
