"""A real ``fedtail serve`` process on loopback, for the tests that talk to it over HTTP."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from common.utils.processes import free_loopback_port

STARTUP_SECONDS = 300
"""The import of torch alone can take a minute on a loaded machine."""


@contextmanager
def running_service(run_dir: Path, *options: str, stderr: IO[bytes] | None = None) -> Iterator[str]:
    """``fedtail serve run_dir *options`` on a free loopback port, on the CPU; yields its base URL once /health answers.

    ``stderr``: where its log goes (a file the test reads); by default a pipe, shown if it exits before answering.
    """
    port = free_loopback_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "simulations.cli", "serve", str(run_dir), "--port", str(port), "--device", "cpu",
         *options],
        stdout=subprocess.DEVNULL, stderr=stderr or subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                if process.poll() is not None:
                    log = process.stderr.read().decode() if process.stderr else "see its log"
                    raise RuntimeError(f"the service exited: {log}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the service did not answer /health within {STARTUP_SECONDS} s") from None
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)
