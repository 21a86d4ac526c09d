"""Certificates and site keys in the formats Flower reads; nothing existing is ever overwritten."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from common.errors import ConfigError
from simulations.credentials import CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, write_certificates, write_site_keys


def test_the_server_certificate_is_signed_by_the_ca_for_exactly_the_given_hosts(tmp_path: Path) -> None:
    paths = write_certificates(tmp_path, ["coordinator.example.org", "203.0.113.5"])
    ca = x509.load_pem_x509_certificate(paths[CA_CERT].read_bytes())
    server = x509.load_pem_x509_certificate(paths[SERVER_CERT].read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["coordinator.example.org"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("203.0.113.5")]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for key in (paths[CA_KEY], paths[SERVER_KEY]):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, f"{key.name} must be readable by its owner only"


def test_site_keys_are_p384_openssh_as_flower_reads_them(tmp_path: Path) -> None:
    private, public = write_site_keys(tmp_path, "north")
    private_key = load_ssh_private_key(private.read_bytes(), None)
    public_key = load_ssh_public_key(public.read_bytes())
    assert isinstance(private_key, ec.EllipticCurvePrivateKey) and private_key.curve.name == "secp384r1"
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert private_key.public_key().public_numbers() == public_key.public_numbers()
    assert stat.S_IMODE(private.stat().st_mode) == 0o600


def test_existing_credentials_are_never_overwritten(tmp_path: Path) -> None:
    paths = write_certificates(tmp_path, ["127.0.0.1"])
    before = paths[CA_KEY].read_bytes()
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        write_certificates(tmp_path, ["127.0.0.1"])
    assert paths[CA_KEY].read_bytes() == before
    write_site_keys(tmp_path, "north")
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        write_site_keys(tmp_path, "north")


@pytest.mark.parametrize("hosts, message", [([], "at least one host"), (["bad host"], "neither an IP")])
def test_bad_hosts_are_named(tmp_path: Path, hosts: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        write_certificates(tmp_path, hosts)
    assert not (tmp_path / CA_KEY).exists()
