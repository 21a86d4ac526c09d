"""Progress bars draw on a terminal only: logs and CI get the plain lines."""

from __future__ import annotations

import io

from common.utils.progress import log, progress_bar


def test_a_progress_bar_writes_nothing_off_a_terminal() -> None:
    stream = io.StringIO()
    with progress_bar(3, "epoch 1", stream) as advance:
        for step in range(3):
            advance(f"loss {step}")
    log("fedtail: done", stream)
    assert stream.getvalue() == "fedtail: done\n"
