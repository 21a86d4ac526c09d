"""Names of the files in a run folder, shared by the server that writes them and the auditor that reads them."""

from __future__ import annotations

from pathlib import Path

RUN_FILE = "run.json"
ROUNDS_FILE = "rounds.jsonl"
SUMMARY_FILE = "summary.json"
GLOBAL_MODEL_FILE = "global_model.pt"
CHECKPOINT_FILE = "checkpoint.pt"
FLOWER_LOG_FILE = "flower.log"
ROUND_PLOT_FILE = "rounds.svg"
LEDGER_DIR = "ledgers"


def site_ledger(ledger_dir: Path, site_id: str) -> Path:
    return ledger_dir / f"site-{site_id}.jsonl"
