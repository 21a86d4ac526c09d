"""The site's SuperNode: Flower's ``flower-supernode``, unchanged but for how long it waits between polls.

Why: Flower 1.41's SuperNode loop (``flwr/supernode/start_client_internal.py``; 1.42 is the same) asks the SuperLink
for a message, and when there is none it sleeps a fixed 3 s; it checks for its ClientApp's reply every 0.5 s. A site
sends its reply and asks at once for the next round, before the coordinator can have aggregated, so every deployed
round waits on average about 3 s for the site to look again, whatever the sites and the coordinator do: the bulk of
a small round (docs/benchmarks.md, deployment). No Flower option sets these intervals.

How: ``python -m client.supernode [--idle-poll S] FLOWER-SUPERNODE-OPTIONS`` runs Flower's own ``flower_supernode()``
in this process after shortening that loop's waits (``common.utils.flower_pacing``): its idle sleep lasts at most
``--idle-poll`` seconds (default 0.2), its waits on its own memory for the ClientApp's reply at most 0.05 s, and a
part of a message not yet at the SuperLink (the global weights while the coordinator still uploads them) is asked
for again after 0.05 s instead of 1 s. Everything else is Flower's: TLS, SuperNode authentication, node config,
isolation, heartbeats, the message protocol. The cost is requests: an idle site asks the SuperLink every
``--idle-poll`` seconds instead of every 3 s (for 100 sites at 0.2 s, 500 small requests a second at the SuperLink);
``--idle-poll 3`` keeps Flower's poll.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

from flwr.supernode import start_client_internal
from flwr.supernode.cli import flower_supernode

from common.errors import ConfigError
from common.utils.flower_pacing import cap_sleeps, quick_object_pulls

IDLE_POLL_SECONDS = 0.2


def idle_poll_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and 0.01 <= seconds <= 3):
        raise argparse.ArgumentTypeError(f"{text!r}: need seconds between 0.01 and 3 (Flower's own interval)")
    return seconds


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m client.supernode",
        allow_abbrev=False,
        description="Flower's flower-supernode (all its options follow), polling the SuperLink every --idle-poll "
        "seconds when idle instead of every 3 s.",
    )
    parser.add_argument("--idle-poll", type=idle_poll_seconds, default=IDLE_POLL_SECONDS,
                        help=f"seconds between the idle SuperNode's polls of the SuperLink (default "
                        f"{IDLE_POLL_SECONDS}; Flower: 3); its local wait for a reply is 0.05 s (Flower: 0.5)")
    options, flower_options = parser.parse_known_args(argv)
    try:
        cap_sleeps(start_client_internal, options.idle_poll)
        quick_object_pulls(start_client_internal)
    except ConfigError as error:
        parser.exit(2, f"client.supernode: {error}\n")
    sys.argv = ["flower-supernode", *flower_options]
    flower_supernode()


if __name__ == "__main__":
    main()
