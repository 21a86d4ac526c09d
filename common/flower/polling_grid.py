"""The ServerApp's Grid, asking for the sites' replies every 0.05 s (``$FEDTAIL_REPLY_POLL_SECONDS``) instead of
Flower's 3 s, and timing each round.

Why: Flower 1.41's deployed Grid (``flwr/superlink/grid/http_grid.py``, ``send_and_receive``) pushes a round's
messages and then pulls the replies every 3 s, a fixed sleep that no option changes (1.42 is the same); a round whose
sites reply within a second still waits up to 3 s for the coordinator to look. This wrapper implements
``send_and_receive`` with Flower's own public ``push_messages`` and ``pull_messages`` and a short interval (one small
request to the SuperLink on the same machine per interval), and delegates everything else to Flower's Grid. A reply
seen while the site still uploads its parts is asked for again after 0.05 s instead of 1 s
(``common.flower.pacing.quick_object_pulls``), and each message's content travels as one byte string
(``common.flower.packed_content``).

It also prints the coordinator's side of the round timeline (``common.utils.timeline``): when a round's messages
were sent and when each site's reply arrived (times only).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable

from flwr.app import Error, Message, RecordDict
from flwr.app.message import make_message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.superlink.grid import HttpGrid, http_grid

from common.errors import ConfigError
from common.flower.pacing import quick_object_pulls
from common.flower.packed_content import PackedContentError, is_packed, pack, unpack
from common.utils import timeline

REPLY_POLL_SECONDS = 0.05
REPLY_POLL_ENV = "FEDTAIL_REPLY_POLL_SECONDS"
"""The coordinator's choice (in the SuperLink's environment, which its ServerApps inherit): shorter answers sooner,
at one more request to the SuperLink per interval while a round is out."""


def reply_poll_seconds() -> float:
    """``$FEDTAIL_REPLY_POLL_SECONDS``, or 0.05 s; between 0.01 and 60."""
    text = os.environ.get(REPLY_POLL_ENV, "")
    if not text:
        return REPLY_POLL_SECONDS
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and 0.01 <= seconds <= 60):
        raise ConfigError(f"{REPLY_POLL_ENV}={text!r}: need seconds between 0.01 and 60")
    return seconds


def _round(message: Message) -> int | str:
    """The round a message belongs to, as the site reads it (the strategy's ``server-round``; Flower 1.41's
    strategies leave ``group_id`` empty)."""
    config = message.content.config_records.get("config")
    number = None if config is None else config.get("server-round")
    return number if isinstance(number, int) else message.metadata.group_id


def _unpacked(reply: Message) -> Message:
    """The reply with its content unpacked; a packed reply that does not parse becomes that site's error
    reply, which the strategy counts as a failure (one site's bad reply does not stop the round)."""
    if not (reply.has_content() and is_packed(reply.content)):
        return reply
    try:
        reply.content = unpack(reply.content)
    except PackedContentError as error:
        return make_message(reply.metadata, error=Error(code=ErrorCode.UNKNOWN, reason=str(error)))
    return reply


class PollingGrid(Grid):
    """Flower's Grid (``inner``) with a shorter interval between pulls for replies."""

    def __init__(self, inner: Grid, poll_seconds: float | None = None) -> None:
        self.inner = inner
        self.poll_seconds = reply_poll_seconds() if poll_seconds is None else poll_seconds
        self.packs = isinstance(inner, HttpGrid)
        """Deployed: content travels packed (``packed_content``), and a reply's parts still being uploaded are
        asked for again soon."""
        if self.packs:
            quick_object_pulls(http_grid)

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deployed: each message's content is replaced by its packed form in place (as Flower's own push sets
        the message id in place); callers match replies by the ids returned, never by re-reading what they sent."""
        messages = list(messages)
        if self.packs:
            for message in messages:
                if message.has_content():
                    message.content = pack(message.content)
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [_unpacked(reply) for reply in self.inner.pull_messages(message_ids)]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Flower's semantics (all replies, or those in by ``timeout``), pulling every ``poll_seconds``."""
        messages = list(messages)
        if not messages:
            return []
        group = _round(messages[0])
        timeline.emit("coordinator-send", round=group, messages=len(messages))  # before the push: a site may take
        waiting = set(self.push_messages(messages))  # its message while the coordinator still pushes the others
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting and (end is None or time.monotonic() < end):
            arrived = list(self.pull_messages(waiting))
            for reply in arrived:
                timeline.emit("coordinator-reply", round=group, node=reply.metadata.src_node_id)
            replies.extend(arrived)
            waiting.difference_update(reply.metadata.reply_to_message_id for reply in arrived)
            if waiting:
                time.sleep(self.poll_seconds)
        return replies
