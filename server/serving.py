"""Recommendations from a saved model: ``Recommender.load(run_dir).recommend(history, k)``.

The HTTP service (``server.http``) is a thin layer over this class. Everything
served comes from the model and its catalogue alone: no interaction counts or
other statistics of private data are read, so what is served is covered by
the run's privacy guarantee (post-processing of a DP model).

Each recommended item comes with the history item that contributed most to it,
found by occlusion: the item whose removal lowers that recommendation's score
the most. One batched forward pass per request computes all of them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.data.catalog import Catalog
from common.data.split import left_pad
from common.errors import ConfigError
from common.recommender.artifacts import load_model, saved_model_file
from common.recommender.content import ITEM_VECTORS_FILE, load_item_vectors
from common.recommender.model import PADDING_INDEX, SASRec
from common.recommender.ranking import RankingOptions, content_prior, model_prior, rerank, unit_rows
from common.recommender.training import pick_device
from common.run_files import SUMMARY_FILE
from server.popularity import load_popularity_prior

MAX_K = 1000
MODEL_STRATEGY, PRIOR_STRATEGY = "model", "model prior (cold start: no known history item)"


@dataclass(frozen=True)
class Recommendation:
    item: str
    score: float
    because_of: str | None
    """The history item that contributed most (None for a cold start)."""


@dataclass(frozen=True)
class RecommendationList:
    items: list[Recommendation]
    strategy: str
    unknown_items: list[str] = field(default_factory=list)
    """History items the catalogue does not know; they were ignored."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    """The first 16 hex digits of the model file's sha256: which version served a response."""
    catalog_size: int
    catalog_sha256: str
    """The first 16 hex digits of the catalogue's fingerprint, which the model file records and was checked against."""
    catalog_version: int
    """The catalogue's own version number (1 for a catalogue that never grew; lifelong runs extend it)."""
    run_dir: str
    run_id: str | None
    privacy: dict[str, Any] | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Recommender:
    def __init__(
        self, model: SASRec, catalog: Catalog, info: ModelInfo, device: torch.device,
        ranking: RankingOptions = RankingOptions(),
        item_vectors: torch.Tensor | None = None,
        prior: torch.Tensor | None = None,
    ) -> None:
        """``prior``: the cold-start prior over catalogue indices ([N + 1] probabilities); by default the model's
        own prediction for an empty history, or the run's DP popularity floor when it had one."""
        if ranking.cold_start_prior == "content" and item_vectors is None:
            raise ConfigError(
                f"the content cold-start prior needs {ITEM_VECTORS_FILE} beside the model: train with --item-text"
            )
        self.model = model.to(device).eval()
        self.catalog = catalog
        self.info = info
        self.device = device
        self.ranking = ranking
        self.prior = model_prior(self.model) if prior is None else prior.float().cpu()
        self.content_vectors: torch.Tensor | None = None  # unit rows, made once: the content prior's only input
        if ranking.cold_start_prior == "content" and ranking.cold_start_weight > 0 and item_vectors is not None:
            self.content_vectors = unit_rows(item_vectors).to(device)

    @classmethod
    def load(
        cls, run_dir: str | Path, device: torch.device | None = None, ranking: RankingOptions = RankingOptions()
    ) -> Recommender:
        """A federated run folder (global_model.pt) or a centralized one (model.pt), with its catalog.json."""
        run_dir = Path(run_dir)
        model_file = saved_model_file(run_dir)
        device = device or pick_device()
        model, catalog = load_model(run_dir, model_file, device)
        summary_path = run_dir / SUMMARY_FILE
        summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.exists() else {}
        info = ModelInfo(
            model_id=hashlib.sha256((run_dir / model_file).read_bytes()).hexdigest()[:16],
            catalog_size=catalog.num_items,
            catalog_sha256=catalog.fingerprint()[:16],
            catalog_version=catalog.version,
            run_dir=str(run_dir),
            run_id=summary.get("run", {}).get("run_id"),
            privacy=summary.get("privacy"),
        )
        return cls(model, catalog, info, device, ranking, load_item_vectors(run_dir, catalog.num_items),
                   load_popularity_prior(run_dir, catalog.num_items))

    def recommend(
        self, history: Sequence[str], k: int = 10, exclude_history: bool = True, explain: bool = True
    ) -> RecommendationList:
        return self.recommend_many([history], k, exclude_history, explain)[0]

    def recommend_many(
        self, histories: Sequence[Sequence[str]], k: int = 10, exclude_history: bool = True, explain: bool = True
    ) -> list[RecommendationList]:
        if not 1 <= k <= MAX_K:
            raise ConfigError(f"k={k}: must be between 1 and {MAX_K}")
        return [self._recommend_one(history, k, exclude_history, explain) for history in histories]

    def _recommend_one(
        self, history: Sequence[str], k: int, exclude_history: bool, explain: bool
    ) -> RecommendationList:
        known, unknown = self.catalog.indices([str(item) for item in history])
        known = known[-self.model.config.max_len :]
        with torch.no_grad():
            # Row 0: the history as given; row 1 + i: without its i-th item (occlusion, for the explanation).
            variants = [known] + ([np.delete(known, i) for i in range(len(known))] if explain else [])
            length = max(len(known), 1)
            batch = torch.from_numpy(np.stack([left_pad(v, length) for v in variants])).to(self.device)
            scores = self.model.last_scores(batch)  # [1 + len(known), N]
        blend = None
        if self.content_vectors is not None:
            blend = content_prior(batch[:1], self.content_vectors, self.prior, self.ranking.content_temperature)
        full = rerank(scores[:1], torch.tensor([len(known)]), self.prior, self.ranking, blend)[0].clone()
        full[PADDING_INDEX] = float("-inf")
        if exclude_history and len(known):
            full[torch.from_numpy(known).to(self.device)] = float("-inf")
        top = torch.topk(full, min(k, int(torch.isfinite(full).sum()))).indices
        items = []
        for index in top.tolist():
            because = None
            if explain and len(known):
                drop = scores[0, index] - scores[1:, index]  # how much each history item lifts this one
                because = self.catalog.raw_id(int(known[int(torch.argmax(drop))]))
            items.append(Recommendation(self.catalog.raw_id(index), float(full[index]), because))
        return RecommendationList(items, self._strategy(len(known)), unknown)

    def _strategy(self, known: int) -> str:
        parts = [MODEL_STRATEGY if known else PRIOR_STRATEGY]
        if self.ranking.cold_start_weight > 0 and known < self.ranking.cold_start_fade:
            content = self.ranking.cold_start_prior == "content" and known
            prior = "content prior (items like yours)" if content else "model prior"
            weight = self.ranking.cold_start_weight * (1 - known / self.ranking.cold_start_fade)
            parts.append(f"cold-start blend with the {prior} (weight {weight:.2f})")
        if self.ranking.tail_penalty > 0:
            parts.append(f"tail penalty {self.ranking.tail_penalty:g}")
        return " + ".join(parts)

