"""How alike two items are: the vectors and categories that intra-list diversity, calibration and the diversity
re-ranker measure items with.

Vectors are the public content vectors when the model was trained from item metadata (``item_vectors.pt``), else
the model's own learned output-layer rows (what it scores items with: post-processing of the released model, so
free under DP). Categories are one-hot clusters of those vectors (``metrics.vector_clusters``): the datasets carry
no genre for every item (the synthetic data has none, Amazon Beauty only opaque attribute ids), so one rule serves
all of them, and the report names it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from common.recommender.metrics import vector_clusters
from common.recommender.model import SASRec
from common.recommender.ranking import unit_rows

CATEGORY_CLUSTERS = 20
"""Clusters standing in for genres (MovieLens has 19 genres; the synthetic data is drawn from 20 topics)."""


@dataclass(frozen=True)
class ItemSpace:
    unit: torch.Tensor
    """[N, d] item vectors scaled to length 1 (padding: zeros)."""
    categories: np.ndarray
    """[N, G] each item's category distribution (one-hot clusters; padding: zeros)."""
    description: str
    """Where the vectors and categories come from, in words, for the report."""


def similarity_vectors(model: SASRec, content_vectors: torch.Tensor | None = None) -> tuple[torch.Tensor, str]:
    """[N, d] unit rows (padding: zeros) of the content vectors when given, else of the model's learned output
    layer, and which they are, in words."""
    if content_vectors is None:
        vectors, source = model.item_tables()[-1], "learned output-layer item vectors"
    else:
        vectors, source = content_vectors, "public content vectors"
    unit = unit_rows(vectors.detach().float().cpu())
    unit[0] = 0.0
    return unit, source


def item_space(model: SASRec, content_vectors: torch.Tensor | None = None) -> ItemSpace:
    """``similarity_vectors``, and their clusters as categories."""
    unit, source = similarity_vectors(model, content_vectors)
    return ItemSpace(
        unit, vector_clusters(unit.numpy().astype(np.float64), CATEGORY_CLUSTERS),
        f"{source}; categories: {CATEGORY_CLUSTERS} k-means clusters of them",
    )
