"""noise = central at the server: one noise of std sigma*C over the sum, the largest sigma required, refused replies."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from common.federation import RunSettings
from server.central_noise import CentralNoise, ServerOptimizer, central_noise_multiplier, central_strategy
from server.strategy import PrivateAggregation

COORDINATES = 40_000


@pytest.fixture(autouse=True)
def flower_task_identity() -> None:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


def _reply(site: str, sums: dict[str, torch.Tensor], noise_multiplier: float | None = 1.0) -> Message:
    metrics = MetricRecord({"weight": 1.0, "dp": 1, "declined": 0, "epsilon": 0.5, "ledger-lines": 1})
    if noise_multiplier is not None:
        metrics["noise-multiplier"] = noise_multiplier
    content = RecordDict({"metrics": metrics, "site": ConfigRecord({"site-id": site, "ledger-hash": "ab" * 32}),
                          "arrays": ArrayRecord(sums)})
    return Message(content=content, dst_node_id=1, message_type="train")


def _strategy(floor: float, clip: float, batch: int, optimizer: str = "sgd") -> CentralNoise:
    strategy = CentralNoise(1.0, 1, noise_multiplier=floor, max_grad_norm=clip, batch_size=batch,
                            optimizer=ServerOptimizer(optimizer, 1.0, 0.0))
    strategy.global_weights = {"w": torch.zeros(COORDINATES), "frozen": torch.ones(3)}
    return strategy


def _updated(strategy: CentralNoise, replies: list[Message]) -> dict[str, torch.Tensor]:
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    return arrays.to_torch_state_dict()


def test_the_server_adds_one_noise_of_std_sigma_c_with_the_largest_sigma_required() -> None:
    """Two sites each sum 1 per coordinate; SGD at rate 1 leaves -(2 + noise) / B. Tolerances that a doubled noise,
    a noise per site, a missing division or the smaller sigma would all fail."""
    sigma, clip, batch = 1.5, 2.0, 4
    strategy = _strategy(floor=0.3, clip=clip, batch=batch)
    ones = {"w": torch.ones(COORDINATES)}
    update = -_updated(strategy, [_reply("a", ones, 0.8), _reply("b", ones, sigma)])["w"] * batch - 2.0
    assert strategy.last_noise_multiplier == sigma
    assert abs(float(update.mean())) < 6.5 * sigma * clip / math.sqrt(COORDINATES)
    assert float(update.std()) == pytest.approx(sigma * clip, rel=0.02)
    again = -_updated(strategy, [_reply("a", ones, 0.8), _reply("b", ones, sigma)])["w"] * batch - 2.0
    assert abs(float(torch.corrcoef(torch.stack([update, again]))[0, 1])) < 0.05, "the noise is not fresh"


def test_the_server_never_adds_less_noise_than_its_own_settings_require() -> None:
    strategy = _strategy(floor=2.5, clip=1.0, batch=1)
    update = -_updated(strategy, [_reply("a", {"w": torch.zeros(COORDINATES)}, 0.1)])["w"]
    assert strategy.last_noise_multiplier == 2.5 and float(update.std()) == pytest.approx(2.5, rel=0.02)
    settings = RunSettings(noise="central", epsilon=4.0, sample_rate=0.25, rounds=50)
    assert central_strategy(settings).noise_multiplier == central_noise_multiplier(settings) > 0


def test_non_finite_mis_shaped_or_unstated_replies_are_refused_and_the_round_goes_on() -> None:
    strategy = _strategy(floor=1e-6, clip=1.0, batch=1)
    zeros = torch.zeros(COORDINATES)
    replies = [
        _reply("good", {"w": zeros}),
        _reply("nan", {"w": torch.full((COORDINATES,), float("nan"))}),
        _reply("shape", {"w": torch.zeros(COORDINATES + 1)}),
        _reply("name", {"v": zeros}),
        _reply("silent", {"w": zeros}, noise_multiplier=None),
        _reply("zero", {"w": zeros}, noise_multiplier=0.0),
    ]
    updated = _updated(strategy, replies)
    assert strategy.last_round.trained == ["good"]
    reasons = "\n".join(strategy.last_round.failures)
    for expected in ("site nan: 'w' holds non-finite values", "site shape: 'w' has shape (40001,)",
                     "site name: the clipped sum names 'v'", "site silent: the reply states no 'noise-multiplier'",
                     "site zero: 'noise-multiplier' = 0.0 is not a positive finite number"):
        assert expected in reasons
    assert torch.equal(updated["frozen"], torch.ones(3)), "a parameter no site sent stays as it was"


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_each_server_optimizer_keeps_the_private_reply_handling_and_moves_against_the_gradient(optimizer: str) -> None:
    strategy = central_strategy(RunSettings(noise="central", central_optimizer=optimizer, epsilon=1e6, rounds=1,
                                            max_grad_norm=1e-6, server_learning_rate=0.1))
    assert isinstance(strategy, PrivateAggregation) and type(strategy).__mro__[1] is PrivateAggregation
    strategy.global_weights = {"w": torch.zeros(4)}
    gradient = torch.tensor([1.0, -2.0, 3.0, -4.0])
    updated = _updated(strategy, [_reply("a", {"w": gradient * strategy.batch_size}, 1.0)])["w"]
    assert torch.equal(torch.sign(updated), -torch.sign(gradient))


@pytest.mark.parametrize(("user_update", "direction"), [("gradient", -1.0), ("delta", 1.0)])
def test_the_server_steps_against_the_mean_gradient_or_along_the_mean_delta(user_update: str, direction: float) -> None:
    """SGD at rate 1 without momentum: -(mean gradient), or +(mean delta), FedAvg's own step (noise ~1e-9 here)."""
    strategy = CentralNoise(1.0, 1, noise_multiplier=1e-3, max_grad_norm=1e-6, batch_size=4,
                            optimizer=ServerOptimizer("sgd", 1.0, 0.0), user_update=user_update)
    strategy.global_weights = {"w": torch.zeros(4)}
    summed = torch.tensor([4.0, -8.0, 12.0, -16.0])
    updated = _updated(strategy, [_reply("a", {"w": summed})])["w"]
    torch.testing.assert_close(updated, direction * summed / 4, atol=1e-6, rtol=0)
    settings = RunSettings(noise="central", user_update="delta")
    assert central_strategy(settings).user_update == "delta"


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.mark.parametrize("device", DEVICES)
def test_the_noise_and_the_step_run_on_the_servers_device_and_the_weights_come_back_to_the_cpu(device: str) -> None:
    strategy = CentralNoise(1.0, 1, noise_multiplier=1.0, max_grad_norm=1e-6, batch_size=2,
                            optimizer=ServerOptimizer("sgd", 1.0, 0.0), device=torch.device(device))
    strategy.global_weights = {"w": torch.zeros(4), "frozen": torch.ones(3)}
    gradient = torch.tensor([1.0, -2.0, 3.0, -4.0])
    arrays, _ = strategy.aggregate_train(1, [_reply("a", {"w": gradient * 2}, 1.0)])
    assert arrays is not None
    assert strategy.optimizer.first["w"].device.type == device, "the optimizer's state lives on the device"
    updated = arrays.to_torch_state_dict()
    assert torch.allclose(updated["w"], -gradient, atol=1e-4) and torch.equal(updated["frozen"], torch.ones(3))
