"""The server strategy: failed sites' reasons, ledger heads per round, and the private reply handling in front of every
server optimizer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from common.errors import ConfigError, NonFiniteError
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


@pytest.fixture
def flower_task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("_task_id", "_run_id", "_node_id"):  # Flower stamps messages with the running task's identity
        monkeypatch.setattr(TaskIdentity, name, 1)


def _from_node(node: int, answer: RecordDict | Error) -> Message:
    """A reply as the strategy receives it: sent by ``node`` in answer to its train message."""
    return Message(answer, reply_to=Message(RecordDict(), dst_node_id=node, message_type="train"))


def _trained(site: str, weights: torch.Tensor, node: int) -> Message:
    content = _reply(site, 1, "ab" * 32).content
    content["arrays"] = ArrayRecord({"w": weights})
    return _from_node(node, content)


@dataclass
class _Nodes:
    """The part of Flower's Grid that sampling sites for a round reads."""

    nodes: list[int]

    def get_node_ids(self) -> list[int]:
        return self.nodes


def _error_reply(node: int, reason: str) -> Message:
    """A ClientApp's failure as Flower delivers it: an error, no content, so no site id."""
    return _from_node(node, Error(code=0, reason=reason))


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedadam"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_update_is_its_sites_failure_and_the_finite_ones_are_averaged(
    flower_task_identity: None, name: str, bad: float
) -> None:
    strategy = private_strategy(name, fraction_sites=1.0, min_sites=2)
    strategy.configure_train(1, ArrayRecord({"w": torch.zeros(2)}), ConfigRecord(), cast(Grid, _Nodes([11, 12, 13])))
    replies = [
        _trained("north", torch.tensor([1.0, 2.0]), 11),
        _trained("south", torch.tensor([3.0, 4.0]), 12),
        _trained("east", torch.tensor([bad, 0.0]), 13),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert strategy.last_round.trained == ["north", "south"] and strategy.last_round.failed == ""
    assert strategy.last_round.failures == [
        "site east: its update holds NaN or infinity in 'w'; left out of the average"
    ]
    assert arrays is not None and bool(torch.isfinite(arrays.to_torch_state_dict()["w"]).all())
    if name == "fedavg":
        torch.testing.assert_close(arrays.to_torch_state_dict()["w"], torch.tensor([2.0, 3.0]))


@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_a_non_finite_aggregate_of_finite_updates_stops_the_run(flower_task_identity: None) -> None:
    """Finite updates, but the server's step overflows (momentum at a huge server learning rate): an error of the
    round, raised before Flower hands the weights on to be validated and checkpointed."""
    strategy = private_strategy("fedavgm", fraction_sites=1.0, min_sites=1, round_offset=4, server_learning_rate=1e30)
    strategy.configure_train(1, ArrayRecord({"w": torch.zeros(2)}), ConfigRecord(), cast(Grid, _Nodes([1, 2])))
    huge = torch.full((2,), 3e38)
    with pytest.raises(NonFiniteError, match=r"round 5: the aggregate .* site\(s\) a, b holds NaN or infinity in 'w'"):
        strategy.aggregate_train(1, [_trained("a", huge, 1), _trained("b", huge, 2)])


def test_a_round_with_fewer_trained_sites_than_min_sites_fails_and_changes_nothing(flower_task_identity: None) -> None:
    strategy = private_strategy("fedavg", fraction_sites=1.0, min_sites=2)
    replies = [_trained("north", torch.ones(2), 1), _reply("south", 1, "", declined=True)]
    assert strategy.aggregate_train(1, replies) == (None, None)
    assert strategy.last_round.failed == (
        "only 1 site(s) trained (north), fewer than min-sites = 2; the global model is unchanged"
    )
    assert strategy.aggregate_train(2, [_reply("north", 2, "", declined=True)]) == (None, None)
    assert strategy.last_round.failed == "no site trained; the global model is unchanged"
    arrays, _ = strategy.aggregate_train(3, [_trained("north", torch.ones(2), 1), _trained("south", torch.ones(2), 2)])
    assert arrays is not None and strategy.last_round.failed == ""


def test_a_failed_site_is_named_by_its_site_id_once_known_else_by_its_node_id(flower_task_identity: None) -> None:
    strategy = private_strategy("fedavg", fraction_sites=1.0, min_sites=1)
    strategy.aggregate_train(1, [_trained("north", torch.ones(2), 21), _error_reply(22, "ValueError: boom")])
    assert strategy.last_round.failures == ["node 22: ValueError: boom"], "node 22 never said which site it is"
    strategy.aggregate_train(2, [_trained("south", torch.ones(2), 22), _error_reply(21, "ValueError: gone")])
    assert strategy.last_round.failures == ["site north: ValueError: gone"]
