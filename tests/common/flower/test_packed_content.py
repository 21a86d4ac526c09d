"""Content packed for a deployment's wire comes back bit for bit, in order, as two objects on Flower's wire; bytes
that do not parse or arrays that do not match what they declare are refused (never unpickled); the site packs its
reply only when the coordinator packed; the coordinator's Grid packs only on a deployment."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.grid import HttpGrid

from common.federation import RunSettings
from common.flower.packed_content import PACKED_KEY, PACKED_RECORD, PackedContentError, pack, packed_content_mod, unpack
from common.flower.polling_grid import PollingGrid
from common.recommender.model import SASRec


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


def test_packed_content_comes_back_bit_for_bit_in_order_as_one_config_record() -> None:
    content = model_content()
    packed = pack(content)
    assert list(packed) == [PACKED_RECORD] and list(packed[PACKED_RECORD]) == [PACKED_KEY]
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


def test_a_packed_message_is_two_objects_on_flowers_wire_whatever_the_model() -> None:
    """Flower sends a message as its object tree, one request per object a hop: what packing is for."""
    message = Message(model_content(), dst_node_id=1, message_type="train")
    packed = Message(pack(model_content()), dst_node_id=1, message_type="train")
    assert len(get_all_nested_objects(message)) > 30
    assert len(get_all_nested_objects(packed)) == 3  # the message, its content, the one config record


def packed_with(array: Array) -> RecordDict:
    return pack(RecordDict({"arrays": ArrayRecord({"w": array})}))


def npy(value: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, value, allow_pickle=False)
    return buffer.getvalue()


@pytest.mark.parametrize(("content", "reason"), [
    (lambda: packed_with(Array(dtype="float32", shape=(2, 4), stype="numpy.ndarray",
                               data=npy(np.ones((2, 3), dtype=np.float32)))),
     "declares float32 \\(2, 4\\), holds float32 \\(2, 3\\)"),
    (lambda: packed_with(Array(dtype="float64", shape=(2, 3), stype="numpy.ndarray",
                               data=npy(np.ones((2, 3), dtype=np.float32)))),
     "declares float64"),
    (lambda: packed_with(Array(dtype="float32", shape=(3,), stype="numpy.ndarray", data=b"not numpy")),
     "'arrays/w' does not decode"),
    (lambda: packed_with(Array(dtype="object", shape=(2,), stype="numpy.ndarray",
                               data=pickled_object_array())),
     "'arrays/w' does not decode"),
    (lambda: RecordDict({PACKED_RECORD: ConfigRecord({PACKED_KEY: b"\xff\xff\xff garbage"})}),
     "its bytes are not a RecordDict"),
    (lambda: RecordDict({PACKED_RECORD: ConfigRecord({PACKED_KEY: "text"})}), "holds str, not bytes"),
    (lambda: RecordDict({PACKED_RECORD: ConfigRecord({PACKED_KEY: b"", "more": 1})}), "one value 'recorddict'"),
    (lambda: RecordDict({**pack(model_content()), "extra": ConfigRecord({"a": 1})}), "expected the one record"),
])
def test_content_that_does_not_parse_or_match_its_arrays_is_refused_with_the_reason(content, reason: str) -> None:
    with pytest.raises(PackedContentError, match=reason):
        unpack(content())


def pickled_object_array() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    return buffer.getvalue()


def test_the_site_unpacks_what_came_packed_and_packs_its_reply_only_then() -> None:
    seen: list[RecordDict] = []

    def handler(message: Message, context: Context) -> Message:
        seen.append(message.content)
        return Message(RecordDict({"arrays": message.content["arrays"]}), reply_to=message)

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    content = model_content()
    packed_in = Message(pack(content), dst_node_id=1, message_type="train")
    reply = packed_content_mod(packed_in, context, handler)
    assert list(seen[0]["arrays"]) == list(content["arrays"])
    assert list(reply.content) == [PACKED_RECORD] and list(unpack(reply.content)["arrays"]) == list(content["arrays"])
    plain_in = Message(model_content(), dst_node_id=1, message_type="train")
    reply = packed_content_mod(plain_in, context, handler)
    assert list(reply.content["arrays"]) == list(content["arrays"]) and PACKED_RECORD not in reply.content


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
    assert list(deployed.pushed[0].content) == [PACKED_RECORD]
    [reply] = grid.pull_messages(["0"])
    assert list(reply.content["arrays"]) == list(model_content()["arrays"])
    assert not PollingGrid(object(), poll_seconds=0.01).packs  # type: ignore[arg-type]


def test_a_site_reply_that_does_not_parse_becomes_that_sites_error_reply() -> None:
    class TamperingGrid(FakeHttpGrid):
        def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
            [reply] = super().pull_messages(message_ids)
            reply.content[PACKED_RECORD][PACKED_KEY] = b"\\xff\\xff"
            return [reply]

    grid = PollingGrid(TamperingGrid(), poll_seconds=0.01)
    message = Message(model_content(), dst_node_id=7, message_type="train")
    grid.push_messages([message])
    [reply] = grid.pull_messages(["0"])
    assert reply.has_error() and "its bytes are not a RecordDict" in reply.error.reason
