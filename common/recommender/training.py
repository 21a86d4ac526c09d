"""Plain (non-private) training of SASRec, shared by the centralized ceiling and later federated code."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from common.data.split import EvaluationCases, TrainingExamples, length_buckets, trim_left_padding
from common.errors import ConfigError
from common.recommender.evaluation import evaluate, model_scorer
from common.recommender.item_tables import trainable_parameters
from common.recommender.model import LossName, SASRec, sequence_loss
from common.utils.progress import log, progress_bar


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 200
    batch_size: int = 128
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 5
    """Evaluations without a better validation NDCG@10 before stopping."""
    eval_every: int = 2
    loss: LossName = "ce"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 1 or self.eval_every < 1:
            raise ConfigError("epochs, batch size, patience and eval-every must all be at least 1")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ConfigError(f"learning rate must be a positive finite number, got {self.learning_rate}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"weight decay must be a finite number >= 0, got {self.weight_decay}")
        if self.loss not in ("ce", "bce"):
            raise ConfigError(f"unknown loss '{self.loss}': use 'ce' or 'bce'")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


CPU = torch.device("cpu")
"""The default where code takes a device argument and the caller says none (``pick_device`` picks the GPU)."""


def pick_device(requested: str | None = None) -> torch.device:
    """CUDA when present (or when asked for), the CPU otherwise."""
    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device '{requested}' asked for, but no CUDA GPU is visible")
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train_one_epoch(
    model: SASRec,
    optimizer: torch.optim.Optimizer,
    examples: TrainingExamples,
    batch_size: int,
    loss: LossName,
    device: torch.device,
    generator: torch.Generator,
    label: str = "",
) -> float:
    """One pass over the users in length-bucketed, shuffled batches; returns the mean training loss."""
    model.train()
    batches_of_rows = length_buckets(examples.lengths(), batch_size, generator)
    total, batches = 0.0, 0
    with progress_bar(len(batches_of_rows), label) as advance:
        for rows in batches_of_rows:
            inputs, targets = trim_left_padding(examples.inputs[rows], examples.targets[rows])
            inputs, targets = inputs.to(device), targets.to(device)
            optimizer.zero_grad(set_to_none=True)
            value = sequence_loss(model(inputs), targets, loss, generator if device.type == "cpu" else None)
            value.backward()
            optimizer.step()
            total += float(value.detach())
            batches += 1
            advance(f"loss {total / batches:.4f}")
    return total / max(batches, 1)


@dataclass
class FitResult:
    best_epoch: int
    best_valid_ndcg10: float
    epochs_run: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit(
    model: SASRec,
    examples: TrainingExamples,
    valid: EvaluationCases,
    popularity: np.ndarray,
    num_users: int,
    config: TrainConfig,
    device: torch.device,
) -> FitResult:
    """Train with Adam and early stopping on validation NDCG@10; the model ends at its best epoch."""
    if len(examples) == 0:
        raise ConfigError("no user has two or more training interactions: nothing to train on")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model.to(device)
    optimizer = torch.optim.Adam(
        trainable_parameters(model), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    best_state = copy.deepcopy(model.state_dict())
    result = FitResult(best_epoch=0, best_valid_ndcg10=-1.0, epochs_run=0, seconds=0.0)
    started = time.perf_counter()
    stale = 0
    for epoch in range(1, config.epochs + 1):
        loss = train_one_epoch(
            model, optimizer, examples, config.batch_size, config.loss, device, generator, f"epoch {epoch}"
        )
        result.epochs_run = epoch
        if epoch % config.eval_every and epoch != config.epochs:
            continue
        ndcg = evaluate(model_scorer(model, device), valid, popularity, num_users)["overall"]["ndcg@10"]
        result.history.append({"epoch": epoch, "loss": loss, "valid_ndcg@10": ndcg})
        improved = ndcg > result.best_valid_ndcg10
        log(
            f"epoch {epoch:3d}  loss {loss:.4f}  valid NDCG@10 {ndcg:.4f}"
            f"{'  (best)' if improved else ''}  {time.perf_counter() - started:6.1f}s"
        )
        if improved:
            result.best_epoch, result.best_valid_ndcg10 = epoch, ndcg
            best_state = copy.deepcopy(model.state_dict())
            stale = 0
        else:
            stale += 1
            if stale >= config.patience:
                log(f"early stop: no better validation NDCG@10 in {config.patience} evaluations")
                break
    model.load_state_dict(best_state)
    result.seconds = time.perf_counter() - started
    return result
