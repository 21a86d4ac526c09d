"""The distributed strategy's step: the secure sum divided by the public batch size, the replies' bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.errors import NonFiniteError
from common.federation import RunSettings
from common.flower.secaggplus_driver import SecureSum
from server.distributed_noise import distributed_strategy, secure_aggregation

SETTINGS = RunSettings(noise="distributed", min_sites=5, secure_aggregation_tolerated=2, central_optimizer="sgd",
                       server_learning_rate=1.0, server_momentum=0.0, batch_size=10)


def _metrics(site: str, declined: bool = False) -> dict[str, bool | bytes | float | int | str]:
    metrics: dict[str, bool | bytes | float | int | str] = {
        "site-id": site, "declined": int(declined), "epsilon": 0.5, "ledger-lines": 3, "ledger-hash": "ab" * 32,
        "noise-multiplier": 1.0,
    }
    if declined:
        metrics["reason"] = "declined: budget"
    return metrics


@pytest.mark.parametrize(("user_update", "expected"), [("gradient", [0.0, -1.0, 4.0]), ("delta", [2.0, 3.0, -2.0])])
def test_the_sum_moves_the_trainable_weights_and_the_replies_are_recorded(user_update: str, expected: list) -> None:
    strategy = distributed_strategy(RunSettings(**{**SETTINGS.__dict__, "user_update": user_update}), ["w"])
    weights = {"w": torch.ones(3), "frozen": torch.zeros(2)}
    total = {"w": np.array([10.0, 20.0, -30.0])}
    metrics = [_metrics("0"), _metrics("1"), _metrics("2", declined=True), _metrics("3"), _metrics("4")]
    updated = strategy.step(1, SecureSum(total, metrics), weights)
    assert updated is not None
    # w - sum / batch-size for gradients; w + sum / batch-size for deltas (FedAvg's step at server rate 1)
    torch.testing.assert_close(updated["w"], torch.tensor(expected))
    assert torch.equal(updated["frozen"], weights["frozen"])
    assert strategy.last_round.trained == ["0", "1", "3", "4"]
    assert strategy.last_round.declined == {"2": "declined: budget"}
    assert strategy.site_epsilon["4"] == 0.5 and strategy.last_round.ledger_heads["0"]["lines"] == 3


def test_a_halted_protocol_changes_nothing_and_says_so() -> None:
    strategy = distributed_strategy(SETTINGS, ["w"])
    assert strategy.step(1, SecureSum(None, [_metrics("0")], ["node 7 failed"]), {"w": torch.ones(3)}) is None
    assert strategy.last_round.trained == [] and len(strategy.last_round.failures) == 2
    assert strategy.last_round.everyone_failed


def test_a_sum_in_which_every_site_declined_is_a_failed_round() -> None:
    """Declined sites are in the sum with pure noise (min-sites is the size of every sum): the round fails only
    when no site trained, and then it applies nothing."""
    strategy = distributed_strategy(SETTINGS, ["w"])
    metrics = [_metrics(str(site), declined=True) for site in range(5)]
    assert strategy.step(1, SecureSum({"w": np.ones(3)}, metrics), {"w": torch.ones(3)}) is None
    assert strategy.last_round.failed == "no site trained; the global model is unchanged"
    assert not strategy.last_round.everyone_failed, "declines are not failures: the run goes on"


def test_a_non_finite_step_stops_the_run() -> None:
    strategy = distributed_strategy(SETTINGS, ["w"])
    metrics = [_metrics(str(site)) for site in range(5)]
    with pytest.raises(NonFiniteError, match=r"round 3: the aggregate .* holds NaN or infinity in 'w'"):
        strategy.step(3, SecureSum({"w": np.array([np.inf, 0.0, 0.0])}, metrics), {"w": torch.ones(3)})


def test_the_protocol_covers_a_share_that_assumes_no_other_site() -> None:
    protocol = secure_aggregation(SETTINGS)
    assert (protocol.sites, protocol.threshold) == (5, 3)
    assert protocol.clipping_range > SETTINGS.batch_size * SETTINGS.max_grad_norm
    with pytest.raises(Exception, match="tolerat"):
        RunSettings(noise="distributed", min_sites=5, secure_aggregation_tolerated=3)
