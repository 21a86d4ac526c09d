"""Reading one site ledger as an auditor: every line checked, its hash chain, its fields, its rounds, its own epsilon.

The auditor trusts no line's claim: each line's epsilon so far is recomputed
by a fresh accountant over the lines up to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.privacy.accounting import ACCOUNTANTS, LEGACY_ACCOUNTANT, MechanismStep, epsilon_from_history
from common.privacy.ledger import (
    GENESIS_HASH,
    LEDGER_FORMAT,
    LEDGER_FORMATS,
    NONCE_BYTES,
    UNSALTED_FORMAT,
    LedgerLine,
    scan,
)
from common.privacy.mechanisms import PLACEMENTS
from common.run_files import ledger_site
from simulations.audit.findings import Finding, exceeds

REQUIRED_FIELDS: dict[str, tuple[type, ...]] = {
    "run_id": (str,),
    "round": (int,),
    "site": (str,),
    "sample_rate": (float, int),
    "noise_multiplier": (float, int),
    "max_grad_norm": (float, int),
    "steps": (int,),
    "delta": (float,),
    "epsilon_so_far": (float, int),
}


@dataclass(frozen=True)
class Entry:
    where: str
    number: int
    line_hash: str
    data: dict[str, Any]

    @property
    def step(self) -> MechanismStep:
        return (float(self.data["noise_multiplier"]), float(self.data["sample_rate"]), int(self.data["steps"]))

    @property
    def accountant(self) -> str:
        """The accountant the site spent with: the line's own, or RDP for a line written before lines named one."""
        return str(self.data.get("accountant", LEGACY_ACCOUNTANT))


@dataclass
class LedgerFile:
    """One ledger as the audit read it: its usable entries, and every line's hash (what a recorded head names)."""

    path: Path
    entries: list[Entry]
    hashes: list[str]
    witnessed_lines: int = 0
    """Lines 1..this matched a head (count and hash) that a coordinator recorded."""
    counted_lines: int = 0
    """Lines 1..this were present as a recorded head's count said, their content unchecked (no hash published)."""
    records: int = 0
    """Coordinator records given that could witness this ledger."""
    heads: int = 0
    """Heads of its site that those records hold."""
    contradicted: bool = False
    """A recorded head did not match: the findings say where, and nothing of this ledger counts as witnessed."""

    @property
    def site(self) -> str | None:
        """The site the lines name, else the one the file name names (an empty ledger can still be cut off)."""
        return str(self.entries[0].data["site"]) if self.entries else ledger_site(self.path)


def check_chain(path: Path) -> tuple[LedgerFile, list[Finding]]:
    """Every usable line of one ledger, and every break in it, said precisely."""
    try:
        lines = scan(path)
    except (OSError, UnicodeDecodeError) as error:
        return LedgerFile(path, [], []), [Finding("error", str(path), f"cannot read the ledger: {error}")]
    findings: list[Finding] = []
    hash_to_line = {line.hash: line.number for line in lines}
    entries: list[Entry] = []
    for line in lines:
        where = f"{path}:{line.number}"
        if line.problem.startswith("hash chain broken"):
            findings.append(Finding("error", where, _describe_break(line, hash_to_line)))
        elif line.problem:
            findings.append(Finding("error", where, line.problem))
            continue
        problems = _field_problems(line.entry)
        if problems:
            findings.append(Finding("error", where, "; ".join(problems)))
            continue
        entries.append(Entry(where, line.number, line.hash, line.entry))
    if not lines:
        findings.append(Finding("warning", str(path), "the ledger is empty: this site spent nothing"))
    unsalted = [entry.number for entry in entries if entry.data["format"] == UNSALTED_FORMAT]
    if unsalted:
        findings.append(
            Finding(
                "note",
                str(path),
                f"{len(unsalted)} line(s) in the older format {UNSALTED_FORMAT} (lines {unsalted[0]}-{unsalted[-1]}) "
                "carry no secret nonce: audited all the same; while one of them was the last line, the site withheld "
                "its head's hash, so a coordinator's record of that time checks the line count only",
            )
        )
    return LedgerFile(path, entries, [line.hash for line in lines]), findings


def _describe_break(line: LedgerLine, hash_to_line: dict[str, int]) -> str:
    claimed = line.entry.get("prev_hash")
    follows = hash_to_line.get(str(claimed)) if claimed != GENESIS_HASH else 0
    if follows is None:
        if line.number == 1:
            return "hash chain broken: the first line does not start a ledger (lines before it were removed)"
        return (
            f"hash chain broken: line {line.number - 1} was edited after it was written, or lines between "
            f"{line.number - 1} and {line.number} were removed"
        )
    if follows == 0:
        return f"hash chain broken: line {line.number} claims to be the first line (lines were moved or inserted)"
    if follows < line.number - 1:
        return (
            f"hash chain broken: line {line.number} was written right after line {follows}; "
            f"lines {follows + 1}-{line.number - 1} were inserted or moved here"
        )
    return f"hash chain broken: line {line.number} was written after line {follows}: lines are out of order"


def _field_problems(entry: dict[str, Any]) -> list[str]:
    problems = [
        f"field '{name}' is missing or not {'/'.join(t.__name__ for t in types)}"
        for name, types in REQUIRED_FIELDS.items()
        if not isinstance(entry.get(name), types) or isinstance(entry.get(name), bool)
    ]
    if problems:
        return problems
    if entry.get("format") not in LEDGER_FORMATS:
        problems.append(f"format {entry.get('format')!r} is not one of {', '.join(LEDGER_FORMATS)}")
    elif entry["format"] == LEDGER_FORMAT and not _is_nonce(entry.get("nonce")):
        problems.append(f"field 'nonce' is missing or not {2 * NONCE_BYTES} hex digits ({LEDGER_FORMAT} needs one)")
    if not 0 < entry["sample_rate"] <= 1:
        problems.append(f"sample_rate {entry['sample_rate']} is not in (0, 1]")
    if entry["noise_multiplier"] <= 0:
        problems.append(f"noise_multiplier {entry['noise_multiplier']} is not positive (no DP)")
    if entry["steps"] < 1:
        problems.append(f"steps {entry['steps']} is not positive")
    if not 0 < entry["delta"] < 1:
        problems.append(f"delta {entry['delta']} is not in (0, 1)")
    if entry.get("accountant", LEGACY_ACCOUNTANT) not in ACCOUNTANTS:
        problems.append(f"accountant {entry['accountant']!r} is not one of {', '.join(ACCOUNTANTS)}")
    if entry.get("sampling", "poisson") != "poisson":
        problems.append(f"sampling {entry.get('sampling')!r}: only Poisson sampling is accounted here")
    if entry.get("noise_placement", "site") not in PLACEMENTS:
        problems.append(
            f"noise placement {entry.get('noise_placement')!r} is not one fedtail accounts "
            f"({', '.join(PLACEMENTS)})"
        )
    if entry.get("privacy_unit", "user") != "user":
        problems.append(f"privacy unit {entry.get('privacy_unit')!r}: fedtail's guarantee is per user")
    return problems


def _is_nonce(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 2 * NONCE_BYTES and all(c in "0123456789abcdef" for c in value)


def check_rounds(entries: Sequence[Entry]) -> list[Finding]:
    """Within each run, rounds must strictly increase; gaps are rounds the site did not train (noted)."""
    findings: list[Finding] = []
    last: dict[str, Entry] = {}
    for entry in entries:
        run_id, number = entry.data["run_id"], entry.data["round"]
        previous = last.get(run_id)
        if previous is not None:
            before = previous.data["round"]
            if number == before:
                findings.append(
                    Finding(
                        "error", entry.where, f"round {number} of run {run_id} recorded twice (also {previous.where})"
                    )
                )
            elif number < before:
                findings.append(
                    Finding(
                        "error", entry.where, f"round {number} of run {run_id} comes after round {before}: out of order"
                    )
                )
            elif number > before + 1:
                findings.append(
                    Finding(
                        "note",
                        entry.where,
                        f"run {run_id}: no line for round(s) {before + 1}-{number - 1} (not sampled, declined or "
                        "failed there; a run folder's rounds.jsonl confirms which)",
                    )
                )
        last[run_id] = entry
    return findings


def check_recorded_epsilons(entries: Sequence[Entry]) -> list[Finding]:
    """Each line's claimed epsilon so far against a fresh accountant over the lines up to it (same accountant)."""
    findings: list[Finding] = []
    history: list[MechanismStep] = []
    for entry in entries:
        history.append(entry.step)
        claimed = float(entry.data["epsilon_so_far"])
        recomputed = epsilon_from_history(history, float(entry.data["delta"]), entry.accountant)
        if exceeds(recomputed, claimed):
            findings.append(
                Finding(
                    "error",
                    entry.where,
                    f"epsilon UNDERSTATED: the line claims {claimed:.4f} so far, a fresh {entry.accountant} "
                    f"accountant over lines 1..here gives {recomputed:.4f}",
                )
            )
        elif exceeds(claimed, recomputed):
            findings.append(
                Finding(
                    "warning",
                    entry.where,
                    f"the line claims epsilon {claimed:.4f} so far, recomputation gives only {recomputed:.4f} "
                    "(overstated: safe, but the ledger does not match its own mechanism)",
                )
            )
    return findings
