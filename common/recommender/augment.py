"""Pseudo-prior items for short histories, generated from the released model alone (ASReP-style augmentation).

ASReP (Liu et al., SIGIR 2021) trains a second, reversed model to guess what a short-history user consumed
*before* their first item, prepends those guesses, and scores the longer history. A second model would be a second
release to train under DP; this module instead reverses the released forward model with Bayes' rule, which is
post-processing of the release and costs no privacy:

    p(previous = j | first = i)  is proportional to  p(i | history [j]) * p(j)

with p(i | [j]) the model's next-item distribution after the one-item history [j], and p(j) its prediction for an
empty history (``ranking.model_prior``). One batched pass over every one-item history gives, for each item, its
``CANDIDATES`` most likely predecessors; a history shorter than ``augment_to`` gets predecessors of its first item
prepended, one at a time (each the best one not already in the history), until it is ``augment_to`` long. The
pseudo items only condition the model: they are never excluded from or counted as the user's history.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from common.data.catalog import PADDING_INDEX
from common.data.split import left_pad
from common.errors import ConfigError
from common.recommender.evaluation import Scorer
from common.recommender.model import SASRec
from common.recommender.ranking import model_prior

CANDIDATES = 8
"""Predecessors kept per item: enough to skip those already in a short history."""
BATCH = 256


@dataclass(frozen=True)
class AugmentOptions:
    augment_to: int = 0
    """Histories with fewer known items than this get pseudo-prior items up to this length (0: off)."""

    def __post_init__(self) -> None:
        if self.augment_to < 0:
            raise ConfigError(f"augment-to {self.augment_to}: must be 0 (off) or a history length")

    def wants(self, known: int) -> int:
        """How many pseudo items a history of ``known`` items gets (a cold start gets none: no first item)."""
        return max(self.augment_to - known, 0) if known else 0


class PseudoPrior:
    """Each item's most likely predecessors under the model, reversed by Bayes' rule (see the module docstring)."""

    def __init__(self, predecessors: np.ndarray) -> None:
        self.predecessors = predecessors
        """[N, CANDIDATES]: row i, the items most likely just before i, best first (row 0, padding: unused)."""

    @classmethod
    def from_model(cls, model: SASRec) -> PseudoPrior:
        device = next(model.parameters()).device
        n = model.config.num_items + 1
        log_prior = torch.log(model_prior(model).clamp(min=1e-30)).to(device)  # [N], padding: -inf-like
        keep = min(CANDIDATES, n - 1)
        best = torch.full((keep, n), float("-inf"), device=device)
        best_index = torch.zeros((keep, n), dtype=torch.long, device=device)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for previous in torch.arange(1, n, device=device).split(BATCH):
                    next_log = torch.log_softmax(model.last_scores(previous.unsqueeze(1)).float(), dim=1)  # [b, N]
                    joint = next_log + log_prior[previous].unsqueeze(1)  # log p(i | [j]) + log p(j), row j
                    joint[torch.arange(len(previous), device=device), previous] = float("-inf")  # j != i
                    merged = torch.cat([best, joint])
                    merged_index = torch.cat([best_index, previous.unsqueeze(1).expand(-1, n)])
                    best, rows = merged.topk(keep, dim=0)
                    best_index = merged_index.gather(0, rows)
        finally:
            model.train(was_training)
        return cls(best_index.T.cpu().numpy())

    def generate(self, history: Sequence[int], count: int) -> list[int]:
        """Up to ``count`` pseudo-prior items for ``history`` (item indices, oldest first), oldest first."""
        used = set(history)
        pseudo: list[int] = []
        first = history[0] if len(history) else PADDING_INDEX
        while len(pseudo) < count and first != PADDING_INDEX:
            options = [int(j) for j in self.predecessors[first] if int(j) not in used and j != PADDING_INDEX]
            if not options:
                break
            first = options[0]
            used.add(first)
            pseudo.insert(0, first)
        return pseudo


def augmented_inputs(inputs: torch.Tensor, pseudo: PseudoPrior, options: AugmentOptions) -> torch.Tensor:
    """Left-padded inputs [B, L] with pseudo-prior items before each short history (never beyond L)."""
    out = inputs.clone()
    for row in range(inputs.shape[0]):
        known = inputs[row][inputs[row] != PADDING_INDEX].tolist()
        count = min(options.wants(len(known)), inputs.shape[1] - len(known))
        if count > 0:
            out[row] = torch.from_numpy(left_pad(np.asarray(pseudo.generate(known, count) + known), inputs.shape[1]))
    return out


def augmented_scorer(base: Scorer, pseudo: PseudoPrior, options: AugmentOptions) -> Scorer:
    """``base`` scoring each history with its pseudo-prior items prepended."""

    def score(inputs: torch.Tensor) -> torch.Tensor:
        return base(augmented_inputs(inputs, pseudo, options))

    return score
