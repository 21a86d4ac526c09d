"""``fedtail deploy``: what a real federation is set up with: certificates, the Fleet proxy, the public catalogue, site
keys, the site check, bundle hashes."""

from __future__ import annotations

import argparse
from pathlib import Path

import tomli

from client.check import check_site
from common.data.catalog import Catalog
from common.data.datasets import load_dataset
from common.errors import ConfigError
from common.federation import RunSettings
from common.flower.runtime import bundle_sha256
from common.recommender.model import ModelOptions
from common.utils.processes import APP_DIR
from simulations.credentials import CA_CERT, CA_KEY, write_certificates, write_site_keys
from simulations.fleet_proxy import LOOPBACK_HOSTS, PROXY_CONFIG, FleetProxy

EXIT_SITE_NOT_READY = 1


def add_deploy_commands(deploy: argparse.ArgumentParser) -> None:
    deploy_commands = deploy.add_subparsers(dest="deploy_command", required=True)
    certs = deploy_commands.add_parser("certs", help="(coordinator) a CA and the SuperLink's TLS certificate")
    certs.add_argument("--out", required=True, help="folder for ca.crt, ca.key, server.pem, server.key")
    certs.add_argument("--host", action="append", required=True,
                       help="a host name or IP address sites reach the coordinator at (repeatable); the "
                       f"certificate also covers {' and '.join(LOOPBACK_HOSTS)}, where the coordinator's own "
                       "programs reach the SuperLink")
    certs.add_argument("--days", type=int, default=365, help="validity")
    certs.set_defaults(handler=_deploy_certs)
    catalog = deploy_commands.add_parser(
        "catalog", help="(coordinator) the public catalogue every site holds, and its fingerprint to publish"
    )
    source = catalog.add_mutually_exclusive_group(required=True)
    source.add_argument("--items", help="the public product list: a text file with one item id per line")
    source.add_argument("--dataset", help="public interaction data whose items make the catalogue (e.g. "
                        "'synthetic' for a trial federation); never a site's private data")
    catalog.add_argument("--out", required=True, help="the catalogue file to write (catalog.json); an existing "
                         "different catalogue is never overwritten")
    catalog.set_defaults(handler=_deploy_catalog)
    proxy = deploy_commands.add_parser(
        "proxy", help="(coordinator) the nginx config through which sites reach the SuperLink's Fleet API only"
    )
    proxy.add_argument("--out", required=True, help=f"folder for {PROXY_CONFIG} and nginx's own files")
    proxy.add_argument("--certs", required=True, help="the folder of `fedtail deploy certs`")
    proxy.add_argument("--listen", default="0.0.0.0:9092", help="the public address the sites are given")
    proxy.add_argument("--superlink-port", type=int, default=9093,
                       help="the port of the SuperLink (flower-superlink --host 127.0.0.1 --port PORT)")
    proxy.set_defaults(handler=_deploy_proxy)
    keys = deploy_commands.add_parser("keys", help="(site) the SuperNode's authentication key pair")
    keys.add_argument("--out", required=True, help="folder for NAME (private, stays here) and NAME.pub (to send)")
    keys.add_argument("--name", required=True, help="file name, e.g. the site id")
    keys.set_defaults(handler=_deploy_keys)
    check = deploy_commands.add_parser("check", help="(site) check data, catalogue, budget and device before joining")
    check.add_argument("--data", required=True, help="the site's interaction file (node config data-path)")
    check.add_argument("--catalog", required=True, help="the coordinator's catalog.json (node config catalog-path)")
    check.add_argument("--ledger-dir", required=True, help="where this site's privacy ledger lives (node config)")
    check.add_argument("--max-epsilon", type=float, required=True, help="this site's budget (node config)")
    check.add_argument("--site-id", default=None, help="node config site-id (default: the data file's name)")
    check.add_argument("--delta", type=float, default=RunSettings().delta, help="the federation's delta")
    check.add_argument("--max-len", type=int, default=ModelOptions().max_len,
                       help="the run's max-len: users need two items within it to train")
    check.set_defaults(handler=_deploy_check)
    bundle = deploy_commands.add_parser(
        "bundle-hash", help="(site) the sha256 of an app bundle, as `python -m client.runtime --approve` takes it"
    )
    bundle.add_argument("path", nargs="?", default=None,
                        help="an app folder (the bundle `flwr run FOLDER` uploads) or a .fab file (default: the "
                        "current folder when it is a Flower app, as `flwr run .` there would upload it; else the "
                        "installed fedtail, which the runtime approves by itself)")
    bundle.set_defaults(handler=_deploy_bundle_hash)


def _deploy_certs(args: argparse.Namespace) -> int:
    hosts = [*args.host, *(host for host in LOOPBACK_HOSTS if host not in args.host)]
    paths = write_certificates(Path(args.out), hosts, args.days)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    print(f"keep {paths[CA_KEY]} on this machine only; give sites {paths[CA_CERT]}")
    return 0


def _deploy_catalog(args: argparse.Namespace) -> int:
    catalog = Catalog.from_item_list(args.items) if args.items else load_dataset(args.dataset).catalog()
    catalog.publish(args.out)
    print(f"catalogue {args.out}: {catalog.num_items} items, version {catalog.version}")
    print(f"fingerprint {catalog.fingerprint()}")
    print("publish the file and this fingerprint to every site (the sha256 of the item ids in index order, also in "
          "the file's \"fingerprint\" field; not the sha256sum of the file): `fedtail deploy check` prints the "
          "first 16 digits of the one a site holds")
    return 0


def _deploy_proxy(args: argparse.Namespace) -> int:
    proxy = FleetProxy(args.listen, args.superlink_port, Path(args.certs), Path(args.out))
    config = proxy.write()
    print(f"wrote {config}; run it with: nginx -p {proxy.state.resolve()} -c {config.resolve()}")
    print(f"sites reach {args.listen} (the Fleet API only); keep port {args.superlink_port} closed to the network")
    return 0


def _deploy_keys(args: argparse.Namespace) -> int:
    private, public = write_site_keys(Path(args.out), args.name)
    print(f"wrote {private} (keep it here: flower-supernode --auth-supernode-private-key {private})")
    print(f"wrote {public} (send it to the coordinator: flwr supernode register {public.name})")
    return 0


def _deploy_check(args: argparse.Namespace) -> int:
    check = check_site(Path(args.data), Path(args.catalog), Path(args.ledger_dir), args.max_epsilon, args.delta,
                       args.max_len, args.site_id)
    print(check.format())
    return 0 if check.ready else EXIT_SITE_NOT_READY


def default_bundle_folder(here: Path) -> Path:
    """The folder ``bundle-hash`` hashes when given none: ``here`` if it is a Flower app (what ``flwr run .`` would
    upload from it), else the installed fedtail (what the site's runtime approves by itself)."""
    pyproject = here / "pyproject.toml"
    try:
        declared = tomli.loads(pyproject.read_text(encoding="utf-8")) if pyproject.is_file() else {}
    except (tomli.TOMLDecodeError, OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{pyproject}: cannot read it: {error}") from None
    return here if "app" in declared.get("tool", {}).get("flwr", {}) else APP_DIR


def _deploy_bundle_hash(args: argparse.Namespace) -> int:
    print(bundle_sha256(Path(args.path) if args.path else default_bundle_folder(Path.cwd())))
    return 0
