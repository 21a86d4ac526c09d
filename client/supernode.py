"""The site's SuperNode: Flower's ``flower-supernode``, unchanged but for how long it waits between polls.

Why: Flower 1.41's SuperNode loop (``flwr/supernode/start_client_internal.py``; 1.42 is the same) asks the SuperLink
for a message, and when there is none it sleeps a fixed 3 s; it checks for its ClientApp's reply every 0.5 s. A site
sends its reply and asks at once for the next round, before the coordinator can have aggregated, so every deployed
round waits on average about 3 s for the site to look again, whatever the sites and the coordinator do: the bulk of
a small round (docs/benchmarks.md, deployment). No Flower option sets these intervals.

How: ``python -m client.supernode [--idle-poll S] FLOWER-SUPERNODE-OPTIONS`` runs Flower's own ``flower_supernode()``
in this process after giving that one module a ``time`` whose ``sleep`` waits at most ``--idle-poll`` seconds
(default 0.2). Everything else is Flower's: TLS, SuperNode authentication, node config, isolation, heartbeats, the
message protocol. The cost is requests: an idle site asks the SuperLink every ``--idle-poll`` seconds instead of
every 3 s (for 100 sites at 0.2 s, 500 small requests a second at the SuperLink); ``--idle-poll 3`` is Flower's
behaviour. The loop was read for the Flower versions in ``READ_FOR``; another version is refused with that reason
(read its loop, then add it), so a changed loop is never patched blindly.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from importlib.metadata import version
from types import ModuleType
from typing import Any

from flwr.supernode import start_client_internal
from flwr.supernode.cli import flower_supernode

from common.errors import ConfigError

IDLE_POLL_SECONDS = 0.2
READ_FOR = ("1.41.0", "1.42.0")
"""Flower versions whose SuperNode loop sleeps only to poll (idle: 3 s, a reply or a reply's part: 0.5 s)."""


class CappedSleep:
    """The ``time`` module, with ``sleep`` waiting at most ``cap`` seconds."""

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def idle_poll_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and 0.01 <= seconds <= 3):
        raise argparse.ArgumentTypeError(f"{text!r}: need seconds between 0.01 and 3 (Flower's own interval)")
    return seconds


def cap_polls(loop_module: ModuleType, seconds: float, flower_version: str) -> None:
    """Make ``loop_module`` (Flower's SuperNode loop) poll every ``seconds`` at most."""
    if flower_version not in READ_FOR:
        raise ConfigError(
            f"flwr {flower_version}: client.supernode was checked against the SuperNode loop of flwr "
            f"{', '.join(READ_FOR)} only; run flower-supernode itself, or read the new loop and add the version"
        )
    if getattr(loop_module, "time", None) is not time:
        raise ConfigError(f"{loop_module.__name__} no longer sleeps through the time module; read it again")
    loop_module.time = CappedSleep(seconds)  # type: ignore[attr-defined]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m client.supernode",
        allow_abbrev=False,
        description="Flower's flower-supernode (all its options follow), polling the SuperLink every --idle-poll "
        "seconds when idle instead of every 3 s.",
    )
    parser.add_argument("--idle-poll", type=idle_poll_seconds, default=IDLE_POLL_SECONDS,
                        help=f"seconds between the SuperNode's polls (default {IDLE_POLL_SECONDS}; Flower: 3 when "
                        "idle, 0.5 for a reply)")
    options, flower_options = parser.parse_known_args(argv)
    try:
        cap_polls(start_client_internal, options.idle_poll, version("flwr"))
    except ConfigError as error:
        parser.exit(2, f"client.supernode: {error}\n")
    sys.argv = ["flower-supernode", *flower_options]
    flower_supernode()


if __name__ == "__main__":
    main()
