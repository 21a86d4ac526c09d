"""The average of the global model over rounds: the model validated, kept and released, while training goes on from
the last round's weights.

Under DP every round's global model carries that round's noise. An exponential moving average of the iterates
averages that noise down without slowing the training itself (the sites always start from the raw iterate), and
it is post-processing of models the coordinator already holds, so it costs no privacy. De et al. 2022 ("Unlocking
high-accuracy differentially private image classification through scale") count it among the largest gains for
DP-SGD. The decay warms up as min(decay, (1 + t) / (10 + t)) after t rounds, their schedule, so that the first
rounds (far from where training goes) fade quickly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class IterateAverage:
    decay: float
    rounds: int = 0
    weights: dict[str, torch.Tensor] = field(default_factory=dict)

    def update(self, latest: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fold in one round's global weights; returns (a copy of) the average."""
        self.rounds += 1
        kept = min(self.decay, (1 + self.rounds) / (10 + self.rounds))
        self.weights = {
            name: kept * self.weights[name] + (1 - kept) * tensor
            if self.weights and torch.is_floating_point(tensor) else tensor.clone()
            for name, tensor in latest.items()
        }
        return {name: tensor.clone() for name, tensor in self.weights.items()}

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps, so that a resumed run goes on with the same average."""
        return {"decay": self.decay, "rounds": self.rounds, "weights": self.weights}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> IterateAverage:
        return cls(float(state["decay"]), int(state["rounds"]), dict(state["weights"]))
