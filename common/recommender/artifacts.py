"""Saving and loading a model together with the catalogue it was trained on.

Files are written atomically (``common.utils.files``). Models are loaded with ``weights_only=True``: a model file
from elsewhere cannot run code. A model holding NaN or infinity is refused at load, naming the file and the
parameter: every user of a saved model (``fedtail serve`` and its hot reload, ``fedtail evaluate``, a continued
run) loads it here, and a non-finite model ranks every item first.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from common.data.catalog import Catalog
from common.errors import DataError
from common.recommender.model import ModelConfig, SASRec
from common.run_files import CHECKPOINT_FILE, FLOWER_LOG_FILE, GLOBAL_MODEL_FILE, ROUNDS_FILE, RUN_FILE
from common.utils.files import load_torch, save_torch
from common.utils.finite import first_non_finite

MODEL_FORMAT = "fedtail-model/1"
MODEL_FILE = "model.pt"
CATALOG_FILE = "catalog.json"
RUN_FOLDER_FILES = (RUN_FILE, CHECKPOINT_FILE, ROUNDS_FILE, FLOWER_LOG_FILE)
"""Any of these without a model marks a federated run folder whose run has not finished."""


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


def saved_model_file(directory: str | Path) -> str:
    """The model a folder holds: a federated run's ``global_model.pt``, else a trained ``model.pt``.

    A folder with neither gets advice that fits it: a federated run folder has not finished (it failed, was
    stopped, or is still running), so it is pointed at its log and checkpoint rather than told to train a model.
    """
    directory = Path(directory)
    for name in (GLOBAL_MODEL_FILE, MODEL_FILE):
        if (directory / name).is_file():
            return name
    raise _no_model(directory, f"{MODEL_FILE} or {GLOBAL_MODEL_FILE}")


def _no_model(directory: Path, wanted: str) -> DataError:
    """Why ``directory`` holds no ``wanted``, with the advice that fits what it does hold."""
    if not directory.is_dir():
        return DataError("no such folder", directory)
    run_files = [name for name in RUN_FOLDER_FILES if (directory / name).is_file()]
    if not run_files:
        return DataError(
            f"no {wanted} here; train a model first (fedtail train ... --out {directory}) or run a federation "
            f"(fedtail simulate ... --out {directory})",
            directory,
        )
    advice = [f"no {GLOBAL_MODEL_FILE} here: this federated run has not finished (it failed, was stopped, or is still "
              "running)"]
    if FLOWER_LOG_FILE in run_files:
        advice.append(f"its log is {directory / FLOWER_LOG_FILE}")
    if CHECKPOINT_FILE in run_files:
        advice.append(f"{CHECKPOINT_FILE} holds its last finished round, which the same "
                      f"fedtail simulate ... --out {directory} resumes from")
    else:
        advice.append("it finished no round")
    return DataError("; ".join(advice), directory)


def load_model(
    directory: str | Path, model_file: str | None = None, device: torch.device | None = None
) -> tuple[SASRec, Catalog]:
    """The model in ``directory`` and its catalogue; ``model_file`` None: whichever ``saved_model_file`` finds."""
    directory = Path(directory)
    model_file = model_file or saved_model_file(directory)
    path = directory / model_file
    if not path.is_file():
        raise _no_model(directory, model_file)
    catalog = Catalog.load(directory / CATALOG_FILE)
    payload = load_torch(path, "the model file")
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise DataError(f"not a fedtail model (expected format {MODEL_FORMAT!r})", path)
    if payload.get("catalog_sha256") != catalog_fingerprint(catalog):
        raise DataError(
            f"the model was trained with a different catalogue (sha256 {str(payload.get('catalog_sha256'))[:16]}) than "
            f"{CATALOG_FILE} beside it (sha256 {catalog_fingerprint(catalog)[:16]}, {catalog.num_items} items)", path
        )
    config = ModelConfig(**payload["model_config"])
    if config.num_items != catalog.num_items:
        raise DataError(
            f"the model scores {config.num_items} items, {CATALOG_FILE} beside it lists {catalog.num_items}", path
        )
    model = SASRec(config)
    try:
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, KeyError) as error:
        raise DataError(f"the weights do not fit the model's own config: {str(error).splitlines()[0]}", path) from None
    broken = first_non_finite(model.state_dict())
    if broken is not None:
        raise DataError(f"parameter '{broken}' holds NaN or infinity: a non-finite model is never loaded", path)
    if device is not None:
        model.to(device)
    model.eval()
    return model, catalog
