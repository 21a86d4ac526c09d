"""The site's SuperNode: Flower's ``flower-supernode``, unchanged but for how long it waits between polls.

Why: Flower 1.41's SuperNode loop (``flwr/supernode/start_client_internal.py``; 1.42 is the same) asks the SuperLink
for a message, and when there is none it sleeps a fixed 3 s; it checks for its ClientApp's reply every 0.5 s. A site
sends its reply and asks at once for the next round, before the coordinator can have aggregated, so every deployed
round waits on average about 3 s for the site to look again, whatever the sites and the coordinator do: the bulk of
a small round (docs/benchmarks.md, deployment). No Flower option sets these intervals.

How: ``python -m client.supernode [--idle-poll S] FLOWER-SUPERNODE-OPTIONS`` runs Flower's own ``flower_supernode()``
in this process after shortening that loop's waits (``common.flower.pacing``): its idle sleep lasts at most
``--idle-poll`` seconds (default 0.2), its waits on its own memory for the ClientApp's reply at most 0.05 s, and a
part of a message not yet at the SuperLink (the global weights while the coordinator still uploads them) is asked
for again after 0.05 s instead of 1 s. Everything else is Flower's: TLS, SuperNode authentication, node config,
isolation, heartbeats, the message protocol. The cost is requests: an idle site asks the SuperLink every
``--idle-poll`` seconds instead of every 3 s (for 100 sites at 0.2 s, 500 small requests a second at the SuperLink);
``--idle-poll 3`` keeps Flower's poll.

It also waits to be let in. Flower's SuperNode exits at once with "Failed to activate SuperNode" when the SuperLink
does not know its key yet (the coordinator has not run ``flwr supernode register``) or still counts a previous
SuperNode with the same key as online (one hard-killed less than about a minute ago); the reason is only in the
SuperLink's log. This one says so, and tries again every ``--activation-retry`` seconds for up to
``--activation-wait`` seconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx
from flwr.supercore.error import ApiErrorCode, FlowerError
from flwr.supernode import start_client_internal
from flwr.supernode.cli import flower_supernode
from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode
from flwr.supernode.fleet_http_client import FleetHttpClient

from common.errors import ConfigError
from common.flower.pacing import cap_sleeps, quick_object_pulls
from common.utils.arguments import seconds_between
from common.utils.progress import log

IDLE_POLL_SECONDS = 0.2
ACTIVATION_RETRY_SECONDS = 10.0
ACTIVATION_WAIT_SECONDS = 600.0
NOT_ACTIVATED = (
    "fedtail site: the SuperLink refused to activate this SuperNode (Flower: 'Failed to activate SuperNode'). "
    "Either its public key is not registered yet (the coordinator runs `flwr supernode register NAME.pub` with the "
    "NAME.pub that `fedtail deploy keys` wrote), or a SuperNode with the same key stopped less than about a minute "
    "ago and the SuperLink still counts it online. Trying again in {retry:g} s ({left:.0f} s left of "
    "--activation-wait)."
)


def _activation_refused(error: httpx.HTTPStatusError) -> bool:
    """The SuperLink's answer to an unregistered key, or to a key whose previous SuperNode it still counts online."""
    refusal = FlowerError.from_json(error.response.text)
    return refusal is not None and refusal.code == ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED


def wait_for_activation(
    client: type[Any], retry_s: float, wait_s: float,
    clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Make ``client.ActivateNode`` (Flower's Fleet API client) retry a refused activation, saying why, until
    ``wait_s`` seconds have passed; then the refusal goes to Flower, which exits with its own message."""
    activate = client.ActivateNode

    def activate_when_registered(self: Any, request: Any) -> Any:
        deadline = clock() + wait_s
        while True:
            try:
                return activate(self, request)
            except httpx.HTTPStatusError as error:
                left = deadline - clock()
                if not _activation_refused(error) or left < retry_s:
                    raise
                log(NOT_ACTIVATED.format(retry=retry_s, left=left))
                sleep(retry_s)

    client.ActivateNode = activate_when_registered


idle_poll_seconds = seconds_between(0.01, 3, " (Flower's own interval)")
positive_seconds = seconds_between(0)


def build_parser() -> argparse.ArgumentParser:
    """This command's own options; every other option is Flower's ``flower-supernode``'s (``--help`` shows both)."""
    parser = argparse.ArgumentParser(
        prog="python -m client.supernode",
        allow_abbrev=False,
        add_help=False,
        description="Flower's flower-supernode (all its options follow), polling the SuperLink every --idle-poll "
        "seconds when idle instead of every 3 s, and waiting for the coordinator to register its key instead of "
        "exiting.",
    )
    parser.add_argument("-h", "--help", action="store_true", help="show this command's and Flower's options")
    parser.add_argument("--idle-poll", type=idle_poll_seconds, default=IDLE_POLL_SECONDS,
                        help=f"seconds between the idle SuperNode's polls of the SuperLink (default "
                        f"{IDLE_POLL_SECONDS}; Flower: 3); its local wait for a reply is 0.05 s (Flower: 0.5)")
    parser.add_argument("--activation-wait", type=positive_seconds, default=ACTIVATION_WAIT_SECONDS,
                        help="how long to keep trying when the SuperLink refuses to activate this SuperNode (key "
                        f"not registered yet, or its previous SuperNode still counted online); default "
                        f"{ACTIVATION_WAIT_SECONDS:g}; 0: exit at once, as Flower does")
    parser.add_argument("--activation-retry", type=positive_seconds, default=ACTIVATION_RETRY_SECONDS,
                        help=f"seconds between those tries (default {ACTIVATION_RETRY_SECONDS:g})")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    options, flower_options = parser.parse_known_args(argv)
    if options.help:
        parser.print_help()
        print("\nFlower's flower-supernode options (all accepted here):\n")
        flower = _parse_args_run_supernode()
        flower.prog = "python -m client.supernode"
        flower.print_help()
        parser.exit(0)
    try:
        cap_sleeps(start_client_internal, options.idle_poll)
        quick_object_pulls(start_client_internal)
    except ConfigError as error:
        parser.exit(2, f"client.supernode: {error}\n")
    wait_for_activation(FleetHttpClient, options.activation_retry, options.activation_wait)
    sys.argv = ["flower-supernode", *flower_options]
    flower_supernode()

