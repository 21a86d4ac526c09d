"""The coordinator's public address: a reverse proxy (nginx) through which sites reach the SuperLink's Fleet API
and nothing else.

Why a proxy: Flower 1.41's SuperLink serves all three of its APIs from one HTTP server on one address (``--host``,
``--port``): the Fleet API that SuperNodes use (``/v1/fleet/...``), the Control API that ``flwr`` uses to submit
and list runs, register SuperNodes and read logs (``/v1/control/...``), and the Runtime API through which the
ServerApp sends and receives messages (``/v1/runtime/...``, formerly ServerAppIo). ``--fleet-api-address`` and
``--control-api-address`` are deprecated and no longer open a listener of their own. The open-source SuperLink
authenticates no Control API user (account login is OIDC, in Flower's enterprise edition only), and the Runtime API
checks no secret when the SuperLink starts the ServerApp itself. So anyone who reached that address with the public
``ca.crt`` could act as the coordinator: list runs and sites, register a SuperNode of their own, submit runs.

So the SuperLink listens on loopback only, where the coordinator's operator (and the ServerApp it starts) reach it,
and nginx listens on the public address with the same certificate: it forwards ``POST /v1/fleet/<call>`` for the
calls a SuperNode makes and answers 404 to every other path and 403 to every other method, before Flower sees the
request. SuperNode authentication (``--enable-supernode-auth``) still decides which SuperNodes the Fleet API admits.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from common.errors import ConfigError
from common.utils.processes import die_with_parent
from simulations.credentials import CA_CERT, SERVER_CERT, SERVER_KEY
from simulations.flower_cli import FlowerFailed

PROXY_CONFIG = "fleet-proxy.conf"
FLEET_CALLS = (
    "register-node", "activate-node", "deactivate-node", "unregister-node", "send-node-heartbeat", "pull-messages",
    "push-messages", "get-run", "get-fab", "push-object", "pull-object", "confirm-message-received",
)
"""The Fleet API's calls, as Flower 1.41's SuperNode makes them (``flwr/supernode/fleet_http_client.py``): the only
requests the proxy forwards."""
UPSTREAM_NAME = "localhost"
"""The name the proxy verifies the SuperLink's certificate against: nginx checks host names, not IP addresses."""
LOOPBACK_HOSTS = ("127.0.0.1", UPSTREAM_NAME)
"""Where the coordinator's own programs reach the SuperLink (the operator's ``flwr``, the ServerApp, the proxy):
``fedtail deploy certs`` adds them to every certificate."""


@dataclass(frozen=True)
class FleetProxy:
    """``listen``: the public address sites reach (``0.0.0.0:9092``); ``superlink_port``: the SuperLink's port on
    127.0.0.1; ``certificates``: the folder of ``fedtail deploy certs``; ``state``: nginx's own files (pid, logs,
    temporary files), writable by the user that runs it."""

    listen: str
    superlink_port: int
    certificates: Path
    state: Path

    def config(self) -> str:
        certificates, state = self.certificates.resolve(), self.state.resolve()
        calls = "|".join(FLEET_CALLS)
        return f"""# The SuperLink's Fleet API for the sites, nothing else (written by `fedtail deploy proxy`).
# Run: nginx -p {state} -c {state / PROXY_CONFIG}
daemon off;
worker_processes 1;
pid {state / "nginx.pid"};
error_log {state / "error.log"} warn;
events {{
    worker_connections 1024;
}}
http {{
    access_log {state / "access.log"};
    client_body_temp_path {state / "tmp-body"};
    proxy_temp_path {state / "tmp-proxy"};
    fastcgi_temp_path {state / "tmp-fastcgi"};
    uwsgi_temp_path {state / "tmp-uwsgi"};
    scgi_temp_path {state / "tmp-scgi"};
    server_tokens off;
    upstream superlink {{
        server 127.0.0.1:{self.superlink_port};  # the SuperLink, bound to loopback
        keepalive 16;
    }}
    server {{
        listen {self.listen} ssl;
        ssl_certificate {certificates / SERVER_CERT};
        ssl_certificate_key {certificates / SERVER_KEY};
        ssl_protocols TLSv1.2 TLSv1.3;
        client_max_body_size 2g;  # Flower's gRPC message limit: a packed message carries the whole model
        location ~ ^/v1/fleet/({calls})$ {{
            limit_except POST {{ deny all; }}
            proxy_pass https://superlink$uri;  # the path matched above, normalised; no query string
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {certificates / CA_CERT};
            proxy_ssl_name {UPSTREAM_NAME};
            proxy_ssl_server_name on;
            proxy_request_buffering off;
            proxy_buffering off;
        }}
        location / {{
            return 404;  # the Control and Runtime APIs, the SuperLink's health and API docs: not for sites
        }}
    }}
}}
"""

    def write(self) -> Path:
        """The config file, in ``state`` (refused if one is there: it may be a running proxy's)."""
        for name in (SERVER_CERT, SERVER_KEY, CA_CERT):
            if not (self.certificates / name).exists():
                raise ConfigError(f"{self.certificates / name} not found; write it with `fedtail deploy certs`")
        self.state.mkdir(parents=True, exist_ok=True)
        path = self.state / PROXY_CONFIG
        if path.exists():
            raise ConfigError(f"refusing to overwrite {path}; move it away or choose another --out")
        path.write_text(self.config(), encoding="utf-8")
        return path


def nginx_executable() -> str:
    """nginx, often in a folder outside a user's PATH (Debian: /usr/sbin)."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    found = shutil.which("nginx", path=search)
    if not found:
        raise ConfigError(
            "nginx not found: sites reach the SuperLink's Fleet API through it (docs/deploy.md); install it "
            "(Debian, Ubuntu: apt-get install nginx)"
        )
    return found


def start_nginx(proxy: FleetProxy, log: Path, timeout_s: float = 30) -> subprocess.Popen[bytes]:
    """nginx in the foreground with ``proxy``'s config (written here), once it runs (for tests and benchmarks)."""
    nginx = nginx_executable()
    config = proxy.write()
    with log.open("ab") as output:
        process = subprocess.Popen(
            [nginx, "-p", str(proxy.state.resolve()), "-c", str(config.resolve())],
            stdout=output, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent,
        )
    pid_file = proxy.state / "nginx.pid"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(encoding="utf-8", errors="replace")[-2000:]
            raise FlowerFailed(f"nginx exited with code {process.returncode}; see {log}\n{tail}")
        if pid_file.exists():
            return process
        time.sleep(0.1)
    raise FlowerFailed(f"nginx did not start in {timeout_s:.0f}s; see {log}")
