"""Leave-one-out split by time, and the tensors the model trains and is evaluated on.

For a user with items ``s[0..n-1]`` (oldest first): ``s[-1]`` is the test
target, ``s[-2]`` the validation target, ``s[:-2]`` the training history.
Users with fewer than 3 interactions have nothing to hold out; their items are
all training history and they are not evaluated.

One training example per user: the most recent ``max_len + 1`` training items
give ``max_len`` (input, next-item) positions. This is also the DP privacy
unit, so a user must never be split into several examples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from common.data.catalog import PADDING_INDEX

MIN_EVALUATED_LENGTH = 3
Stage = Literal["valid", "test"]


def training_history(sequence: np.ndarray) -> np.ndarray:
    return sequence[:-2] if len(sequence) >= MIN_EVALUATED_LENGTH else sequence


def users_with_training_pairs(lengths: np.ndarray) -> int:
    """How many of the users with these history lengths give ``training_examples`` at least one pair."""
    kept = np.where(lengths >= MIN_EVALUATED_LENGTH, lengths - 2, lengths)
    return int((kept >= 2).sum())


def left_pad(sequence: np.ndarray, length: int) -> np.ndarray:
    """The most recent ``length`` items, padded on the left with the padding index."""
    out = np.full(length, PADDING_INDEX, dtype=np.int64)
    tail = sequence[-length:] if length > 0 else sequence[:0]
    if len(tail):
        out[length - len(tail) :] = tail
    return out


def trim_left_padding(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Drop leading columns that are padding in every row of the first tensor.

    Exact, not an approximation: padded positions are masked out of attention
    and zeroed, and positions are counted back from the most recent item, so
    every real position's output is unchanged. Short-history batches (most of
    a long-tailed dataset) get much cheaper.
    """
    real_columns = (tensors[0] != PADDING_INDEX).any(dim=0).nonzero()
    first = int(real_columns[0]) if len(real_columns) else tensors[0].shape[1] - 1
    return tuple(t[:, first:] for t in tensors)


def length_sorted_pieces(
    inputs: torch.Tensor, targets: torch.Tensor, piece_users: int
) -> list[tuple[torch.Tensor, ...]]:
    """The batch's rows sorted by history length, cut into pieces of at most ``piece_users``, each trimmed.

    A step's cost grows with rows x the longest history among them. One long
    history in a batch of short ones (the usual case on long-tailed data) makes
    every row pay for it; sorted pieces each pay for their own longest. Pieces
    as wide as the next are merged into it, so equal-length batches stay whole.
    Only for losses that sum over users, where the pieces' gradients add up to
    the batch's (DP-SGD's clipped sum does). An empty batch is one empty piece.
    """
    lengths = (inputs != PADDING_INDEX).sum(dim=1)
    order = torch.argsort(lengths, stable=True)
    pieces: list[torch.Tensor] = []
    for rows in order.split(piece_users):
        if pieces and lengths[pieces[-1][-1]] == lengths[rows[-1]]:  # as wide as the one before: nothing saved
            pieces[-1] = torch.cat([pieces[-1], rows])
        else:
            pieces.append(rows)
    return [trim_left_padding(inputs[rows], targets[rows]) for rows in pieces]


def length_buckets(lengths: np.ndarray, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Batches of users with similar history lengths, in random order (random within a length, too)."""
    jitter = torch.rand(len(lengths), generator=generator).numpy()
    order = torch.from_numpy(np.lexsort((jitter, lengths)))
    batches = list(order.split(batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


@dataclass(frozen=True)
class TrainingExamples:
    """One row per user with at least one (input, next item) pair.

    inputs, targets: [users, max_len], left-padded; targets[u, t] is the item
    after inputs[u, t], PADDING_INDEX where there is none.
    """

    inputs: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def lengths(self) -> np.ndarray:
        return (self.targets != PADDING_INDEX).sum(dim=1).numpy()


def training_examples(sequences: Sequence[np.ndarray], max_len: int) -> TrainingExamples:
    inputs: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    for sequence in sequences:
        history = training_history(sequence)
        if len(history) < 2:
            continue
        window = history[-(max_len + 1) :]
        inputs.append(left_pad(window[:-1], max_len))
        targets.append(left_pad(window[1:], max_len))
    if not inputs:
        return TrainingExamples(
            torch.zeros((0, max_len), dtype=torch.long), torch.zeros((0, max_len), dtype=torch.long)
        )
    return TrainingExamples(torch.from_numpy(np.stack(inputs)), torch.from_numpy(np.stack(targets)))


@dataclass(frozen=True)
class EvaluationCases:
    """Held-out next items of the evaluated users at one stage.

    inputs: [cases, max_len] left-padded recent history; targets: [cases];
    histories: the full history of each case (what ranking must exclude);
    training_lengths: length of each user's training history (defines the
    tail / torso / head groups); users: position of each case's user in the
    sequence list.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    histories: list[np.ndarray]
    training_lengths: np.ndarray
    users: np.ndarray

    def __len__(self) -> int:
        return int(self.targets.shape[0])


def evaluation_cases(sequences: Sequence[np.ndarray], stage: Stage, max_len: int) -> EvaluationCases:
    cut = {"valid": 2, "test": 1}[stage]
    inputs: list[np.ndarray] = []
    targets: list[int] = []
    histories: list[np.ndarray] = []
    lengths: list[int] = []
    users: list[int] = []
    for user, sequence in enumerate(sequences):
        if len(sequence) < MIN_EVALUATED_LENGTH:
            continue
        history = sequence[:-cut]
        inputs.append(left_pad(history, max_len))
        targets.append(int(sequence[-cut]))
        histories.append(history)
        lengths.append(len(sequence) - 2)
        users.append(user)
    return EvaluationCases(
        inputs=torch.from_numpy(np.stack(inputs)) if inputs else torch.zeros((0, max_len), dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        histories=histories,
        training_lengths=np.asarray(lengths, dtype=np.int64),
        users=np.asarray(users, dtype=np.int64),
    )


def item_popularity(sequences: Sequence[np.ndarray], num_items: int) -> np.ndarray:
    """Training-history interaction counts per item index ([num_items + 1], padding at 0)."""
    counts = np.zeros(num_items + 1, dtype=np.int64)
    for sequence in sequences:
        np.add.at(counts, training_history(sequence), 1)
    return counts
