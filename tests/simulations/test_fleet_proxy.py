"""The coordinator's public address forwards the SuperLink's Fleet API and nothing else (``simulations.fleet_proxy``).

The proxy's effect on real processes is tested in ``tests/deploy`` (slow): an outsider holding ca.crt cannot list,
register or submit there. These fast tests pin the parts that can drift: the calls it forwards against the installed
Flower's routes, and what ``fedtail deploy certs`` and ``fedtail deploy proxy`` write.
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from fastapi.routing import iter_route_contexts
from flwr.superlink.main import create_app

from common.errors import ConfigError
from simulations.cli import main
from simulations.credentials import SERVER_CERT
from simulations.fleet_proxy import FLEET_CALLS, PROXY_CONFIG, FleetProxy, nginx_executable


def test_the_proxy_forwards_exactly_the_fleet_api_of_the_installed_flower(tmp_path: Path) -> None:
    """Every path the SuperLink serves, through the proxy's own location pattern: only the Fleet API's calls pass.
    A Flower release that adds a Fleet call, or moves one, fails here rather than at the sites."""
    served = {context.path for context in iter_route_contexts(create_app().routes)}
    config = FleetProxy("0.0.0.0:9092", 9093, tmp_path, tmp_path).config()
    [pattern] = re.findall(r"location ~ (\S+) \{", config)
    forwarded = {path for path in served if re.fullmatch(pattern, path)}
    assert forwarded == {path for path in served if path.startswith("/v1/fleet/")}
    assert forwarded == {f"/v1/fleet/{call}" for call in FLEET_CALLS}
    assert {"/v1/control/list-runs", "/v1/control/register-node", "/v1/control/start-run", "/v1/runtime/get-nodes",
            "/health", "/docs"} <= served - forwarded, "what the proxy keeps out"


def test_deploy_certs_and_proxy_write_what_the_coordinator_runs(tmp_path: Path) -> None:
    certs, state = tmp_path / "certs", tmp_path / "proxy"
    assert main(["deploy", "certs", "--out", str(certs), "--host", "coordinator.example.org"]) == 0
    names = x509.load_pem_x509_certificate((certs / SERVER_CERT).read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["coordinator.example.org", "localhost"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert main(["deploy", "proxy", "--out", str(state), "--certs", str(certs), "--superlink-port", "9400"]) == 0
    config = (state / PROXY_CONFIG).read_text()
    assert "listen 0.0.0.0:9092 ssl;" in config and "server 127.0.0.1:9400;" in config
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        FleetProxy("0.0.0.0:9092", 9400, certs, state).write()
    with pytest.raises(ConfigError, match="deploy certs"):
        FleetProxy("0.0.0.0:9092", 9400, tmp_path / "no-certs", tmp_path / "other").write()
    if shutil.which("nginx", path="/usr/sbin:/usr/local/sbin:/usr/bin") is None:
        pytest.skip("nginx is not installed (.ci/install installs it): its syntax check is left out")
    checked = subprocess.run([nginx_executable(), "-t", "-p", str(state), "-c", str(state / PROXY_CONFIG)],
                             capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stderr
