"""The server's per-round checkpoint: enough to resume a run exactly where it stopped.

Holds the global weights after a round, the round number, the run's settings
(a resumed run must use the same ones: noise was calibrated on them), the
per-site epsilon last reported, and the best round so far by validation (kept
in the same file so that a kill between two writes cannot pair one round's
"best" with another round's state). Written atomically after every round.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.errors import DataError
from common.run_files import CHECKPOINT_FILE, check_same_settings
from common.utils.files import load_torch, save_torch

CHECKPOINT_FORMAT = "fedtail-checkpoint/2"


@dataclass(frozen=True)
class BestRound:
    """The round whose global model scored the highest validation NDCG@10 so far."""

    round: int
    valid_ndcg: float
    state_dict: dict[str, torch.Tensor]


@dataclass
class Checkpoint:
    run_id: str
    round: int
    state_dict: dict[str, torch.Tensor]
    run_config: dict[str, Any]
    site_epsilon: dict[str, float]
    best: BestRound | None = None

    def save(self, out_dir: Path) -> None:
        payload = {
            "format": CHECKPOINT_FORMAT,
            "run_id": self.run_id,
            "round": self.round,
            "state_dict": self.state_dict,
            "run_config": self.run_config,
            "site_epsilon": self.site_epsilon,
            "best": None if self.best is None else vars(self.best),
        }
        save_torch(out_dir / CHECKPOINT_FILE, payload)


def load_checkpoint(out_dir: Path, run_config: dict[str, Any]) -> Checkpoint | None:
    """The last checkpoint in ``out_dir``, or None for a fresh run; refuses a different run's folder."""
    path = out_dir / CHECKPOINT_FILE
    if not path.exists():
        return None
    payload = load_torch(path, "the checkpoint")
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"not a fedtail checkpoint (expected {CHECKPOINT_FORMAT!r})", path)
    check_same_settings(out_dir, payload["run_config"], run_config)
    best = payload["best"]
    return Checkpoint(
        payload["run_id"],
        int(payload["round"]),
        payload["state_dict"],
        payload["run_config"],
        payload["site_epsilon"],
        None if best is None else BestRound(int(best["round"]), float(best["valid_ndcg"]), best["state_dict"]),
    )
