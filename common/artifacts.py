"""Saving and loading a model together with the catalogue it was trained on.

Files are written atomically (``common.files``). Models are loaded with ``weights_only=True``: a model file from elsewhere cannot run code.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from common.catalog import Catalog
from common.errors import DataError
from common.files import load_torch, save_torch
from common.model import ModelConfig, SASRec

MODEL_FORMAT = "fedtail-model/1"
MODEL_FILE = "model.pt"
CATALOG_FILE = "catalog.json"


def catalog_fingerprint(catalog: Catalog) -> str:
    return hashlib.sha256("\n".join(catalog.items).encode("utf-8")).hexdigest()


def save_model(directory: str | Path, model: SASRec, catalog: Catalog, model_file: str = MODEL_FILE) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": MODEL_FORMAT,
        "model_config": model.config.as_dict(),
        "catalog_sha256": catalog_fingerprint(catalog),
        "state_dict": {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()},
    }
    path = directory / model_file
    save_torch(path, payload)
    catalog.save(directory / CATALOG_FILE)
    return path


def load_model(
    directory: str | Path, model_file: str = MODEL_FILE, device: torch.device | None = None
) -> tuple[SASRec, Catalog]:
    directory = Path(directory)
    path = directory / model_file
    if not path.is_file():
        raise DataError(f"no {model_file} here; train a model first (fedtail train ... --out {directory})", directory)
    catalog = Catalog.load(directory / CATALOG_FILE)
    payload = load_torch(path, "the model file")
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise DataError(f"not a fedtail model (expected format {MODEL_FORMAT!r})", path)
    if payload.get("catalog_sha256") != catalog_fingerprint(catalog):
        raise DataError(f"the model was trained with a different catalogue than {CATALOG_FILE} beside it", path)
    config = ModelConfig(**payload["model_config"])
    model = SASRec(config)
    model.load_state_dict(payload["state_dict"])
    if device is not None:
        model.to(device)
    model.eval()
    return model, catalog
