"""TLS certificates for the coordinator and authentication keys for sites, in the formats Flower reads.

- ``write_certificates``: a private CA (``ca.crt``, ``ca.key``) and a server
  certificate signed by it (``server.pem``, ``server.key``) for the host names
  and IP addresses the SuperLink is reached at. The coordinator keeps
  ``ca.key``; sites receive ``ca.crt`` only, to verify the SuperLink.
- ``write_site_keys``: a site's SuperNode key pair, NIST P-384 in OpenSSH
  format (``<name>``, ``<name>.pub``), which ``flower-supernode
  --auth-supernode-private-key`` and ``flwr supernode register`` read. The
  site keeps the private key; the coordinator registers the public one.

Existing files are never overwritten: a lost CA key or site key cannot be
recovered, and silently replacing one would lock sites out.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import ConfigError

CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.crt", "ca.key", "server.pem", "server.key"


def _refuse_existing(paths: Sequence[Path]) -> None:
    existing = [str(path) for path in paths if path.exists()]
    if existing:
        raise ConfigError(f"refusing to overwrite {', '.join(existing)}; move them away or choose another --out")


def _write_private(path: Path, data: bytes) -> None:
    """Created readable by its owner only, before any byte of the key is written."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)


def _subject_alternative_names(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not host or any(c.isspace() for c in host):
                raise ConfigError(f"'{host}' is neither an IP address nor a host name") from None
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def write_certificates(out_dir: Path, hosts: Sequence[str], days: int = 365) -> dict[str, Path]:
    """A CA and a server certificate for ``hosts`` (names and IPs the SuperLink is reached at)."""
    if not hosts:
        raise ConfigError("give at least one host name or IP address the SuperLink is reached at")
    if days < 1:
        raise ConfigError(f"days={days}: a certificate must be valid for at least a day")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY)}
    _refuse_existing(list(paths.values()))
    alternative_names = _subject_alternative_names(hosts)
    now = datetime.datetime.now(datetime.timezone.utc)
    valid_from, valid_to = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedtail coordinator CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from)
        .not_valid_after(valid_to)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # certificate and CRL signing only
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from)
        .not_valid_after(valid_to)
        .add_extension(alternative_names, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    private_format = serialization.PrivateFormat.PKCS8
    _write_private(paths[CA_KEY], ca_key.private_bytes(pem, private_format, serialization.NoEncryption()))
    _write_private(paths[SERVER_KEY], server_key.private_bytes(pem, private_format, serialization.NoEncryption()))
    paths[CA_CERT].write_bytes(ca_cert.public_bytes(pem))
    paths[SERVER_CERT].write_bytes(server_cert.public_bytes(pem))
    return paths


def write_site_keys(out_dir: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode authentication key pair: (private key, public key)."""
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"key name '{name}' must be a plain file name")
    out_dir.mkdir(parents=True, exist_ok=True)
    private_path, public_path = out_dir / name, out_dir / f"{name}.pub"
    _refuse_existing([private_path, public_path])
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(
        private_path,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    public_path.write_bytes(public + b"\n")
    return private_path, public_path
