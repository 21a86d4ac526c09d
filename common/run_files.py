"""A run folder's files: their names, shared by the server that writes them and the auditor that reads them, and
the run record (``run.json``) that pins what a resumed run must keep.

``run.json`` holds the run's id (sites key their ledger lines by it). When ``fedtail simulate`` started the run it
also holds, written before Flower starts, everything that decides who is at which site and how they are trained::

    {"run_id": "<hex>",
     "settings": {<the run config, as RunSettings.to_run_config() gives it>},
     "sites": <the number of simulated sites>,
     "partition_sha256": "<every user's site and history, hashed (client.shard.simulated_partition_sha256)>"}

A run that `flwr run` started directly has the run id alone; its ServerApp's checkpoint check is what guards it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common.errors import ConfigError, DataError
from common.files import write_json

RUN_FILE = "run.json"
ROUNDS_FILE = "rounds.jsonl"
SUMMARY_FILE = "summary.json"
GLOBAL_MODEL_FILE = "global_model.pt"
CHECKPOINT_FILE = "checkpoint.pt"
FLOWER_LOG_FILE = "flower.log"
ROUND_PLOT_FILE = "rounds.svg"
LEDGER_DIR = "ledgers"


LEDGER_PREFIX, LEDGER_SUFFIX = "site-", ".jsonl"


def site_ledger(ledger_dir: Path, site_id: str) -> Path:
    return ledger_dir / f"{LEDGER_PREFIX}{site_id}{LEDGER_SUFFIX}"


def ledger_site(path: Path) -> str | None:
    """The site a ledger's file name names (None for another name): the inverse of ``site_ledger``."""
    name = path.name
    if not (name.startswith(LEDGER_PREFIX) and name.endswith(LEDGER_SUFFIX)):
        return None
    return name[len(LEDGER_PREFIX) : -len(LEDGER_SUFFIX)]


@dataclass(frozen=True)
class RunRecord:
    """``run.json``: the run's id and, for a simulation, the settings, sites and partition it was started with."""

    run_id: str
    settings: dict[str, Any] | None = None
    sites: int | None = None
    partition_sha256: str | None = None

    @classmethod
    def new(cls, settings: dict[str, Any] | None = None, sites: int | None = None,
            partition_sha256: str | None = None) -> RunRecord:
        return cls(uuid.uuid4().hex, settings, sites, partition_sha256)

    def pinned(self) -> dict[str, Any]:
        """The run config and the number of sites, compared as one mapping on resume."""
        return {**(self.settings or {}), "sites": self.sites}


def read_run_record(out_dir: Path) -> RunRecord | None:
    """The folder's run record, or None for a folder no run has started in."""
    path = out_dir / RUN_FILE
    if not path.exists():
        return None
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        run_id = str(payload["run_id"])
    except (json.JSONDecodeError, KeyError, TypeError):
        raise DataError("not a fedtail run record (expected a JSON object with a run_id)", path) from None
    return RunRecord(run_id, payload.get("settings"), payload.get("sites"), payload.get("partition_sha256"))


def write_run_record(out_dir: Path, record: RunRecord) -> None:
    write_json(out_dir / RUN_FILE, {key: value for key, value in asdict(record).items() if value is not None})


def check_same_settings(out_dir: Path, saved: Mapping[str, Any], now: Mapping[str, Any]) -> None:
    """Refuse to continue the run in ``out_dir`` with other settings, naming every one that differs, in one line."""
    keys = [*now, *(key for key in saved if key not in now)]
    differences = [f"{key} {saved.get(key)!r} (saved) vs {now.get(key)!r} (now)"
                   for key in keys if saved.get(key) != now.get(key)]
    if differences:
        raise ConfigError(
            f"{out_dir} holds a run with other settings: {', '.join(differences)}; "
            "resume with the same settings or use another --out"
        )
