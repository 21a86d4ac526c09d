"""Centralized, non-private training: the accuracy ceiling every federated run is compared with."""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

import torch

from common.data.datasets import Dataset
from common.data.split import evaluation_cases, item_popularity, training_examples
from common.recommender.artifacts import load_model, save_model, saved_model_file
from common.recommender.content import initialise_from_text, save_item_vectors
from common.recommender.evaluation import evaluate_with_baselines, model_scorer
from common.recommender.item_tables import apply_item_tables
from common.recommender.model import ModelOptions, SASRec
from common.recommender.training import TrainConfig, fit, pick_device
from common.utils.files import write_json
from common.utils.progress import log

METRICS_FILE = "metrics.json"


def train_centralized(
    dataset: Dataset,
    out: Path,
    options: ModelOptions,
    config: TrainConfig,
    device: torch.device | None = None,
    item_text: Path | None = None,
    item_tables: str = "trained",
) -> dict[str, Any]:
    """Train on all users, pick the best epoch on validation, report on test; writes model, catalogue, metrics.

    ``item_text``: public item metadata to initialise item embeddings from (``common.recommender.content``);
    ``item_tables = frozen`` keeps both tables at that initialisation (``common.recommender.item_tables``).
    """
    device = device or pick_device()
    catalog = dataset.catalog()
    _, sequences = dataset.sequences(catalog)
    model_config = options.for_catalog(catalog.num_items)
    examples = training_examples(sequences, model_config.max_len)
    valid = evaluation_cases(sequences, "valid", model_config.max_len)
    test = evaluation_cases(sequences, "test", model_config.max_len)
    popularity = item_popularity(sequences, catalog.num_items)
    log(
        f"training SASRec on {dataset.spec}: {len(sequences)} users ({len(examples)} with training pairs, "
        f"{len(test)} evaluated), {catalog.num_items} items, device {device}"
    )
    torch.manual_seed(config.seed)
    model = SASRec(model_config)
    vectors = None if item_text is None else initialise_from_text(model, catalog, item_text)
    apply_item_tables(model, item_tables)
    result = fit(model, examples, valid, popularity, len(sequences), config, device)
    report = evaluate_with_baselines(model_scorer(model, device), test, popularity, len(sequences))
    report["run"] = {
        "kind": "centralized, non-private",
        "stage": "test",
        "dataset": dataset.spec,
        "data": dataset.stats().as_dict(),
        "catalog": "built from the dataset",
        "item_init": f"content: {item_text}" if item_text is not None else "random",
        "item_tables": item_tables,
        "model": model_config.as_dict(),
        "train": config.as_dict(),
        "fit": result.as_dict(),
        "device": str(device),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
    }
    out.mkdir(parents=True, exist_ok=True)
    save_model(out, model, catalog)
    if vectors is not None:
        save_item_vectors(out, vectors)
    write_json(out / METRICS_FILE, report)
    return report


def evaluate_saved(model_dir: Path, dataset: Dataset, device: torch.device | None = None) -> dict[str, Any]:
    """Test-split metrics of a saved model (``fedtail train``'s or a federated run's) on a dataset.

    Items unknown to the model's catalogue are dropped and counted.
    """
    device = device or pick_device()
    model_file = saved_model_file(model_dir)
    model, catalog = load_model(model_dir, model_file, device)
    dataset, unknown = dataset.restricted_to(catalog)
    if unknown:
        log(f"warning: {unknown} interactions name items outside the model's catalogue; they are ignored")
    _, sequences = dataset.sequences(catalog)
    test = evaluation_cases(sequences, "test", model.config.max_len)
    popularity = item_popularity(sequences, catalog.num_items)
    started = time.perf_counter()
    report = evaluate_with_baselines(model_scorer(model, device), test, popularity, len(sequences))
    report["run"] = {
        "kind": "evaluation of a saved model",
        "stage": "test",
        "model_dir": str(model_dir),
        "model_file": model_file,
        "dataset": dataset.spec,
        "unknown_item_interactions_ignored": unknown,
        "seconds": time.perf_counter() - started,
    }
    return report
