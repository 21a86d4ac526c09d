"""Starting and asking Flower's own programs (flower-superlink, flwr, ...): shared by simulation and deployment.

fedtail drives Flower through its command-line programs, as an operator would,
so that what the tests exercise is what a deployment runs.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.errors import FedtailError
from common.utils.processes import executable


class FlowerFailed(FedtailError):
    """A Flower process or run did not do what was asked; the message carries Flower's reason."""


def flower_env(flower_home: Path) -> dict[str, str]:
    """Environment for Flower programs: this Flower home, this environment's programs, no runtime installs."""
    return {
        **os.environ,
        # Flower starts its programs (flower-superexec, flwr-serverapp, ...) by name: they must be this environment's.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "FLWR_HOME": str(flower_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PYTHONUNBUFFERED": "1",
    }


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    return repr(value)


def write_run_config(path: Path, config: Mapping[str, Any]) -> Path:
    path.write_text("".join(f"{key} = {toml_value(value)}\n" for key, value in config.items()), encoding="utf-8")
    return path


def write_connection(flower_home: Path, name: str, port: int, root_certificates: Path | None) -> None:
    """The `flwr` CLI's config.toml: one SuperLink connection, TLS-verified against ``root_certificates``."""
    flower_home.mkdir(parents=True, exist_ok=True)
    security = f'root-certificates = "{root_certificates}"' if root_certificates else "insecure = true"
    (flower_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "127.0.0.1:{port}"\n{security}\n',
        encoding="utf-8",
    )


def wait_for_superlink(
    port: int, process: subprocess.Popen[bytes], log_file: Path, ca_file: Path | None = None, timeout_s: float = 60
) -> None:
    """Until the SuperLink answers its health check (over TLS, verified with ``ca_file``, when given)."""
    context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
    scheme = "https" if ca_file else "http"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = log_file.with_suffix(".out")
            tail = output.read_text(encoding="utf-8", errors="replace")[-2000:] if output.exists() else ""
            raise FlowerFailed(f"flower-superlink exited with code {process.returncode}; see {log_file}\n{tail}")
        try:
            with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/health", timeout=1, context=context) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise FlowerFailed(f"flower-superlink did not become ready in {timeout_s:.0f}s; see {log_file}")


def stop_process_group(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Stop a process started in its own session and everything it started (SuperExec, app processes, Ray)."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, sig)
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def list_runs(env: Mapping[str, str], connection: str) -> list[dict[str, Any]]:
    """`flwr ls` as data: each run's id, status, status details, ..."""
    result = subprocess.run(
        [executable("flwr"), "ls", connection, "--format", "json"], capture_output=True, text=True, env=dict(env),
        check=False,
    )
    try:
        return list(json.loads(result.stdout)["runs"])
    except (json.JSONDecodeError, KeyError):
        raise FlowerFailed(f"could not read the runs from the SuperLink: {result.stdout}{result.stderr}") from None
