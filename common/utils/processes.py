"""Processes: the Flower processes fedtail starts or runs inside: which program, and its lifetime.

Flower's simulation runs in a process (`flwr-simulation`) that a SuperExec starts
in its own session; killing the `fedtail simulate` that started everything
leaves it running to the end, writing into the run folder. Two guards:
every process in the chain dies with its parent, and only one process at a
time may write a run folder (and only one `fedtail simulate` at a time may launch runs into it).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import shutil
import signal
import socket
import sys
from pathlib import Path
from typing import IO

from common.errors import ConfigError

PR_SET_PDEATHSIG = 1

APP_DIR = Path(__file__).resolve().parents[2]
"""The Flower app (pyproject.toml with [tool.flwr.app]) that `flwr run` submits: the installed fedtail checkout."""


def executable(name: str) -> str:
    """A Flower program of this environment, also when it was not activated (e.g. `.venv/bin/fedtail`)."""
    beside_python = Path(sys.executable).parent / name
    found = str(beside_python) if beside_python.exists() else shutil.which(name)
    if not found:
        raise ConfigError(f"'{name}' not found; is flwr installed in this environment?")
    return found


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for the servers fedtail starts)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def die_with_parent(signal_number: int = signal.SIGTERM) -> None:
    """Ask Linux to send ``signal_number`` to this process when its parent exits (no-op elsewhere)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal_number)
    except (OSError, AttributeError):
        pass


SERVER_LOCK = ".lock"
"""Held by the ServerApp while it writes the run folder."""
LAUNCHER_LOCK = ".simulate.lock"
"""Held by `fedtail simulate` from its first look at the folder to its end: a second launch is refused before it
touches the first one's files (its SuperLink connection, flower.log), and before Flower starts. A lock of its own,
because the ServerApp that the launch starts takes the server's lock in another process."""


def lock_run_folder(out_dir: Path, name: str = SERVER_LOCK) -> IO[str]:
    """Hold an exclusive lock on the run folder for this process's lifetime (released when it exits).

    Keep the returned handle open for as long as the folder is being written.
    """
    handle = (out_dir / name).open("a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise ConfigError(
            f"{out_dir} is being written by another run (pid {holder}); wait for it or stop it first"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle
