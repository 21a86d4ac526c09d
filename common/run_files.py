"""A run folder's files and formats: their names, the run record (``run.json``) that pins what a resumed run must
keep, and the round record (one line of ``rounds.jsonl``), shared by the server that writes them and the auditor and
benchmarks that read them.

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
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.errors import ConfigError, DataError
from common.utils.files import write_json

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


REMOVED_SETTINGS: dict[str, Any] = {"iterate-average-decay": 0.0}
"""Settings a run folder may still hold from an earlier version, with the value that meant "off": a saved run
with that value resumes as if the setting had never existed (any other value is a difference, refused)."""


def check_same_settings(out_dir: Path, saved: Mapping[str, Any], now: Mapping[str, Any]) -> None:
    """Refuse to continue the run in ``out_dir`` with other settings, naming every one that differs, in one line."""
    saved = {key: value for key, value in saved.items()
             if not (key in REMOVED_SETTINGS and key not in now and value == REMOVED_SETTINGS[key])}
    keys = [*now, *(key for key in saved if key not in now)]
    differences = [f"{key} {saved.get(key)!r} (saved) vs {now.get(key)!r} (now)"
                   for key in keys if saved.get(key) != now.get(key)]
    if differences:
        raise ConfigError(
            f"{out_dir} holds a run with other settings: {', '.join(differences)}; "
            "resume with the same settings or use another --out"
        )


def site_order(site: str) -> tuple[int, int, str]:
    """Sort key for site ids: numbered sites in numeric order, then named ones, whatever the mix."""
    return (0, int(site), "") if site.isdigit() else (1, 0, site)


@dataclass(frozen=True)
class RoundRecord:
    """One line of ``rounds.jsonl``: what the coordinator saw in one finished round.

    Sites are named by their ids. ``site_epsilon`` is every site's epsilon as
    last reported (the sites' own accounting), ``site_ledger_head`` each
    replying site's ledger head (``lines``, ``hash``), which the audit compares
    with the site's ledger. Lines written before a field existed read with its
    default.
    """

    round: int
    run_id: str | None = None
    valid: dict[str, float] | None = None
    """Validation metrics of the round's global model (None: the coordinator holds no held-out users)."""
    sites_trained: list[str] = field(default_factory=list)
    sites_declined: dict[str, str] = field(default_factory=dict)
    """Declining site -> its reason."""
    failures: list[str] = field(default_factory=list)
    """Each failed site's error, as its reply gave it, the site named first ("site <id>: ...", or "node <id>: ..."
    for a node that had not replied before)."""
    failed: str | None = None
    """Why the round failed and left the global model as it was (fewer sites trained than it needs); None when the
    round updated the model."""
    site_epsilon: dict[str, float] = field(default_factory=dict)
    site_ledger_head: dict[str, dict[str, Any]] = field(default_factory=dict)
    epsilon: float | None = None
    """The largest site epsilon (None without DP)."""
    seconds: float = 0.0
    evaluation_seconds: float = 0.0
    """The server's validation pass, included in ``seconds``."""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> RoundRecord:
        """Parse one line; raises ``ValueError`` naming what is wrong."""
        try:
            line = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"not JSON ({error.msg})") from None
        if not isinstance(line, dict) or "round" not in line:
            raise ValueError("not a round record (no 'round')")
        try:
            return cls(
                round=int(line["round"]),
                run_id=None if line.get("run_id") is None else str(line["run_id"]),
                valid=None if line.get("valid") is None else {str(k): float(v) for k, v in line["valid"].items()},
                sites_trained=[str(site) for site in line.get("sites_trained", [])],
                sites_declined={str(k): str(v) for k, v in dict(line.get("sites_declined", {})).items()},
                failures=[str(failure) for failure in line.get("failures", [])],
                failed=None if line.get("failed") is None else str(line["failed"]),
                site_epsilon={str(k): float(v) for k, v in dict(line.get("site_epsilon", {})).items()},
                site_ledger_head={str(k): dict(v) for k, v in dict(line.get("site_ledger_head") or {}).items()},
                epsilon=None if line.get("epsilon") is None else float(line["epsilon"]),
                seconds=float(line.get("seconds", 0.0)),
                evaluation_seconds=float(line.get("evaluation_seconds", 0.0)),
            )
        except (AttributeError, TypeError, ValueError) as error:
            raise ValueError(f"a field has the wrong type ({error})") from None


def append_round(out_dir: Path, record: RoundRecord) -> None:
    with (out_dir / ROUNDS_FILE).open("a", encoding="utf-8") as handle:
        handle.write(record.to_json() + "\n")


def round_lines(path: Path) -> Iterator[tuple[int, RoundRecord | None, str]]:
    """Every non-blank line of a ``rounds.jsonl`` as (line number, record or None, what is wrong with it)."""
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            yield number, RoundRecord.from_json(text), ""
        except ValueError as error:
            yield number, None, str(error)


def read_rounds(out_dir: Path, up_to: int | None = None) -> list[RoundRecord]:
    """The run folder's round records (up to round ``up_to``); a malformed line is an error naming it."""
    path = out_dir / ROUNDS_FILE
    if not path.exists():
        return []
    records = []
    for number, record, problem in round_lines(path):
        if record is None:
            raise DataError(problem, path, number)
        if up_to is None or record.round <= up_to:
            records.append(record)
    return records


def truncate_rounds(out_dir: Path, up_to: int) -> None:
    """Keep the lines of rounds up to ``up_to``: a run killed between its two writes redoes that round."""
    kept = read_rounds(out_dir, up_to)
    (out_dir / ROUNDS_FILE).write_text("".join(record.to_json() + "\n" for record in kept), encoding="utf-8")
