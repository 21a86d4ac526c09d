"""Progress output for long work: a live bar on a terminal (rich, which ships with Flower), plain lines in logs."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


@contextmanager
def progress_bar(total: int, label: str, stream: TextIO | None = None) -> Iterator[Callable[[str], None]]:
    """``with progress_bar(n, "epoch 3") as advance: advance("loss 0.3")``; drawn only on a terminal.

    The bar is transient: it disappears when the work is done, so logs and
    terminals keep only the lines that ``log`` writes.
    """
    console = Console(file=stream or sys.stderr)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[note]}"),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    ) as bar:
        task = bar.add_task(label, total=max(total, 1), note="")
        yield lambda note: bar.update(task, advance=1, note=note)


def log(message: str, stream: TextIO | None = None) -> None:
    """One line of progress on stderr, so stdout stays clean for results (--json)."""
    print(message, file=stream or sys.stderr, flush=True)
