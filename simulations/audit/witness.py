"""The coordinator's record as an outside witness of the site ledgers.

A ledger alone cannot show that it was rewritten and re-hashed consistently,
or that its last lines were cut off. The coordinator's round records can: each
reply carries the site's ledger head (line count, hash of the last line) and the
coordinator writes it to ``rounds.jsonl``. Every ledger of a site a record names
must still hold, at the recorded count, the line with the recorded hash, and the
epsilon the site reported must be what its ledger recomputes to. What the given
records could not show is said, ledger by ledger (``not_verified``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import DataError
from common.privacy.accounting import epsilon_from_history
from common.privacy.ledger import UNSALTED_FORMAT
from common.run_files import (
    LEDGER_DIR,
    ROUNDS_FILE,
    RUN_FILE,
    SUMMARY_FILE,
    read_run_record,
    round_lines,
    site_ledger,
)
from simulations.audit.findings import Finding, exceeds
from simulations.audit.ledgers import LedgerFile


@dataclass(frozen=True)
class CoordinatorRecord:
    """A coordinator's per-round record of one run (its rounds.jsonl) and what its run folder says of the run."""

    rounds: Path
    run_id: str | None
    """From run.json beside it; a line's own ``run_id`` (recorded since ledger heads were) takes precedence."""
    model_selection: dict[str, Any] | None


def run_facts(folder: Path) -> tuple[str | None, bool, dict[str, Any] | None]:
    """A run folder's run id, whether it trained with DP, and how its model was selected (summary.json)."""
    record = read_run_record(folder)
    run_id = None if record is None else record.run_id
    privacy: dict[str, Any] = {}
    if (folder / SUMMARY_FILE).exists():
        privacy = json.loads((folder / SUMMARY_FILE).read_text(encoding="utf-8")).get("privacy", {})
    return run_id, bool(privacy.get("dp", True)), privacy.get("model_selection")


def coordinator_record(path: Path) -> CoordinatorRecord:
    """The coordinator's run folder, or its rounds.jsonl on its own (what a deployed site's officer is handed)."""
    folder, rounds = (path, path / ROUNDS_FILE) if path.is_dir() else (path.parent, path)
    if not rounds.is_file():
        raise DataError(f"no coordinator record here: give the coordinator's run folder or its {ROUNDS_FILE}", rounds)
    run_id, _, model_selection = run_facts(folder)
    return CoordinatorRecord(rounds, run_id, model_selection)


def check_against_coordinator(
    record: CoordinatorRecord, ledgers: Sequence[LedgerFile], every_site: bool
) -> list[Finding]:
    """The coordinator's round records against the ledgers of the sites they name.

    Catches cut-off last lines (fewer lines than a recorded head), a consistent
    rewrite (the line at a recorded count hashes otherwise), a round the
    coordinator saw a site train with no line for it, and an epsilon a site
    reported that its ledger no longer recomputes to. With ``every_site`` (a
    run folder, which holds every site's ledger) a named site without a ledger
    counts as an empty one; otherwise (a site's ledger given with the
    coordinator's record) the other sites are left out, and a note says so.
    """
    findings: list[Finding] = []
    by_site: dict[str, list[LedgerFile]] = {}
    for ledger in ledgers:
        if ledger.site is not None:
            by_site.setdefault(ledger.site, []).append(ledger)
            ledger.records += 1
    left_out: set[str] = set()
    path = record.rounds
    for number, line, problem in round_lines(path):
        where = f"{path}:{number}"
        if line is None:
            findings.append(Finding("error", where, f"unreadable round record ({problem})"))
            continue
        round_number, trained = line.round, set(line.sites_trained)
        epsilons, heads = line.site_epsilon, line.site_ledger_head
        run_id = line.run_id or record.run_id or ""
        if not run_id:
            findings.append(Finding("error", where, f"the round record names no run (no run_id, no {RUN_FILE} here)"))
            continue
        for site in sorted(trained | set(heads)):
            files = by_site.get(site, [])
            if not files and every_site:  # a run folder's ledger that is not there: as if every line was cut off
                files = [LedgerFile(site_ledger(path.parent / LEDGER_DIR, site), [], [])]
            elif not files:
                left_out.add(site)
            for ledger in files:
                reported = epsilons.get(site)
                findings += _check_site_round(
                    ledger, site, round_number, run_id, site in trained, heads.get(site),
                    None if reported is None else float(reported), where,
                )
    if left_out:
        findings.append(
            Finding(
                "note",
                str(path),
                f"the record also names site(s) {', '.join(sorted(left_out))}, whose ledgers were not given: "
                "not checked",
            )
        )
    return findings


def _check_site_round(
    ledger: LedgerFile,
    site: str,
    round_number: int,
    run_id: str,
    trained: bool,
    head: dict[str, Any] | None,
    reported: float | None,
    where: str,
) -> list[Finding]:
    """One site in one round record: its line for the round, its ledger head, and the epsilon it reported."""
    findings: list[Finding] = []
    round_lines = [e for e in ledger.entries if e.data["run_id"] == run_id and e.data["round"] == round_number]
    if trained and not round_lines:
        findings.append(
            Finding(
                "error",
                where,
                f"the server recorded site {site} training round {round_number} of run {run_id}, but the site's "
                "ledger has no line for it (removed?)",
            )
        )
    if head is None:  # a record from before heads were kept: only the round's own line can be compared
        if round_lines and reported is not None and exceeds(reported, float(round_lines[-1].data["epsilon_so_far"])):
            findings.append(
                Finding(
                    "error",
                    round_lines[-1].where,
                    f"the site reported epsilon {reported:.4f} to the server after round {round_number}; "
                    f"its ledger line claims only {float(round_lines[-1].data['epsilon_so_far']):.4f}",
                )
            )
        return findings
    ledger.heads += 1
    count, head_hash = int(head["lines"]), head.get("hash")
    if count > len(ledger.hashes):
        ledger.contradicted = True
        return findings + [
            Finding(
                "error",
                str(ledger.path),
                f"the coordinator recorded site {site}'s ledger at {count} lines after round {round_number} of run "
                f"{run_id} ({where}); it has only {len(ledger.hashes)}: its last lines were cut off",
            )
        ]
    if count and head_hash is not None and ledger.hashes[count - 1] != head_hash:
        ledger.contradicted = True
        return findings + [
            Finding(
                "error",
                f"{ledger.path}:{count}",
                f"not the line site {site} reported as its ledger head after round {round_number} of run {run_id} "
                f"(the hash differs from the one the coordinator recorded, {where}): the ledger was rewritten",
            )
        ]
    if head_hash is None:
        ledger.counted_lines = max(ledger.counted_lines, count)
    else:
        ledger.witnessed_lines = max(ledger.witnessed_lines, count)
    if reported is not None:
        findings += _check_reported_epsilon(ledger, site, round_number, count, reported, where)
    return findings


def _check_reported_epsilon(
    ledger: LedgerFile, site: str, round_number: int, count: int, reported: float, where: str
) -> list[Finding]:
    """The epsilon a site reported with a head against a fresh accountant over the ledger's lines up to that head."""
    entries = [e for e in ledger.entries if e.number <= count]
    if len(entries) < count:
        return []  # unusable lines below the head are errors already
    deltas = sorted({float(e.data["delta"]) for e in entries})
    if len(deltas) > 1:
        return [
            Finding("note", where, f"site {site}'s epsilon after round {round_number} is not compared with its ledger: "
                    f"lines 1-{count} use several deltas {deltas}")
        ]
    history = [e.step for e in entries]
    recomputed = epsilon_from_history(history, deltas[0], entries[-1].accountant) if entries else 0.0
    if exceeds(reported, recomputed):
        return [
            Finding(
                "error",
                f"{ledger.path}:{count}",
                f"site {site} reported epsilon {reported:.4f} to the coordinator after round {round_number} ({where}); "
                f"lines 1-{count} of its ledger now recompute to only {recomputed:.4f}: the ledger was rewritten",
            )
        ]
    if exceeds(recomputed, reported):
        return [
            Finding(
                "warning",
                where,
                f"site {site} reported epsilon {reported:.4f} after round {round_number}, but lines 1-{count} of its "
                f"ledger recompute to {recomputed:.4f}: the coordinator's record understates the site's spend",
            )
        ]
    return []


def not_verified(ledger: LedgerFile) -> str | None:
    """What the given coordinator records could not show about this ledger, in words; None when they cover it all
    or contradict it (then the findings say what is wrong)."""
    total, name = len(ledger.hashes), f"{ledger.path} (site {ledger.site})"
    if ledger.contradicted:
        return None
    if ledger.records == 0:
        return (
            f"{name}: audited alone, without the coordinator's record. A ledger rewritten and re-hashed consistently "
            "(fewer steps or more noise on a line, every hash recomputed), or with its last lines cut off, passes "
            "every check above. Audit it with the coordinator's record of each run (`fedtail audit LEDGER "
            "--coordinator RUN_FOLDER_OR_ROUNDS_JSONL`) to compare it with the ledger heads the site reported."
        )
    if ledger.heads == 0:
        return (
            f"{name}: the coordinator's record given holds no ledger head of this site (written before heads were "
            "recorded, or the site sent none): only that each round it was seen training has a line was checked; a "
            "consistent rewrite or cut-off last lines would not show."
        )
    parts = []
    if ledger.counted_lines > ledger.witnessed_lines:
        parts.append(
            f"lines {ledger.witnessed_lines + 1}-{ledger.counted_lines} were counted but not compared (the heads "
            f"recorded then carried no hash: lines in format {UNSALTED_FORMAT})"
        )
    covered = max(ledger.witnessed_lines, ledger.counted_lines)
    if covered < total:
        parts.append(
            f"lines {covered + 1}-{total} come after the last head the given records hold (later runs, or runs whose "
            "records were not given): a consistent rewrite of them, or cutting them off, would not show"
        )
    return f"{name}: " + "; ".join(parts) + "." if parts else None
