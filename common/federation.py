"""The run's public settings, as both apps read them from Flower's run config.

Defaults live in ``pyproject.toml`` under ``[tool.flwr.app.config]`` (Flower
rejects overrides of keys not listed there); this module turns that flat
key/value mapping into typed settings and validates it, so that a wrong value
fails at start-up with the key's name, not deep in a round.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.errors import ConfigError
from common.model import ModelConfig, ModelOptions
from common.partition import SCHEMES
from common.privacy import GRAD_SAMPLE_MODES

SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam")
"""What the server does with the averaged update (``server.strategy``); all of it is post-processing."""
MODEL_SELECTIONS = ("best-validation", "last")
"""Which round's global model the run keeps. Choosing by the server's held-out validation users is
post-processing of released models, so it costs no privacy; without an evaluator it is the last round."""


@dataclass(frozen=True)
class RunSettings:
    dataset: str = "synthetic"
    """Simulation: the data split into sites. Deployment: the coordinator's own held-out users to evaluate on
    (mapped onto catalog-path), or "" when it has none."""
    catalog_path: str = ""
    """Deployment: the public catalogue file the model is built on; every site holds the same file."""
    item_text: str = ""
    """Public item metadata (MovieLens u.item, an item2attributes JSON) to initialise the global model's items
    from; "" for random."""
    kcore: int = 0
    partitioning: str = "uniform"
    seed: int = 0
    out_dir: str = "runs/flwr-run"
    rounds: int = 10
    model_selection: str = "best-validation"
    fraction_sites: float = 1.0
    min_sites: int = 1
    server_optimizer: str = "fedavg"
    server_learning_rate: float = 0.0  # 0: the optimizer's usual default (see server.strategy)
    server_momentum: float = 0.9  # fedavgm's momentum, fedadam's beta_1
    dp: bool = True
    epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    sample_rate: float = 0.1
    """Under DP, the probability that a site samples a given user into a step (public: the same at every site,
    never derived from a site's user count); a round is ceil(local-epochs / sample-rate) steps."""
    batch_size: int = 64
    """Under DP, the public number each step's noisy sum is divided by; without DP, the batch size."""
    local_epochs: float = 1.0
    learning_rate: float = 5e-3  # under DP noise, 1e-3 learns far slower (measured on the synthetic default)
    loss: str = "ce"
    grad_sample_mode: str = "ghost"  # how Opacus measures per-user gradient norms (common.privacy.GradSampleMode)
    max_physical_batch_size: int = 0  # split bigger Poisson batches to bound memory; 0: never
    # Model options, flat because Flower's run config is flat; defaults from ModelOptions.
    max_len: int = ModelOptions.max_len
    hidden: int = ModelOptions.hidden
    heads: int = ModelOptions.heads
    blocks: int = ModelOptions.blocks
    dropout: float = ModelOptions.dropout

    def __post_init__(self) -> None:
        # Every float field, first: NaN and inf pass checks such as `epsilon <= 0` (--epsilon inf trained).
        not_finite = [f"{name.replace('_', '-')}={value}" for name, value in vars(self).items()
                      if isinstance(value, float) and not math.isfinite(value)]
        if not_finite:
            raise ConfigError(f"run config: {', '.join(not_finite)}: must be a finite number")
        problems = [
            f"partitioning='{self.partitioning}': use one of {', '.join(SCHEMES)}" * (self.partitioning not in SCHEMES),
            "dataset='' (no evaluation at the server) needs catalog-path" * (not self.dataset and not self.catalog_path),
            f"rounds={self.rounds}: must be at least 1" * (self.rounds < 1),
            f"model-selection='{self.model_selection}': use one of {', '.join(MODEL_SELECTIONS)}"
            * (self.model_selection not in MODEL_SELECTIONS),
            f"fraction-sites={self.fraction_sites}: must be in (0, 1]" * (not 0 < self.fraction_sites <= 1),
            f"min-sites={self.min_sites}: must be at least 1" * (self.min_sites < 1),
            f"server-optimizer='{self.server_optimizer}': use one of {', '.join(SERVER_OPTIMIZERS)}"
            * (self.server_optimizer not in SERVER_OPTIMIZERS),
            f"server-learning-rate={self.server_learning_rate}: must be 0 (default) or positive"
            * (self.server_learning_rate < 0),
            f"server-momentum={self.server_momentum}: must be in [0, 1)" * (not 0 <= self.server_momentum < 1),
            f"epsilon={self.epsilon}: must be positive" * (self.dp and self.epsilon <= 0),
            f"delta={self.delta}: must be in (0, 1)" * (self.dp and not 0 < self.delta < 1),
            f"max-grad-norm={self.max_grad_norm}: must be positive" * (self.dp and self.max_grad_norm <= 0),
            f"sample-rate={self.sample_rate}: must be in (0, 1]" * (not 0 < self.sample_rate <= 1),
            f"batch-size={self.batch_size}: must be at least 1" * (self.batch_size < 1),
            f"local-epochs={self.local_epochs}: must be positive" * (self.local_epochs <= 0),
            f"learning-rate={self.learning_rate}: must be positive" * (self.learning_rate <= 0),
            f"loss='{self.loss}': use 'ce' or 'bce'" * (self.loss not in ("ce", "bce")),
            f"grad-sample-mode='{self.grad_sample_mode}': use one of {', '.join(GRAD_SAMPLE_MODES)}"
            * (self.grad_sample_mode not in GRAD_SAMPLE_MODES),
            f"max-physical-batch-size={self.max_physical_batch_size}: must be 0 (off) or positive"
            * (self.max_physical_batch_size < 0),
        ]
        problems = [problem for problem in problems if problem]
        if problems:
            raise ConfigError("run config: " + "; ".join(problems))
        ModelOptions(self.max_len, self.hidden, self.heads, self.blocks, self.dropout)  # validates them

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> RunSettings:
        known = {name.replace("_", "-"): name for name in cls.__dataclass_fields__}
        unknown = sorted(set(config) - set(known))
        if unknown:
            raise ConfigError(f"unknown run config keys {unknown}; known: {sorted(known)}")
        values: dict[str, Any] = {}
        for key, value in config.items():
            field = cls.__dataclass_fields__[known[key]]
            expected = {"int": int, "float": float, "bool": bool, "str": str}[str(field.type)]
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise ConfigError(f"run config {key}={value!r}: expected {expected.__name__}")
            values[known[key]] = value
        return cls(**values)

    def to_run_config(self) -> dict[str, Any]:
        return {name.replace("_", "-"): getattr(self, name) for name in self.__dataclass_fields__}

    def model_config(self, num_items: int) -> ModelConfig:
        return ModelOptions(self.max_len, self.hidden, self.heads, self.blocks, self.dropout).for_catalog(num_items)
