"""The site's SecAgg+ adapters read the legacy records of Flower's secaggplus_mod and write the reply it masks."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.task_identity import TaskIdentity

from common.flower.secaggplus_site import (
    fit_ins,
    fit_res_reply,
    is_secaggplus_train,
    is_secure_round,
    protocol_state,
    unmask_node_ids,
)


@pytest.fixture(autouse=True)
def flower_task_identity() -> None:
    """Flower 1.42 builds a Message only inside a task (a ClientApp's or a ServerApp's): pretend to be one."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


def stage(configs: dict[str, object], message_type: str = "train") -> Message:
    return Message(content=RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(configs)}),  # type: ignore[arg-type]
                   dst_node_id=1, message_type=message_type)


def test_an_unmask_request_gives_the_nodes_it_names_alive_and_dropped() -> None:
    msg = stage({Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: [1, 2, 3], Key.DEAD_NODE_ID_LIST: [3]})
    assert is_secaggplus_train(msg) and is_secure_round(msg)
    assert unmask_node_ids(msg) == ({1, 2, 3}, {3})
    assert unmask_node_ids(stage({Key.STAGE: Stage.COLLECT_MASKED_VECTORS})) is None


def test_a_plain_or_evaluate_message_is_not_a_secaggplus_train_stage() -> None:
    plain = Message(content=RecordDict({"config": ConfigRecord({"a": 1})}), dst_node_id=1, message_type="train")
    assert not is_secaggplus_train(plain) and not is_secure_round(plain) and unmask_node_ids(plain) is None
    assert not is_secaggplus_train(stage({Key.STAGE: Stage.UNMASK}, message_type="evaluate"))


def test_the_collect_stage_reads_as_config_and_arrays_and_the_reply_is_a_fitres_of_weight_one() -> None:
    arrays = [np.arange(6, dtype=np.float64).reshape(2, 3), np.ones(4)]
    content = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters(arrays), {"state-names": "a,b"}), True)
    msg = Message(content=content, dst_node_id=1, message_type="train")
    config, received = fit_ins(msg)
    assert config == {"state-names": "a,b"}
    assert all(np.array_equal(a, b) for a, b in zip(received, arrays, strict=True))

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    context.state.config_records[RECORD_KEY_STATE] = ConfigRecord({"threshold": 3})
    assert protocol_state(context) == {"threshold": 3}

    reply = fit_res_reply(Message(content=content, dst_node_id=1, message_type="train"), received,
                          {"declined": 0, "site-id": "north", "not-a-scalar": [1.0, 2.0]})
    fit_res = compat.recorddict_to_fitres(reply.content, keep_input=False)
    assert fit_res.num_examples == 1 and fit_res.metrics == {"declined": 0, "site-id": "north"}
    assert all(np.array_equal(a, b) for a, b in zip(parameters_to_ndarrays(fit_res.parameters), arrays, strict=True))
