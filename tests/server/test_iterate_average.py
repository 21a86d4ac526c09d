"""The average of the global model over rounds: its warm-up, what a checkpoint keeps, and a real run releasing it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.errors import ConfigError
from common.federation import RunSettings
from common.recommender.artifacts import load_model
from common.utils.files import load_torch
from server.iterate_average import IterateAverage
from simulations.simulate import Resources, simulate
from tests.simulations.test_simulate import SMALL


def test_the_first_round_is_taken_whole_then_the_decay_warms_up_to_its_cap() -> None:
    average = IterateAverage(decay=0.3)
    first = average.update({"w": torch.tensor([4.0]), "count": torch.tensor([1])})
    assert torch.equal(first["w"], torch.tensor([4.0]))
    second = average.update({"w": torch.tensor([0.0]), "count": torch.tensor([2])})
    kept = min(0.3, 3 / 12)  # (1 + t) / (10 + t) at t = 2 is 0.25, below the cap
    torch.testing.assert_close(second["w"], torch.tensor([4.0 * kept]))
    assert torch.equal(second["count"], torch.tensor([2])), "integer tensors are not averaged"
    third = average.update({"w": torch.tensor([0.0]), "count": torch.tensor([3])})
    torch.testing.assert_close(third["w"], torch.tensor([4.0 * kept * min(0.3, 4 / 13)]))
    third["w"] += 100.0
    assert float(average.weights["w"]) < 1.0, "the caller gets a copy"


def test_the_average_survives_a_checkpoint() -> None:
    average = IterateAverage(decay=0.9)
    for value in (1.0, 2.0, 3.0):
        average.update({"w": torch.tensor([value])})
    restored = IterateAverage.from_state(average.state())
    assert (restored.decay, restored.rounds) == (0.9, 3)
    torch.testing.assert_close(restored.update({"w": torch.tensor([0.0])}), average.update({"w": torch.tensor([0.0])}))


def test_a_decay_outside_zero_to_one_is_refused() -> None:
    with pytest.raises(ConfigError, match="iterate-average-decay=1.0"):
        RunSettings(iterate_average_decay=1.0)


def test_a_run_releases_the_average_and_its_checkpoint_keeps_the_last_iterate_for_training(tmp_path: Path) -> None:
    out = tmp_path / "run"
    settings = RunSettings(**{**SMALL, "rounds": 3}, iterate_average_decay=0.9, model_selection="last",
                           out_dir=str(out))
    simulate(settings, Resources(sites=2))
    checkpoint = load_torch(out / "checkpoint.pt", "checkpoint")
    assert checkpoint["iterate_average"]["rounds"] == 3
    released, _ = load_model(out)
    for name, tensor in released.state_dict().items():
        torch.testing.assert_close(tensor, checkpoint["iterate_average"]["weights"][name], msg=name)
    moved = [name for name, tensor in checkpoint["state_dict"].items()
             if not torch.equal(tensor, checkpoint["iterate_average"]["weights"][name])]
    assert moved, "the checkpoint holds the last iterate, which the average differs from"
