"""Leave-one-out by time, one example per user, truncation to max_len."""

from __future__ import annotations

import numpy as np
import torch

from common.data.catalog import PADDING_INDEX
from common.data.split import (
    evaluation_cases,
    item_popularity,
    left_pad,
    length_sorted_pieces,
    training_examples,
    trim_left_padding,
)


def test_last_item_is_test_the_one_before_is_validation() -> None:
    sequences = [np.array([1, 2, 3, 4, 5]), np.array([6, 7])]
    valid = evaluation_cases(sequences, "valid", max_len=4)
    test = evaluation_cases(sequences, "test", max_len=4)
    assert valid.targets.tolist() == [4] and test.targets.tolist() == [5]
    assert valid.inputs.tolist() == [[0, 1, 2, 3]]
    assert test.inputs.tolist() == [[1, 2, 3, 4]]
    assert test.histories[0].tolist() == [1, 2, 3, 4], "test excludes the validation item as history"
    assert valid.training_lengths.tolist() == [3] and test.training_lengths.tolist() == [3]
    assert test.users.tolist() == [0], "users with fewer than 3 interactions are not evaluated"


def test_one_training_example_per_user_truncated_to_the_most_recent_items() -> None:
    sequences = [np.arange(1, 11), np.array([3, 4, 5]), np.array([8, 9])]
    examples = training_examples(sequences, max_len=4)
    # user 0: training history 1..8, window = last 5 = 4..8 -> inputs 4..7, targets 5..8
    assert examples.inputs[0].tolist() == [4, 5, 6, 7]
    assert examples.targets[0].tolist() == [5, 6, 7, 8]
    # user 1 has training history [3]: no pair, no example. user 2 (<3 items) trains on both items.
    assert len(examples) == 2
    assert examples.inputs[1].tolist() == [0, 0, 0, 8]
    assert examples.targets[1].tolist() == [0, 0, 0, 9]
    held_out = {9, 10}
    assert not held_out & set(examples.targets[0].tolist()), "validation and test items never train"


def test_left_pad_and_popularity_use_training_history_only() -> None:
    assert left_pad(np.array([5, 6]), 4).tolist() == [PADDING_INDEX, PADDING_INDEX, 5, 6]
    assert left_pad(np.array([1, 2, 3]), 2).tolist() == [2, 3]
    counts = item_popularity([np.array([1, 2, 3, 4]), np.array([2, 3])], num_items=4)
    assert counts.tolist() == [0, 1, 2, 1, 0]


def test_trimming_all_padding_columns_leaves_every_real_position_unchanged() -> None:
    from common.recommender.model import ModelConfig, SASRec

    inputs = torch.tensor([[0, 0, 0, 4, 5], [0, 0, 2, 3, 1], [0, 0, 0, 0, 7]])
    targets = inputs.roll(-1, dims=1)
    trimmed_inputs, trimmed_targets = trim_left_padding(inputs, targets)
    assert trimmed_inputs.tolist() == [[0, 4, 5], [2, 3, 1], [0, 0, 7]]
    assert trimmed_targets.shape == (3, 3)
    torch.manual_seed(0)
    model = SASRec(ModelConfig(num_items=8, max_len=5, hidden=8, heads=2, blocks=2, dropout=0.0)).eval()
    torch.testing.assert_close(model(trimmed_inputs), model(inputs)[:, 2:])
    assert trim_left_padding(torch.zeros((2, 4), dtype=torch.long))[0].shape == (2, 1)


def test_length_sorted_pieces_hold_every_row_once_sorted_and_trimmed() -> None:
    lengths = [3, 1, 5, 2, 1, 4, 2]
    inputs = torch.zeros((len(lengths), 6), dtype=torch.long)
    for row, length in enumerate(lengths):
        inputs[row, 6 - length :] = torch.arange(1, length + 1) + 10 * row
    targets = inputs + 100 * (inputs > 0)
    pieces = length_sorted_pieces(inputs, targets, 3)
    assert [len(piece_inputs) for piece_inputs, _ in pieces] == [3, 3, 1]
    assert [piece_inputs.shape[1] for piece_inputs, _ in pieces] == [2, 4, 5]  # each as wide as its longest row
    rows = sorted(tuple(row[row > 0].tolist()) for piece_inputs, _ in pieces for row in piece_inputs)
    assert rows == sorted(tuple(row[row > 0].tolist()) for row in inputs)
    for piece_inputs, piece_targets in pieces:
        torch.testing.assert_close(piece_targets, piece_inputs + 100 * (piece_inputs > 0))
    whole = length_sorted_pieces(inputs, targets, 7)
    assert len(whole) == 1 and whole[0][0].shape == (7, 5)
    equal = torch.ones((10, 4), dtype=torch.long)
    assert [piece.shape for piece, _ in length_sorted_pieces(equal, equal, 3)] == [(10, 4)]  # nothing to save
    [(empty, _)] = length_sorted_pieces(inputs[:0], targets[:0], 3)
    assert len(empty) == 0
