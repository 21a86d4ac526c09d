"""Multi-step engagement, offline: replay each user's last events and watch how the lists adapt.

Protocol. Every user with at least ``steps + 1`` events starts from the history before their last ``steps``
events. Each step recommends a top-``k`` list (history items excluded, as in the one-step evaluation, the step's
true item always rankable), reveals the true next item, counts a hit when the list held it, and appends the true
item to the history. Reported per user group (tail / torso / head by ``len - 2``, the one-step evaluation's
training length): the cumulative hits per user after each step, the step of the first hit (among users with one)
and the share of users with none, and the repeat rate: the share of the list slots of steps 2..k that hold an
item an earlier step already showed.

The leave-one-out split holds out only each user's last 2 events, so with ``steps`` > 2 the first ``steps - 2``
replayed events were in the model's training data: those steps flatter every variant alike. The comparison
between variants (with and without the re-ranker, the augmentation) is what the replay is for; its last two steps
are the clean ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from common.data.split import left_pad
from common.recommender.evaluation import Scorer
from common.recommender.metrics import GROUPS, exclusion_mask, top_k, user_groups
from common.recommender.rerank import DiversityOptions, diversify

BATCH = 256


@dataclass(frozen=True)
class Reranking:
    """The re-ranker a replay applies, with the items shown in earlier steps as its repetition penalty's."""

    unit: torch.Tensor
    options: DiversityOptions


def replay(
    scorer: Scorer, sequences: Sequence[np.ndarray], steps: int, max_len: int, k: int = 10,
    reranking: Reranking | None = None,
) -> dict[str, Any]:
    """Replay the last ``steps`` events of every long-enough user (see the module docstring); a report per group."""
    users = [s for s in sequences if len(s) >= steps + 1]
    hits = np.zeros((len(users), steps), dtype=bool)
    repeats = np.zeros((len(users), steps), dtype=np.int64)
    slots = np.zeros((len(users), steps), dtype=np.int64)
    for start in range(0, len(users), BATCH):
        batch = users[start : start + BATCH]
        rows = slice(start, start + len(batch))
        shown: torch.Tensor | None = None
        for step in range(steps):
            histories = [s[: len(s) - steps + step] for s in batch]
            targets = torch.tensor([int(s[len(s) - steps + step]) for s in batch])
            inputs = torch.from_numpy(np.stack([left_pad(h, max_len) for h in histories]))
            scores = scorer(inputs)
            if shown is None:
                shown = torch.zeros(scores.shape, dtype=torch.bool)
            excluded = exclusion_mask(histories, targets, scores.shape[1])
            if reranking is None:
                lists = top_k(scores, excluded, k)
            else:
                lists, values = diversify(scores, excluded, reranking.unit, reranking.options, k, shown)
                lists = lists.masked_fill(~torch.isfinite(values), 0)
            real = lists != 0
            hits[rows, step] = ((lists == targets.unsqueeze(1)) & real).any(dim=1).numpy()
            repeats[rows, step] = (shown.gather(1, lists) & real).sum(dim=1).numpy()
            slots[rows, step] = real.sum(dim=1).numpy()
            shown[torch.arange(len(batch)).unsqueeze(1).expand_as(lists)[real], lists[real]] = True
    groups = user_groups(np.asarray([len(s) - 2 for s in users]))
    report = {"steps": steps, "k": k, "overall": _summary(hits, repeats, slots)}
    report["groups"] = {name: _summary(hits[groups == name], repeats[groups == name], slots[groups == name])
                        for name in GROUPS}
    return report


def _summary(hits: np.ndarray, repeats: np.ndarray, slots: np.ndarray) -> dict[str, Any]:
    users = len(hits)
    any_hit = hits.any(axis=1)
    first = hits.argmax(axis=1) + 1
    later_slots = int(slots[:, 1:].sum())
    return {
        "users": users,
        "cumulative_hits": [float(v) for v in hits.cumsum(axis=1).mean(axis=0)] if users else [],
        "first_hit_step": float(first[any_hit].mean()) if any_hit.any() else None,
        "no_hit_share": float(1 - any_hit.mean()) if users else 0.0,
        "repeat_rate": float(repeats[:, 1:].sum() / later_slots) if later_slots else 0.0,
    }
