"""What the coordinator reads from a site on any failure: a fixed code and a public reason, never an exception's text.

Every reply here is taken as the coordinator gets it: through the whole ClientApp (its mods included), and, when the
ClientApp raises, as the error reply Flower's runtime makes of the exception.
"""

from __future__ import annotations

import logging
import re
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.supercore.task_identity import TaskIdentity

import client.app
from client.app import app
from client.public_errors import REFUSED, SITE_FAILED, SITE_FAILED_REASON
from common.data.catalog import Catalog
from common.federation import RunSettings
from common.recommender.model import SASRec
from tests.client.test_hostile_coordinator import _node, _public_reply, _settings, _site


@pytest.fixture(autouse=True)
def flower_task_identity() -> None:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


def on_the_wire(message: Message, context: Context) -> Message:
    """The reply the coordinator reads: the ClientApp's, or the error reply Flower's runtime makes when it raises
    (``flwr/supernode/runtime/run_clientapp.py``, 1.41: the exception's type and text as the reason)."""
    try:
        return app(message=message, context=context)
    except Exception as error:  # noqa: BLE001 - as Flower's runtime
        reason = str(type(error)) + ":<'" + str(error) + "'>"
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)


def wire_text(reply: Message) -> str:
    """Every text and number the coordinator can read in ``reply`` (the arrays' values aside)."""
    if reply.has_error():
        return f"{reply.error.code} {reply.error.reason}"
    parts = [f"{name}={value}" for record in reply.content.config_records.values() for name, value in record.items()]
    parts += [f"{name}={value}" for record in reply.content.metric_records.values() for name, value in record.items()]
    return " ".join(parts)


def request(settings: RunSettings, node: dict, catalog: Catalog, message_type: str = "train",
            **config: object) -> tuple[Message, Context]:
    model = SASRec(settings.model_config(catalog.num_items))
    records = ConfigRecord({"server-round": 1, "run-id": "r1", "catalog-sha256": catalog.fingerprint(),
                            "flwr-version": version("flwr"), **config})  # type: ignore[dict-item]
    message = Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": records}), dst_node_id=1,
                      message_type=message_type)
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=settings.to_run_config())
    return message, context


def _private_values(tmp_path: Path) -> list[str]:
    """What must never reach the coordinator: paths, the file's name, a user id."""
    return [str(tmp_path), "site.txt", "u0", "u7"]


@pytest.mark.parametrize(
    ("users", "content"),
    [(0, ""), (0, "\n\n  \n"), (0, "user,item\n"), (0, "u0 x1 x2 x3 x4 x5\nu1 x2 x3 x4 x5 x6\n"), (1, None)],
    ids=["empty", "blank-lines", "header-only", "items-outside-the-catalogue", "one-user"],
)
def test_a_site_of_no_or_one_user_answers_like_any_other(tmp_path: Path, users: int, content: str | None) -> None:
    """A deployed site with an empty file answered "the file is empty", one with one user "holds only one user (u0)",
    with the file's path: the count, a user id and a path on the wire. Now it trains like any site (pure noise for
    no users): its reply is the reply of a site of 40 users, the noisy weights and the ledger head's hash aside."""
    settings = _settings()
    replies = []
    for size in (users, 40):
        data, catalog = _site(tmp_path / str(size), size)
        if size == users and content is not None:
            data = data.rename(data.with_suffix(".csv")) if content.startswith("user,") else data
            data.write_text(content)
        reply = on_the_wire(*request(settings, _node(tmp_path / str(size), data), catalog))
        text = wire_text(reply)
        assert not reply.has_error(), text
        assert not any(value in text for value in _private_values(tmp_path)), text
        replies.append(_public_reply(reply))
    assert replies[0] == replies[1]
    assert replies[0]["metrics"]["declined"] == 0


def test_an_exception_in_training_reaches_the_coordinator_as_the_fixed_reason_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    data, catalog = _site(tmp_path, 40)
    detail = f"cannot train {data}: user u7 of 40 users"

    def failing(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError(detail)

    monkeypatch.setattr(client.app, "train_site_round", failing)
    with caplog.at_level(logging.ERROR, logger="fedtail.client"):
        reply = on_the_wire(*request(_settings(), _node(tmp_path, data), catalog))
    assert reply.has_error() and (reply.error.code, reply.error.reason) == (SITE_FAILED, SITE_FAILED_REASON)
    assert not re.search(r"\d", reply.error.reason), "no count, no id"
    assert detail in caplog.text and "Traceback" in caplog.text, "the site's own log has the whole story"


def test_a_failure_before_training_says_nothing_of_the_data_either(tmp_path: Path) -> None:
    """A file the site cannot read used to reach the coordinator with its path (here: a line without items, so no
    format fits)."""
    data, catalog = _site(tmp_path, 40)
    data.write_text(data.read_text() + "u99\n")
    reply = on_the_wire(*request(_settings(), _node(tmp_path, data), catalog))
    assert reply.has_error() and (reply.error.code, reply.error.reason) == (SITE_FAILED, SITE_FAILED_REASON)


def test_errors_about_the_coordinators_own_input_stay_readable(tmp_path: Path) -> None:
    """A Flower version mismatch or a bad run config is the coordinator's to fix: its reason is kept, and holds
    public values only."""
    data, catalog = _site(tmp_path, 40)
    settings = _settings()
    mismatch = on_the_wire(*request(settings, _node(tmp_path, data), catalog, **{"flwr-version": "1.0.0"}))
    assert mismatch.has_error() and mismatch.error.code == REFUSED
    assert "Flower version mismatch: the coordinator runs flwr 1.0.0" in mismatch.error.reason
    message, context = request(settings, _node(tmp_path, data), catalog)
    context.run_config["learning-rate"] = "fast"
    bad_config = on_the_wire(message, context)
    assert bad_config.has_error() and bad_config.error.code == REFUSED
    assert "run config learning-rate='fast': expected float" in bad_config.error.reason
    for reply in (mismatch, bad_config):
        assert not any(value in reply.error.reason for value in _private_values(tmp_path)), reply.error.reason
    assert not (tmp_path / "ledger").exists()


def test_a_popularity_query_from_a_site_of_one_user_answers_like_any_other(tmp_path: Path) -> None:
    settings = _settings(popularity_share=0.2)
    replies = []
    for size in (1, 40):
        data, catalog = _site(tmp_path / str(size), size)
        reply = on_the_wire(*request(settings, _node(tmp_path / str(size), data), catalog, message_type="query"))
        assert not reply.has_error(), wire_text(reply)
        replies.append(_public_reply(reply))
    assert replies[0] == replies[1] and replies[0]["metrics"]["declined"] == 0
    assert torch.Size([catalog.num_items + 1]) == replies[0]["shapes"]["popularity"]


def test_a_malformed_secure_aggregation_request_is_refused_with_its_public_reason() -> None:
    """The coordinator's own request (here an unmask naming site 3 both alive and dropped) is its to fix."""
    configs = ConfigRecord({Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: [1, 2, 3], Key.DEAD_NODE_ID_LIST: [3]})
    message = Message(RecordDict({RECORD_KEY_CONFIGS: configs}), dst_node_id=1, message_type="train")
    reply = on_the_wire(message, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}))
    assert reply.has_error() and reply.error.code == REFUSED
    assert reply.error.reason == "secure aggregation: the coordinator names sites [3] both alive and dropped"
