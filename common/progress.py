"""Progress output for long work: a live bar on a terminal, plain lines in logs and CI."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """``with ProgressBar(total, "epoch 3") as bar: bar.advance()``; silent when ``enabled`` is False."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.total = max(total, 1)
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = enabled and self.stream.isatty()
        self.done = 0
        self.started = time.perf_counter()

    def __enter__(self) -> ProgressBar:
        return self

    def advance(self, steps: int = 1, note: str = "") -> None:
        self.done += steps
        if not self.enabled:
            return
        width = 30
        filled = int(width * self.done / self.total)
        elapsed = time.perf_counter() - self.started
        self.stream.write(
            f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {elapsed:5.1f}s {note}"
        )
        self.stream.flush()

    def __exit__(self, *_: object) -> None:
        if self.enabled:
            self.stream.write("\r\033[K")
            self.stream.flush()


def log(message: str, stream: TextIO | None = None) -> None:
    """One line of progress on stderr, so stdout stays clean for results (--json)."""
    print(message, file=stream or sys.stderr, flush=True)
