"""Where the seconds of a deployed round go: wall-clock marks that the site and the coordinator print, one line each.

Why: a deployed round crosses several processes (ServerApp, SuperLink, SuperNode, the site's runtime, the
ClientApp); only wall-clock times on one machine (the loopback benchmark) can be lined up across them. Each line is
``fedtail-timeline {json}``; ``simulations.bench.deployment`` reads them from the logs and builds the per-round
timeline, and ``simulations.bench.rounds`` splits a simulated ``noise = central`` round by them (the coordinator's
``coordinator-round`` line holds its stages of the round). A line holds times and durations only, never a count of
the site's users or interactions.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common.utils.progress import log

TIMELINE_LINE = re.compile(r"fedtail-timeline (?P<fields>\{.*\})")

_durations: dict[str, float] = {}
"""Seconds spent in named stages since the last ``reset``: this process's current task."""


def reset() -> None:
    _durations.clear()


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Add the time spent in the block to the stage ``name`` of the current task."""
    started = time.perf_counter()
    try:
        yield
    finally:
        _durations[name] = _durations.get(name, 0.0) + time.perf_counter() - started


def durations() -> dict[str, float]:
    return dict(_durations)


def emit(event: str, **fields: Any) -> None:
    """One timeline line: the event, when it happened (``time.time()``), and what the caller adds."""
    log("fedtail-timeline " + json.dumps({"event": event, "t": time.time(), **fields}, sort_keys=True))


def parse(text: str) -> list[dict[str, Any]]:
    """The timeline lines of a log, in order."""
    return [json.loads(match["fields"]) for match in TIMELINE_LINE.finditer(text)]


def read(path: Path) -> list[dict[str, Any]]:
    """The timeline lines of a log file, in order."""
    return parse(path.read_text(encoding="utf-8", errors="replace") if path.exists() else "")
