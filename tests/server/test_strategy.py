"""The server strategy: failed sites' reasons, and the private reply handling in front of every server optimizer."""

from __future__ import annotations

import pytest

from common.errors import ConfigError
from server.strategy import (
    PrivateAggregation,
    PrivateFedAdam,
    PrivateFedAvg,
    PrivateFedAvgM,
    private_strategy,
    root_cause,
)


def test_root_cause_is_the_first_real_exception_line() -> None:
    reason = (
        "ray::ClientAppActor.run()\\n  File x\\ncommon.errors.DataError: /a/site-1.jsonl, line 1: not a JSON ledger line\\n"
        "\\nflwr.clientapp.client_app.ClientAppException: wrapped"
    ).replace("\\n", "\n")
    assert root_cause(reason) == "common.errors.DataError: /a/site-1.jsonl, line 1: not a JSON ledger line"
    assert root_cause("timeout") == "timeout"


@pytest.mark.parametrize(
    ("name", "kind", "rate"),
    [("fedavg", PrivateFedAvg, None), ("fedavgm", PrivateFedAvgM, 1.0), ("fedadam", PrivateFedAdam, 0.01)],
)
def test_each_server_optimizer_keeps_the_private_reply_handling(name: str, kind: type, rate: float | None) -> None:
    strategy = private_strategy(name, fraction_sites=0.5, min_sites=2, round_offset=3)
    assert isinstance(strategy, kind) and isinstance(strategy, PrivateAggregation)
    assert type(strategy).__mro__[1] is PrivateAggregation  # the reply handling runs before Flower's aggregation
    assert strategy.fraction_evaluate == 0.0 and strategy.weighted_by_key == "weight" and strategy.round_offset == 3
    assert getattr(strategy, "server_learning_rate", getattr(strategy, "eta", None)) == rate


def test_fedavg_refuses_a_server_learning_rate() -> None:
    with pytest.raises(ConfigError, match="fedavg has no server learning rate"):
        private_strategy("fedavg", 1.0, 1, server_learning_rate=0.5)
