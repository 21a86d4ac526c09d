"""A site's side of Flower's SecAgg+, in the legacy records it needs: the adapters ``client.secure_aggregation`` calls.

Flower 1.41 and 1.42 run SecAgg+ only on the legacy (NumPyClient) API: ``secaggplus_mod`` reads each stage from
legacy record keys, and the collect stage carries a legacy FitIns and expects a legacy FitRes to mask. These
functions read and write those records, so that the site's logic (what it refuses, what it sums) uses plain values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Context, Message, MessageType
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Scalar, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.compat.common import recorddict_compat as compat

__all__ = [
    "fit_ins", "fit_res_reply", "is_secaggplus_train", "is_secure_round", "protocol_state", "secaggplus_mod",
    "unmask_node_ids",
]

SCALARS = bool | bytes | float | int | str
"""What a legacy FitRes' metrics may hold."""


def is_secaggplus_train(msg: Message) -> bool:
    """Whether ``msg`` is a train message of a SecAgg+ round (any of its stages)."""
    return msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records


def unmask_node_ids(msg: Message) -> tuple[set[int], set[int]] | None:
    """The node ids a SecAgg+ unmask request names (alive, dropped); None for any other message."""
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    if configs is None or configs.get(Key.STAGE) != Stage.UNMASK:
        return None
    alive, dead = configs.get(Key.ACTIVE_NODE_ID_LIST, []), configs.get(Key.DEAD_NODE_ID_LIST, [])
    return {int(node) for node in alive}, {int(node) for node in dead}  # type: ignore[union-attr]


def is_secure_round(msg: Message) -> bool:
    """Whether ``msg`` is the collect stage of a SecAgg+ round (legacy FitIns), not a Message-API train request."""
    return RECORD_KEY_CONFIGS in msg.content.config_records


def fit_ins(msg: Message) -> tuple[dict[str, Scalar], list[np.ndarray]]:
    """The collect stage's legacy FitIns: its config and its arrays, in their order."""
    legacy = compat.recorddict_to_fitins(msg.content, keep_input=True)
    return dict(legacy.config), parameters_to_ndarrays(legacy.parameters)


def protocol_state(context: Context) -> dict[str, Any]:
    """The SecAgg+ parameters ``secaggplus_mod`` kept from the coordinator's setup message."""
    return dict(context.state.config_records[RECORD_KEY_STATE])


def fit_res_reply(msg: Message, arrays: list[np.ndarray], metrics: Mapping[str, Any]) -> Message:
    """The collect stage's reply: a legacy FitRes of weight 1 that ``secaggplus_mod`` masks; the metrics a FitRes
    can hold travel with it (the others are dropped)."""
    scalars: dict[str, Scalar] = {key: value for key, value in metrics.items() if isinstance(value, SCALARS)}
    fit_res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), 1, scalars)
    return Message(compat.fitres_to_recorddict(fit_res, keep_input=False), reply_to=msg)
