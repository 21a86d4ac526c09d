"""Names of the files in a run folder, shared by the server that writes them and the auditor that reads them."""

from __future__ import annotations

from pathlib import Path

RUN_FILE = "run.json"
ROUNDS_FILE = "rounds.jsonl"
SUMMARY_FILE = "summary.json"
GLOBAL_MODEL_FILE = "global_model.pt"
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
