"""The ServerApp's Grid wrapper: Flower's send_and_receive semantics, pulling replies at a short interval."""

from __future__ import annotations

import time
from collections.abc import Iterable

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from common.errors import ConfigError
from common.flower.polling_grid import REPLY_POLL_ENV, REPLY_POLL_SECONDS, PollingGrid


class SlowSites(Grid):
    """Replies become available ``delay_s`` after the push; only push_messages and pull_messages are used."""

    def __init__(self, delay_s: float, answering: int | None = None) -> None:
        self.delay_s, self.answering = delay_s, answering
        self.pushed: list[Message] = []
        self.pushed_at = 0.0
        self.pulls = 0

    def set_run(self, run: object) -> None:
        raise NotImplementedError

    @property
    def run(self) -> object:
        raise NotImplementedError

    def create_message(self, *args: object, **kwargs: object) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return [1, 2]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        raise AssertionError("the wrapper must not wait in Flower's 3 s loop")

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self.pushed = list(messages)
        self.pushed_at = time.monotonic()
        return [message.metadata.message_id for message in self.pushed]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulls += 1
        if time.monotonic() - self.pushed_at < self.delay_s:
            return []
        wanted = set(message_ids)
        ready = [m for m in self.pushed[: self.answering] if m.metadata.message_id in wanted]
        return [Message(RecordDict({"reply": ConfigRecord({"ok": 1})}), reply_to=m) for m in ready]


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("_task_id", "_run_id", "_node_id"):  # Flower stamps messages with the running task's identity
        monkeypatch.setattr(TaskIdentity, name, 1)


def _messages() -> list[Message]:
    messages = []
    for node in (1, 2):
        content = RecordDict({"config": ConfigRecord({"server-round": 7, "node": node})})
        message = Message(content, dst_node_id=node, message_type="train")
        message.metadata.__dict__["_message_id"] = message.object_id
        messages.append(message)
    return messages


def test_replies_are_collected_within_a_poll_interval_of_arriving(capsys: pytest.CaptureFixture[str]) -> None:
    sites = SlowSites(delay_s=0.3)
    started = time.monotonic()
    replies = list(PollingGrid(sites, poll_seconds=0.05).send_and_receive(_messages(), timeout=10))
    assert len(replies) == 2 and time.monotonic() - started < 0.3 + 2.0  # Flower's Grid: 3 s or more
    assert sites.pulls >= 3, "it asked several times, not once after a long sleep"
    lines = capsys.readouterr().err
    assert lines.count('"event": "coordinator-reply"') == 2 and '"round": 7' in lines


def test_a_site_that_never_replies_is_given_up_at_the_timeout() -> None:
    started = time.monotonic()
    replies = list(PollingGrid(SlowSites(delay_s=0.0, answering=1), poll_seconds=0.05).send_and_receive(
        _messages(), timeout=0.5))
    assert len(replies) == 1 and 0.5 <= time.monotonic() - started < 3.0


def test_the_coordinator_sets_the_interval_in_its_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REPLY_POLL_ENV, "3")
    assert PollingGrid(SlowSites(0.0)).poll_seconds == 3.0
    monkeypatch.delenv(REPLY_POLL_ENV)
    assert PollingGrid(SlowSites(0.0)).poll_seconds == REPLY_POLL_SECONDS == 0.05
    for wrong in ("0", "nan", "soon"):
        monkeypatch.setenv(REPLY_POLL_ENV, wrong)
        with pytest.raises(ConfigError, match=REPLY_POLL_ENV):
            PollingGrid(SlowSites(0.0))
