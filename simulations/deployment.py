"""A real federation on one machine: a SuperLink and SuperNodes as separate processes, over loopback.

What a coordinator and its partner sites run (``docs/deploy.md``), driven from
Python so that tests and benchmarks can start, kill and restart each part:
Flower's Deployment Engine with TLS (a private CA from ``fedtail deploy
certs``) and SuperNode authentication (keys from ``fedtail deploy keys``,
registered with ``flwr supernode register``) unless ``secure=False``. The
SuperLink listens on its own loopback port, which only the coordinator's
``flwr`` and ServerApp use; sites reach it through the Fleet proxy
(``simulations.fleet_proxy``, nginx), which forwards the Fleet API and nothing
else. Each site runs its SuperNode with ``--isolation process`` and its own
ClientApp runtime (``client.runtime``), so that it runs only the app bundles it
approved.
"""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd

from common.data.catalog import Catalog
from common.federation import RunSettings
from common.flower.supernode import IDLE_POLL_SECONDS
from common.utils.processes import APP_DIR, die_with_parent, executable, free_loopback_port
from common.utils.progress import log
from simulations.credentials import CA_CERT, SERVER_CERT, SERVER_KEY, write_certificates, write_site_keys
from simulations.fleet_proxy import LOOPBACK_HOSTS, FleetProxy, start_nginx
from simulations.flower_cli import (
    FlowerFailed,
    flower_env,
    list_runs,
    stop_process_group,
    toml_value,
    wait_for_superlink,
    write_connection,
    write_run_config,
)

CONNECTION = "fedtail-deployment"
STATUS_POLL_S = 30.0
STARTED_RUN = re.compile(r"Successfully started run (\d+)")


def deal_to_sites(frame: pd.DataFrame, sites: Sequence[str], folder: Path) -> dict[str, Path]:
    """Users dealt round-robin to ``sites``, one interaction file ``SITE.csv`` each (a trial federation's data)."""
    folder.mkdir(parents=True, exist_ok=True)
    users = frame["user"].unique()
    owner = frame["user"].map(dict(zip(users, np.arange(len(users)) % len(sites), strict=True)))
    paths = {}
    for index, site in enumerate(sites):
        paths[site] = folder / f"{site}.csv"
        frame.loc[owner == index, ["user", "item", "timestamp"]].to_csv(paths[site], index=False)
    return paths


def write_site_files(frame: pd.DataFrame, sites: Sequence[str], folder: Path) -> dict[str, Path]:
    """``deal_to_sites``, plus the shared ``catalog`` file."""
    paths = deal_to_sites(frame, sites, folder)
    paths["catalog"] = folder / "catalog.json"
    Catalog.from_items(frame["item"].unique().tolist()).save(paths["catalog"])
    return paths


def site_node_config(
    site: str, data: Mapping[str, Path], ledger_root: Path, max_epsilon: float = 8.0, delta: float = RunSettings.delta
) -> dict[str, Any]:
    """A site's node config: its data and its own privacy settings (the run must ask for this delta, and at most
    half of ``max-epsilon``: a deployed site's default ``window-epsilon``, ``client.policy``)."""
    return {
        "data-path": str(data[site]), "catalog-path": str(data["catalog"]),
        "ledger-dir": str(ledger_root / f"{site}-ledger"), "max-epsilon": max_epsilon, "delta": delta, "site-id": site,
    }


@dataclass
class LocalDeployment:
    root: Path
    secure: bool = True
    port: int = field(default_factory=free_loopback_port)
    """Where the sites reach the coordinator: the Fleet proxy (secure) or the SuperLink itself (insecure)."""
    superlink_port: int = 0
    """The SuperLink's own port on loopback (secure; 0: a free one), where only the coordinator's flwr and
    ServerApp reach it. Insecure: ``port``."""
    superlink: subprocess.Popen[bytes] | None = None
    proxy: subprocess.Popen[bytes] | None = None
    supernodes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    runtimes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    """Each site's ClientApp runtime (``client.runtime``), beside its SuperNode."""
    runtime_commands: dict[str, list[str]] = field(default_factory=dict)
    """Each site's runtime options (its SuperNode's Runtime API, approved bundles)."""
    environment: dict[str, str] = field(default_factory=dict)
    """Added to every process's environment (the coordinator's and the sites' settings, e.g. for benchmarks)."""
    _logs: list[IO[bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.secure:
            log("fedtail: WARNING: insecure deployment: no TLS, no SuperNode authentication; loopback tests only")
            self.superlink_port = self.port
        elif not self.superlink_port:
            self.superlink_port = free_loopback_port()
        self.root.mkdir(parents=True, exist_ok=True)
        self.certificates = self.root / "certificates"
        if self.secure and not (self.certificates / CA_CERT).exists():
            write_certificates(self.certificates, list(LOOPBACK_HOSTS))
        self.flower_home = self.root / "coordinator-flower-home"
        write_connection(self.flower_home, CONNECTION, self.superlink_port, self.ca_file)
        self.env = {**flower_env(self.flower_home), **self.environment}

    @property
    def ca_file(self) -> Path | None:
        return self.certificates / CA_CERT if self.secure else None

    def _site_env(self, name: str) -> dict[str, str]:
        return {**flower_env(self.root / f"site-{name}-flower-home"), **self.environment}

    def _log(self, name: str) -> IO[bytes]:
        handle = (self.root / f"{name}.log").open("ab")
        self._logs.append(handle)
        return handle

    def start_superlink(self) -> None:
        """The coordinator's SuperLink on loopback, and the Fleet proxy in front of it: TLS and registered
        SuperNodes only, unless insecure (then the sites reach the SuperLink itself)."""
        security = (
            ["--ssl-ca-certfile", str(self.certificates / CA_CERT),
             "--ssl-certfile", str(self.certificates / SERVER_CERT),
             "--ssl-keyfile", str(self.certificates / SERVER_KEY), "--enable-supernode-auth"]
            if self.secure else ["--insecure"]
        )
        command = [
            executable("flower-superlink"), *security, "--host", "127.0.0.1", "--port", str(self.superlink_port),
            "--database", str(self.root / "superlink.db"), "--disable-runtime-dependency-installation",
        ]
        self.superlink = subprocess.Popen(
            command, env=self.env, stdout=self._log("superlink"), stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=die_with_parent,
        )
        wait_for_superlink(self.superlink_port, self.superlink, self.root / "superlink.log", self.ca_file)
        if self.secure and self.proxy is None:  # it outlives a SuperLink killed and restarted
            proxy = FleetProxy(f"127.0.0.1:{self.port}", self.superlink_port, self.certificates, self.root / "proxy")
            self.proxy = start_nginx(proxy, self.root / "fleet-proxy.log")

    def site_keys(self, name: str) -> tuple[Path, Path]:
        return write_site_keys(self.root / "keys", name)

    def register(self, public_key: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [executable("flwr"), "supernode", "register", str(public_key), CONNECTION],
            env=self.env, capture_output=True, text=True, check=False, timeout=60,
        )

    def start_supernode(
        self, name: str, node_config: Mapping[str, Any], private_key: Path | None, ca_file: Path | None = None,
        max_wait_s: float | None = None, approve: Sequence[str] = (), fresh_process: bool = False,
        idle_poll_s: float | None = IDLE_POLL_SECONDS,
    ) -> subprocess.Popen[bytes]:
        """A site's SuperNode (``client.supernode``: Flower's, polling every ``idle_poll_s``; None: Flower's own
        ``flower-supernode``) and its ClientApp runtime, which runs the installed fedtail's app bundle and those in
        ``approve`` (sha256) only; ``ca_file`` defaults to the deployment's CA (pass another to try a wrong one);
        ``fresh_process``: the runtime starts a flwr-clientapp per task instead of running the release warm."""
        ca_file = ca_file or self.ca_file
        security = ["--root-certificates", str(ca_file)] if self.secure else ["--insecure"]
        if private_key is not None:
            security += ["--auth-supernode-private-key", str(private_key)]
        config = " ".join(f"{key}={toml_value(value)}" for key, value in node_config.items())
        runtime_port = free_loopback_port()
        supernode = (
            [executable("flower-supernode")] if idle_poll_s is None
            else [sys.executable, "-m", "client.supernode", "--idle-poll", str(idle_poll_s)]
        )
        command = [
            *supernode, *security, "--superlink", f"127.0.0.1:{self.port}",
            "--node-config", config, "--isolation", "process", "--port", str(runtime_port),
        ]
        if max_wait_s is not None:
            command += ["--max-wait-time", str(max_wait_s)]
        env = self._site_env(name)
        site_log = self._log(f"supernode-{name}")  # the site's SuperNode, runtime and ClientApps, in one file
        process = subprocess.Popen(  # from the checkout, as the runtime
            command, env=env, cwd=APP_DIR, stdout=site_log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=die_with_parent,
        )
        self.supernodes[name] = process
        runtime = ["--runtime-api-address", f"127.0.0.1:{runtime_port}", *(f"--approve={d}" for d in approve)]
        self.runtime_commands[name] = [*runtime, *(["--fresh-process"] if fresh_process else [])]
        self.start_runtime(name)
        return process

    def start_runtime(self, name: str) -> subprocess.Popen[bytes]:
        """The site's ClientApp runtime (again, after ``kill_runtime``), with the options its SuperNode started it."""
        command = [sys.executable, "-m", "client.runtime", *self.runtime_commands[name]]
        self.runtimes[name] = subprocess.Popen(  # from the checkout: `python -m` imports from the working folder
            command, env=self._site_env(name), cwd=APP_DIR,
            stdout=self._log(f"supernode-{name}"), stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=die_with_parent,
        )
        return self.runtimes[name]

    def kill_runtime(self, name: str) -> None:
        """The site's runtime dies (with any ClientApp it runs), its SuperNode stays up."""
        stop_process_group(self.runtimes.pop(name), signal.SIGKILL)

    def connected_nodes(self) -> int:
        """SuperNodes the SuperLink reports online (`flwr supernode list`)."""
        result = subprocess.run(
            [executable("flwr"), "supernode", "list", CONNECTION, "--format", "json"],
            env=self.env, capture_output=True, text=True, check=False, timeout=60,
        )
        try:
            nodes = json.loads(result.stdout)["nodes"]
        except (json.JSONDecodeError, KeyError):
            raise FlowerFailed(f"could not list the SuperNodes: {result.stdout}{result.stderr}") from None
        return sum(node["status"] == "online" for node in nodes)

    def submit(self, run_config: Mapping[str, Any], app: Path = APP_DIR) -> int:
        """`flwr run` the app (its folder) against this SuperLink; returns the run id (the run goes on in the
        background)."""
        config_file = write_run_config(self.root / "run-config.toml", run_config)
        result = subprocess.run(
            [executable("flwr"), "run", str(app), CONNECTION, "--run-config", str(config_file)],
            env=self.env, capture_output=True, text=True, check=False, timeout=300,
        )
        match = STARTED_RUN.search(result.stdout + result.stderr)
        if match is None:
            raise FlowerFailed(f"flwr run did not start a run:\n{result.stdout}{result.stderr}")
        return int(match.group(1))

    def status(self, run_id: int) -> dict[str, Any]:
        for run in list_runs(self.env, CONNECTION):
            if int(run["run-id"]) == run_id:
                return run
        raise FlowerFailed(f"run {run_id} is not known to the SuperLink")

    def run_log(self, run_id: int) -> str:
        """The run's ServerApp output, as the SuperLink keeps it (`flwr log --show`; Flower's SuperExec does not
        pass it to the SuperLink's own output)."""
        result = subprocess.run(
            [executable("flwr"), "log", str(run_id), CONNECTION, "--show"],
            env=self.env, capture_output=True, text=True, check=False, timeout=120,
        )
        if result.returncode != 0:
            raise FlowerFailed(f"flwr log {run_id} failed:\n{result.stdout}{result.stderr}")
        return result.stdout

    def wait(self, run_id: int, timeout_s: float = 600, finished_file: Path | None = None) -> dict[str, Any]:
        """Until the run is finished (completed, failed or stopped); returns its status.

        ``finished_file``: a file the run writes as it ends (its summary). Until it appears the SuperLink is asked
        only every ``STATUS_POLL_S`` seconds: each ask is a ``flwr ls`` process, seconds of CPU that a benchmark on
        a small machine would count against the deployment it measures."""
        deadline = time.monotonic() + timeout_s
        asked = -math.inf
        while time.monotonic() < deadline:
            ask = finished_file is None or finished_file.exists() or time.monotonic() - asked >= STATUS_POLL_S
            if ask:
                asked = time.monotonic()
                status = self.status(run_id)
                if str(status["status"]).startswith("finished"):
                    return status
            time.sleep(1 if finished_file is None else 0.2)
        raise FlowerFailed(f"run {run_id} did not finish in {timeout_s:.0f}s")

    def kill_superlink(self) -> None:
        """The coordinator dies: SuperLink and its ServerApp, without warning."""
        if self.superlink is not None:
            stop_process_group(self.superlink, signal.SIGKILL)
            self.superlink = None

    def kill_supernode(self, name: str) -> None:
        """The site's machine dies: its SuperNode and its runtime (with any ClientApp), without warning."""
        stop_process_group(self.supernodes.pop(name), signal.SIGKILL)
        self.kill_runtime(name)

    def stop(self) -> None:
        for name in list(self.supernodes):
            stop_process_group(self.supernodes.pop(name))
        for name in list(self.runtimes):
            stop_process_group(self.runtimes.pop(name))
        if self.superlink is not None:
            stop_process_group(self.superlink)
            self.superlink = None
        if self.proxy is not None:
            stop_process_group(self.proxy)
            self.proxy = None
        for handle in self._logs:
            handle.close()
        self._logs.clear()

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

