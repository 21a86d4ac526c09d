"""Runs a tutorial page's commands as a reader would: every ```bash block in order, in one folder.

Markers, HTML comments the site does not show, on the line before a block:

- ``<!-- not run -->``: shown only (installing, a command for another machine);
- ``<!-- in the background; ready when it prints "TEXT" -->``: a long-running program (a server); it keeps running
  until the tutorial ends, and the next block starts once its output holds TEXT;
- ``<!-- in the background; ready when HOST:PORT accepts connections -->``: the same, for a program that prints
  nothing (nginx): the next block starts once a TCP connection to HOST:PORT succeeds.

``export`` lines carry over to later blocks, as in the reader's terminal. Ports the page uses are replaced by free
ones (``ports``), so that the test never collides with a program already listening.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common.utils.processes import free_loopback_port

BLOCK = re.compile(r"(?:^<!-- (?P<marker>[^\n]*?) -->\n)?^```bash\n(?P<code>.*?)^```$", re.MULTILINE | re.DOTALL)
READY = re.compile(r'in the background; ready when (?:it prints "(?P<text>[^"]+)"|(?P<address>\S+):(?P<port>\d+) '
                   r'accepts connections)')


@dataclass(frozen=True)
class Ready:
    """When a background program is ready: its output holds ``text``, or ``host``:``port`` accepts connections."""

    text: str | None = None
    host: str = ""
    port: str = ""

    def reached(self, log: Path, ports: dict[str, str]) -> bool:
        if self.text is not None:
            return self.text in log.read_text(errors="replace")
        try:
            socket.create_connection((self.host, int(ports.get(self.port, self.port))), timeout=1).close()
        except OSError:
            return False
        return True


@dataclass(frozen=True)
class Step:
    code: str
    background_until: Ready | None
    """When a background program is ready; None: run to completion."""


def steps(page: Path) -> list[Step]:
    found = []
    for block in BLOCK.finditer(page.read_text(encoding="utf-8")):
        marker = block.group("marker") or ""
        if marker == "not run":
            continue
        ready = READY.fullmatch(marker)
        if marker and ready is None:
            raise ValueError(f"{page}: unknown marker <!-- {marker} -->")
        until = None if ready is None else (Ready(text=ready.group("text")) if ready.group("text") is not None
                                            else Ready(host=ready.group("address"), port=ready.group("port")))
        found.append(Step(block.group("code"), until))
    return found


def follow(page: Path, folder: Path, ports: tuple[int, ...] = (), timeout_s: float = 600) -> str:
    """Run the page's steps in ``folder``; returns everything they printed. Fails naming the step that failed."""
    replaced = {str(port): str(free_loopback_port()) for port in ports}
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
           "HOME": str(folder / "home"), "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1",
           "FEDTAIL_CACHE_DIR": str(folder / "cache")}
    (folder / "home").mkdir(exist_ok=True)
    exports: list[str] = []
    background: list[tuple[subprocess.Popen[bytes], Path]] = []
    printed: list[str] = []
    deadline = time.monotonic() + timeout_s
    try:
        for number, step in enumerate(steps(page), start=1):
            code = step.code
            for old, new in replaced.items():
                code = re.sub(rf"\b{old}\b", new, code)
            script = "\n".join(["set -euo pipefail", *exports, code])
            exports += [line for line in code.splitlines() if line.startswith("export ")]
            if step.background_until is not None:
                log = folder / f"background-{number}.log"
                process = subprocess.Popen(["bash", "-c", script], cwd=folder, env=env, stdout=log.open("wb"),
                                           stderr=subprocess.STDOUT, start_new_session=True)
                background.append((process, log))
                while not step.background_until.reached(log, replaced):
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise AssertionError(f"{page.name}, step {number} never got ready ({step.background_until}):"
                                             f"\n{code}\n{log.read_text(errors='replace')[-3000:]}")
                    time.sleep(0.2)
                continue
            left = max(deadline - time.monotonic(), 1)
            result = subprocess.run(["bash", "-c", script], cwd=folder, env=env, capture_output=True, text=True,
                                    timeout=left, check=False)
            printed.append(result.stdout + result.stderr)
            if result.returncode != 0:
                raise AssertionError(f"{page.name}, step {number} exited {result.returncode}:\n{code}\n"
                                     f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    finally:
        for process, _ in reversed(background):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
    return "\n".join(printed)
