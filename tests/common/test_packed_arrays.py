"""Arrays packed for a deployment's wire come back bit for bit, in order; a layout that does not describe its bytes
is refused before anything is read; the site packs its reply only when the coordinator packed; the coordinator's
Grid packs only on a deployment."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.grid import HttpGrid

from common.federation import RunSettings
from common.packed_arrays import LAYOUT_RECORD, PACKED_KEY, PackedRecordError, pack, packed_arrays_mod, unpack
from common.recommender.model import SASRec
from server.polling_grid import PollingGrid


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("_task_id", "_run_id", "_node_id"):  # Flower stamps messages with the running task's identity
        monkeypatch.setattr(TaskIdentity, name, 1)


def model_content() -> RecordDict:
    torch.manual_seed(0)
    state = SASRec(RunSettings(max_len=6, hidden=8, heads=2, blocks=1).model_config(30)).state_dict()
    return RecordDict({
        "arrays": ArrayRecord(state),
        "extra": ArrayRecord({"counts": Array(np.arange(5, dtype=np.int64)), "mask": Array(np.array([True, False]))}),
        "config": ConfigRecord({"server-round": 3}),
        "metrics": MetricRecord({"weight": 1.0}),
    })


def test_packed_content_comes_back_bit_for_bit_in_order_as_one_array_per_record() -> None:
    content = model_content()
    packed = pack(content)
    assert list(packed["arrays"]) == [PACKED_KEY] and len(packed["arrays"]) == 1
    assert len(content["arrays"]) > 10
    restored = unpack(packed)
    assert list(restored) == list(content)
    for name in ("arrays", "extra"):
        assert list(restored[name]) == list(content[name])
        for key, array in content[name].items():
            original, back = array.numpy(), restored[name][key].numpy()
            assert back.dtype == original.dtype and back.shape == original.shape
            assert back.tobytes() == original.tobytes()
    assert restored["config"]["server-round"] == 3 and restored["metrics"]["weight"] == 1.0
    assert pack(RecordDict({"config": ConfigRecord({"a": 1})})).get(LAYOUT_RECORD) is None


def tampered(change) -> RecordDict:
    packed = pack(RecordDict({"arrays": ArrayRecord({"w": Array(np.ones((2, 3), dtype=np.float32))})}))
    layout = json.loads(packed[LAYOUT_RECORD]["arrays"])
    change(packed, layout)
    packed[LAYOUT_RECORD]["arrays"] = json.dumps(layout) if isinstance(layout, list) else layout
    return packed


@pytest.mark.parametrize(("change", "reason"), [
    (lambda p, layout: layout[0].__setitem__(2, [2, 4]), "describes 32 bytes, 24 came"),
    (lambda p, layout: layout[0].__setitem__(1, "object"), "bad layout entry"),
    (lambda p, layout: layout[0].__setitem__(2, [-2, -3]), "bad layout entry"),
    (lambda p, layout: layout.append(["w", "float32", [0]]), "appears twice"),
    (lambda p, layout: p[LAYOUT_RECORD].__setitem__("ghost", "[]"), "does not hold: \\['ghost'\\]"),
    (lambda p, layout: p.__setitem__("arrays", ArrayRecord({"x": Array(np.ones(24, dtype=np.uint8))})),
     "expected one array 'packed'"),
    (lambda p, layout: p.__setitem__("arrays", ArrayRecord({PACKED_KEY: Array(np.ones(6, dtype=np.float32))})),
     "expected bytes"),
])
def test_a_layout_that_does_not_describe_its_bytes_is_refused_with_the_reason(change, reason: str) -> None:
    with pytest.raises(PackedRecordError, match=reason):
        unpack(tampered(change))


def test_a_layout_that_is_not_json_is_refused() -> None:
    packed = pack(RecordDict({"arrays": ArrayRecord({"w": Array(np.ones(3, dtype=np.float32))})}))
    packed[LAYOUT_RECORD]["arrays"] = "{not json"
    with pytest.raises(PackedRecordError, match="not a JSON list"):
        unpack(packed)


def test_the_site_unpacks_what_came_packed_and_packs_its_reply_only_then() -> None:
    seen: list[RecordDict] = []

    def handler(message: Message, context: Context) -> Message:
        seen.append(message.content)
        return Message(RecordDict({"arrays": message.content["arrays"]}), reply_to=message)

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    content = model_content()
    packed_in = Message(pack(content), dst_node_id=1, message_type="train")
    reply = packed_arrays_mod(packed_in, context, handler)
    assert list(seen[0]["arrays"]) == list(content["arrays"])
    assert list(reply.content["arrays"]) == [PACKED_KEY] and LAYOUT_RECORD in reply.content
    plain_in = Message(model_content(), dst_node_id=1, message_type="train")
    reply = packed_arrays_mod(plain_in, context, handler)
    assert list(reply.content["arrays"]) == list(content["arrays"]) and LAYOUT_RECORD not in reply.content


class FakeHttpGrid(HttpGrid):
    """Flower's deployed Grid without a SuperLink: what is pushed is answered by echoing it back."""

    def __init__(self) -> None:
        self.pushed: list[Message] = []

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        self.pushed = list(messages)
        return [str(index) for index in range(len(self.pushed))]

    def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
        return [Message(RecordDict(dict(m.content)), reply_to=m) for m in self.pushed]


def test_the_coordinator_packs_on_a_deployment_and_hands_its_strategy_plain_replies() -> None:
    deployed = FakeHttpGrid()
    grid = PollingGrid(deployed, poll_seconds=0.01)
    message = Message(model_content(), dst_node_id=7, message_type="train")
    message.metadata.__dict__["_message_id"] = "0"
    grid.push_messages([message])
    assert list(deployed.pushed[0].content["arrays"]) == [PACKED_KEY]
    [reply] = grid.pull_messages(["0"])
    assert list(reply.content["arrays"]) == list(model_content()["arrays"])
    assert not PollingGrid(object(), poll_seconds=0.01).packs  # type: ignore[arg-type]


def test_a_site_reply_whose_layout_does_not_match_becomes_that_sites_error_reply() -> None:
    class TamperingGrid(FakeHttpGrid):
        def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
            [reply] = super().pull_messages(message_ids)
            reply.content[LAYOUT_RECORD]["arrays"] = "[]"
            return [reply]

    grid = PollingGrid(TamperingGrid(), poll_seconds=0.01)
    message = Message(model_content(), dst_node_id=7, message_type="train")
    grid.push_messages([message])
    [reply] = grid.pull_messages(["0"])
    assert reply.has_error() and "the layout describes 0 bytes" in reply.error.reason
