"""The server strategy: failed sites' reasons, ledger heads per round, and the private reply handling in front of every
server optimizer."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

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
        "ray::ClientAppActor.run()\\n  File x\\n"
        "common.errors.DataError: /a/site-1.jsonl, line 1: not a JSON ledger line\\n"
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


def _reply(site: str, lines: int, head_hash: str, declined: bool = False) -> Message:
    """A site's reply as client.app builds it."""
    metrics = {"weight": 1.0, "dp": 1, "declined": int(declined), "epsilon": 0.5, "ledger-lines": lines}
    site_fields = ConfigRecord({"site-id": site, "ledger-hash": head_hash})
    content = RecordDict({"metrics": MetricRecord(metrics), "site": site_fields})
    if declined:
        content["site"]["reason"] = "declined: over budget"
    else:
        content["arrays"] = ArrayRecord({"w": torch.ones(2)})
    return Message(content=content, dst_node_id=1, message_type="train")


def test_the_strategy_keeps_each_replying_sites_ledger_head_per_round(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("_task_id", "_run_id", "_node_id"):  # Flower stamps messages with the running task's identity
        monkeypatch.setattr(TaskIdentity, name, 1)
    strategy = private_strategy("fedavg", fraction_sites=1.0, min_sites=1)
    arrays, _ = strategy.aggregate_train(
        1, [_reply("north", 3, "ab" * 32), _reply("south", 1, "cd" * 32), _reply("east", 2, "", declined=True)]
    )
    assert arrays is not None and strategy.last_round.trained == ["north", "south"]
    assert strategy.last_round.ledger_heads == {
        "north": {"lines": 3, "hash": "ab" * 32},
        "south": {"lines": 1, "hash": "cd" * 32},
        "east": {"lines": 2, "hash": None},  # withheld (a line without a nonce): recorded as unknown, not as ""
    }
    strategy.aggregate_train(2, [_reply("north", 4, "ef" * 32)])
    assert strategy.last_round.ledger_heads == {"north": {"lines": 4, "hash": "ef" * 32}}, "heads are per round"
