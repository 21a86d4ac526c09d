"""Evaluate a scorer (a model or a baseline) into the ``metrics.json`` layout.

Layout (other issues and tools read it)::

    {"overall": {"ndcg@10", "hr@10", "mrr@10", "ndcg@20", "hr@20", "mrr@20", "users"},
     "groups": {"tail": {... , "users": n}, "torso": {...}, "head": {...}},
     "items": {"coverage@10", "gini@10", "tail_share@10", "novelty@10"}}

With an ``ItemSpace`` (``evaluate_with_baselines`` derives one from a model scorer) ``items`` also holds
``ild@10`` and ``miscalibration@10``, ``item_space`` says what they were measured with, and every group holds the
item-side metrics of its own users' lists beside its accuracy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from common.data.catalog import PADDING_INDEX
from common.data.split import EvaluationCases, trim_left_padding
from common.errors import ConfigError
from common.recommender.item_space import ItemSpace, item_space
from common.recommender.metrics import (
    GROUPS,
    exclusion_mask,
    grouped_ranking_metrics,
    intra_list_diversity,
    item_metrics,
    miscalibration,
    rank_targets,
    ranking_metrics,
    top_k,
    user_groups,
)
from common.recommender.model import SASRec
from common.recommender.ranking import RankingOptions, content_prior, rerank, unit_rows

Scorer = Callable[[torch.Tensor], torch.Tensor]
"""Maps left-padded inputs [B, L] to scores over the catalogue [B, N] (on the CPU)."""
Reorder = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""Maps scores [B, N] and the excluded items [B, N] to new scores: a re-ranker applied after the exclusions
(``common.recommender.rerank``), so that it never spends a slot on an item the user already has."""

ITEM_METRICS_K = 10


class ModelScorer:
    """A model as a ``Scorer``; it keeps the model, so that evaluation can measure lists with its item vectors."""

    def __init__(self, model: SASRec, device: torch.device) -> None:
        self.model = model
        self.device = device

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                (trimmed,) = trim_left_padding(inputs)
                return self.model.last_scores(trimmed.to(self.device)).float().cpu()
        finally:
            self.model.train(was_training)


def model_scorer(model: SASRec, device: torch.device) -> ModelScorer:
    return ModelScorer(model, device)


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
    scorer: Scorer,
    cases: EvaluationCases,
    popularity: np.ndarray,
    num_users: int,
    batch_size: int = 256,
    space: ItemSpace | None = None,
    reorder: Reorder | None = None,
) -> dict[str, Any]:
    """Rank every case's target over the full catalogue; ``popularity`` feeds the item-side metrics, ``space`` the
    beyond-accuracy ones (intra-list diversity, miscalibration; skipped without it); ``reorder`` re-ranks."""
    ranks: list[torch.Tensor] = []
    recommended: list[torch.Tensor] = []
    # Cases in order of history length so that batches trim well; results go back to case order below.
    order = torch.from_numpy(np.argsort((cases.inputs != PADDING_INDEX).sum(dim=1).numpy(), kind="stable"))
    for rows in order.split(batch_size):
        scores = scorer(cases.inputs[rows])
        targets = cases.targets[rows]
        excluded = exclusion_mask([cases.histories[i] for i in rows.tolist()], targets, scores.shape[1])
        if reorder is not None:
            scores = reorder(scores, excluded)
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
    shown = torch.cat(recommended).numpy()
    lists = np.empty_like(shown)
    lists[order.numpy()] = shown
    grouped = grouped_ranking_metrics(all_ranks, cases.training_lengths)
    report: dict[str, Any] = {
        "overall": {**ranking_metrics(all_ranks), "users": len(all_ranks)},
        "groups": grouped,
        "items": _list_metrics(lists, cases, popularity, num_users, space, np.ones(len(cases), dtype=bool)),
    }
    if space is not None:
        groups = user_groups(cases.training_lengths)
        for name in GROUPS:
            if (groups == name).any():
                grouped[name].update(_list_metrics(lists, cases, popularity, num_users, space, groups == name))
        report["item_space"] = space.description
    return report


def _list_metrics(
    lists: np.ndarray, cases: EvaluationCases, popularity: np.ndarray, num_users: int, space: ItemSpace | None,
    selected: np.ndarray,
) -> dict[str, float]:
    """Item-side metrics of the selected users' lists; with a space, their mean ILD and miscalibration too."""
    metrics = item_metrics(lists[selected], popularity, num_users, ITEM_METRICS_K)
    if space is not None:
        chosen = lists[selected]
        histories = [h for h, keep in zip(cases.histories, selected, strict=True) if keep]
        metrics[f"ild@{ITEM_METRICS_K}"] = _defined_mean(intra_list_diversity(chosen, space.unit.numpy()))
        metrics[f"miscalibration@{ITEM_METRICS_K}"] = _defined_mean(miscalibration(histories, chosen,
                                                                                   space.categories))
    return metrics


def _defined_mean(values: np.ndarray) -> float:
    """Mean over the users for whom the value is defined (NaN marks the others); 0 when it is defined for none."""
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else 0.0


def evaluate_with_baselines(
    scorer: Scorer, cases: EvaluationCases, popularity: np.ndarray, num_users: int, space: ItemSpace | None = None
) -> dict[str, Any]:
    """The model's metrics with most-popular beside them, as every accuracy table must have.

    The beyond-accuracy metrics are measured in ``space``, by default the model's own (when ``scorer`` is a
    ``ModelScorer``), for the model and most-popular alike.
    """
    if space is None and isinstance(scorer, ModelScorer):
        space = item_space(scorer.model)
    report = evaluate(scorer, cases, popularity, num_users, space=space)
    report["baselines"] = {
        "most_popular": evaluate(popularity_scorer(popularity), cases, popularity, num_users, space=space)
    }
    return report
