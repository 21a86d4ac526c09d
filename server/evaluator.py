"""The server's held-out view of users: validation of each round's global model, the test at the end.

A simulation's server holds every user's last items; a deployed coordinator
evaluates on its own held-out users when it has some (``dataset``, mapped onto
``catalog-path``), and otherwise not at all. Sites never send local metrics:
they would be releases outside any ledger.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from common.data.catalog import Catalog
from common.data.datasets import load_dataset
from common.data.split import EvaluationCases, evaluation_cases, item_popularity
from common.federation import RunSettings
from common.recommender.evaluation import evaluate, model_scorer
from common.recommender.model import SASRec
from common.utils.progress import log


@dataclass(frozen=True)
class Evaluator:
    """Validation and test cases over the coordinator's catalogue, and the popularity the baselines use."""

    catalog: Catalog
    valid: EvaluationCases
    test: EvaluationCases
    popularity: np.ndarray
    num_users: int

    @classmethod
    def from_settings(cls, settings: RunSettings) -> Evaluator:
        dataset = load_dataset(settings.dataset, kcore=settings.kcore)
        if settings.catalog_path:
            catalog = Catalog.load(settings.catalog_path)
            dataset, unknown = dataset.restricted_to(catalog)
            if unknown:
                log(f"fedtail: {unknown} evaluation interactions name items outside the catalogue; ignored")
        else:
            catalog = dataset.catalog()
        _, sequences = dataset.sequences(catalog)
        return cls(
            catalog,
            evaluation_cases(sequences, "valid", settings.max_len),
            evaluation_cases(sequences, "test", settings.max_len),
            item_popularity(sequences, catalog.num_items),
            len(sequences),
        )


def server_catalog(settings: RunSettings) -> tuple[Catalog, Evaluator | None]:
    if not settings.dataset:
        return Catalog.load(settings.catalog_path), None
    evaluator = Evaluator.from_settings(settings)
    return evaluator.catalog, evaluator


def validation_line(model: SASRec, device: torch.device, evaluator: Evaluator) -> dict[str, float]:
    metrics = evaluate(model_scorer(model, device), evaluator.valid, evaluator.popularity, evaluator.num_users)
    return {
        "ndcg@10": metrics["overall"]["ndcg@10"],
        "hr@10": metrics["overall"]["hr@10"],
        **{f"{g}_ndcg@10": metrics["groups"][g]["ndcg@10"] for g in ("tail", "torso", "head")},
    }
