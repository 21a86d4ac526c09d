"""Shorter waits in Flower's deployed message path: polls capped, and a missing part of a message asked for again
after 0.05 s instead of 1 s.

Why: on Flower 1.41 (1.42 is the same) a deployed round pays fixed waits that no option sets (docs/deploy.md,
Speed): the SuperNode asks the SuperLink for work every 3 s when idle and for its ClientApp's reply every 0.5 s
(``time.sleep`` in ``flwr/supernode/start_client_internal.py``), and whoever takes a message before all its parts
have been uploaded (the SuperNode taking the global weights while the coordinator still pushes them, the ServerApp
taking a reply while the SuperNode still pushes it) waits 1 s, then 2 s, ... before asking again (``pull_objects``,
``PULL_INITIAL_BACKOFF = 1``). On loopback or a LAN the parts arrive within a fraction of a second, so a small round
spends most of its time in these waits.

How: each function here replaces one name in one Flower module (its ``time`` or its ``pull_objects``), in the
process that runs that module (the site's SuperNode: ``client.supernode``; the ServerApp: ``polling_grid``).
What is sent, to whom, and when it counts as received does not change; only how long a process waits before it
looks again. The modules were read for the Flower versions in ``READ_FOR``; another version is refused, so a
changed loop is never patched blindly.
"""

from __future__ import annotations

import time
from functools import partial
from importlib.metadata import version
from types import ModuleType
from typing import Any

from flwr.supercore.inflatable.inflatable_utils import pull_objects

from common.errors import ConfigError

READ_FOR = ("1.41.0", "1.42.0")
"""Flower versions whose SuperNode loop sleeps only to poll and whose message parts are pulled by ``pull_objects``."""
OBJECT_RETRY_SECONDS = (0.05, 0.5)
"""First and longest wait before asking again for a part of a message that is not there yet (Flower: 1 s doubling
to 10 s)."""


LOCAL_WAIT_SECONDS = 0.05
"""The longest of the SuperNode's waits on its own state (its ClientApp's reply, a part of that reply): each look is
a query of the SuperNode's own memory, no request to anyone, so it can be short (Flower: 0.5 s)."""
IDLE_SLEEP_FROM = 1.0
"""Flower's sleeps this long or longer are its idle poll of the SuperLink (3 s); shorter ones are local waits."""


class CappedSleep:
    """The ``time`` module, with ``sleep`` waiting at most ``cap`` seconds for Flower's idle poll (a request to the
    SuperLink each time) and at most ``LOCAL_WAIT_SECONDS`` for its local waits."""

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap if seconds >= IDLE_SLEEP_FROM else LOCAL_WAIT_SECONDS))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def check_flower(flower_version: str | None = None) -> None:
    """Refuse a Flower whose modules were not read for these replacements."""
    flower_version = flower_version or version("flwr")
    if flower_version not in READ_FOR:
        raise ConfigError(
            f"flwr {flower_version}: fedtail's shorter Flower waits were checked against flwr {', '.join(READ_FOR)} "
            "only; read the new modules (common/flower/pacing.py says which) and add the version"
        )


def cap_sleeps(module: ModuleType, seconds: float, flower_version: str | None = None) -> None:
    """Make ``module``'s idle ``time.sleep`` wait at most ``seconds``, and its local waits ``LOCAL_WAIT_SECONDS``."""
    check_flower(flower_version)
    current = getattr(module, "time", None)
    if isinstance(current, CappedSleep):
        current.cap = seconds
        return
    if current is not time:
        raise ConfigError(f"{module.__name__} no longer sleeps through the time module; read it again")
    module.time = CappedSleep(seconds)  # type: ignore[attr-defined]


def quick_object_pulls(module: ModuleType, flower_version: str | None = None) -> None:
    """Make ``module`` ask again for a missing message part after ``OBJECT_RETRY_SECONDS`` (0.05 s doubling to
    0.5 s): each retry is one small request to the process that will hold the part."""
    check_flower(flower_version)
    current = getattr(module, "pull_objects", None)
    if isinstance(current, partial) and current.func is pull_objects:
        return
    if current is not pull_objects:
        raise ConfigError(f"{module.__name__} no longer pulls message parts with Flower's pull_objects; read it again")
    first, longest = OBJECT_RETRY_SECONDS
    module.pull_objects = partial(pull_objects, initial_backoff=first, backoff_cap=longest)  # type: ignore[attr-defined]
