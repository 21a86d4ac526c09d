"""The privacy audit: what guarantee each user got, recomputed from the site ledgers.

An auditor must not trust the server, the training code, or the epsilon a
ledger line claims. So the audit re-reads every line, re-checks the hash
chain, re-derives each site's epsilon with three accountants (Opacus' RDP,
which the sites spend with; Opacus' PRV; Google's dp-accounting PLD, an
independent code base), and compares them with what was recorded.

A ledger alone cannot show that it was rewritten and re-hashed consistently,
or that its last lines were cut off. The coordinator's round records can:
each reply carries the site's ledger head (line count, hash of the last line)
and the coordinator writes it to ``rounds.jsonl``. Where such a record is given
(a run folder, or ``coordinator=``), every ledger of a site it names must still
hold, at the recorded count, the line with the recorded hash, and the epsilon the
site reported must be what its ledger recomputes to. Whatever the audit could not
check this way is listed in the report (``not_verified``), ledger by ledger.

Several run folders (or ledgers) of the same site are composed: the same users
trained again spend again.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant
from opacus.accountants import PRVAccountant

from common.errors import DataError
from common.utils.files import atomic_write_text, write_json
from common.privacy.ledger import GENESIS_HASH, LEDGER_FORMAT, LEDGER_FORMATS, NONCE_BYTES, UNSALTED_FORMAT, LedgerLine, scan
from common.utils.plot import Panel, Series, write_line_charts
from common.privacy.accounting import MechanismStep, delta_below_one_over_users, epsilon_from_history, model_selection_statement
from common.run_files import (
    LEDGER_DIR,
    ROUNDS_FILE,
    RUN_FILE,
    SUMMARY_FILE,
    ledger_site,
    read_run_record,
    round_lines,
    site_ledger,
    site_order,
)

RELATIVE_TOLERANCE = 0.02
"""Accountants differ by their numerics; 2% is far above that and far below any real understatement."""
ABSOLUTE_TOLERANCE = 1e-3
ACCOUNTANTS = ("opacus-rdp", "opacus-prv", "dp-accounting-pld")
SPENDING_ACCOUNTANT = "opacus-rdp"
PLD_DISCRETIZATION = 1e-3
PRV_COARSE_ERROR, PRV_FINEST_ERROR = 0.01, 1e-3
AUDIT_JSON, AUDIT_MARKDOWN, AUDIT_PLOT = "audit.json", "audit.md", "audit-epsilon.svg"

Severity = Literal["error", "warning", "note"]

REQUIRED_FIELDS: dict[str, tuple[type, ...]] = {
    "run_id": (str,),
    "round": (int,),
    "site": (str,),
    "sample_rate": (float, int),
    "noise_multiplier": (float, int),
    "max_grad_norm": (float, int),
    "steps": (int,),
    "delta": (float,),
    "accountant": (str,),
    "epsilon_so_far": (float, int),
}

NOT_COVERED = (
    "Releases that are not DP-SGD steps and so are not in any ledger: anything a site or the server published "
    "besides the trained weights (metrics, counts, logs). fedtail sites send only weights, public parameters and "
    "their epsilon; their FedAvg weights are declared or uniform, not user counts.",
    "Which rounds each site took part in, declined, or failed, and how long it took: visible to the server, not noised.",
    "Hyper-parameter tuning: every earlier run on the same users spends budget too. Only the runs and ledgers given "
    "to this audit are composed.",
    "A catalogue (item list) derived from private interactions. In simulation the catalogue is built from the whole "
    "dataset; a deployment should use a public catalogue.",
    "In simulation, the server's per-round validation and final test metrics are computed on held-out users' raw "
    "data: they are outside the guarantee (a deployment evaluates nothing on private data, or does it with DP).",
    "Users who appear at more than one site: the global guarantee assumes users are disjoint across sites.",
)

LIMITS = (
    "That the ledger lines describe the training that ran: epsilon is recomputed from the mechanism each line "
    "states (noise, sampling rate, steps). A site running other code than the fedtail it approved could write "
    "lines that do not match what it released.",
    "A coordinator's record is an outside witness only when the coordinator and the site are separate parties: one "
    "operator holding both (a simulation's run folder) can rewrite both consistently.",
)
"""What no check here can show, whatever is given: always listed under "Not verified"."""


@dataclass(frozen=True)
class Finding:
    severity: Severity
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity.upper()}: {self.where}: {self.message}"


@dataclass
class SiteAudit:
    site: str
    ledgers: list[str]
    runs: list[str]
    entries: int
    steps: int
    delta: float
    recorded_epsilon: float | None
    """The last line's own claim; None when several ledgers are composed (no single line claims the total)."""
    recomputed: dict[str, float | None]
    users: int | None
    mechanism: str
    """Noise multiplier, sampling rate and clipping norm over the site's lines (a range where they vary)."""
    epsilon_per_entry: list[float]
    """Recomputed (spending accountant) after each entry, in ledger order: the plot."""

    @property
    def epsilon(self) -> float:
        """The guarantee stated: what the sites' own accountant gives, never less than what was recorded."""
        recomputed = self.recomputed[SPENDING_ACCOUNTANT]
        candidates = [value for value in (recomputed, self.recorded_epsilon) if value is not None]
        return max(candidates, default=0.0)

    @property
    def delta_below_one_over_users(self) -> bool | None:
        return None if self.users is None else delta_below_one_over_users(self.users, self.delta)


@dataclass
class AuditReport:
    paths: list[str]
    coordinator: list[str]
    """Coordinator records given besides the paths (run folders among the paths are their own record)."""
    sites: dict[str, SiteAudit]
    findings: list[Finding]
    dp: bool
    not_covered: list[str] = field(default_factory=lambda: list(NOT_COVERED))
    not_verified: list[str] = field(default_factory=lambda: list(LIMITS))
    witnessed: bool = False
    """Every ledger was checked, through its last line, against a coordinator's record of its head."""

    @property
    def passed(self) -> bool:
        return not any(finding.severity == "error" for finding in self.findings)

    @property
    def epsilon(self) -> float | None:
        return max((site.epsilon for site in self.sites.values()), default=None)

    @property
    def delta(self) -> float | None:
        return max((site.delta for site in self.sites.values()), default=None)

    def as_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "dp": self.dp,
            "paths": self.paths,
            "coordinator": self.coordinator,
            "global": {
                "epsilon": self.epsilon,
                "delta": self.delta,
                "tier": tier(self.epsilon),
                "statement": global_statement(self),
            },
            "sites": {
                site_id: {
                    **asdict(site),
                    "epsilon": site.epsilon,
                    "tier": tier(site.epsilon),
                    "delta_below_one_over_users": site.delta_below_one_over_users,
                }
                for site_id, site in self.sites.items()
            },
            "findings": [asdict(finding) for finding in self.findings],
            "assumptions": assumptions(),
            "not_covered": self.not_covered,
            "not_verified": self.not_verified,
            "witnessed": self.witnessed,
            "tolerance": {"relative": RELATIVE_TOLERANCE, "absolute": ABSOLUTE_TOLERANCE},
            "versions": {name: version(name) for name in ("opacus", "dp-accounting")},
        }


def tier(epsilon: float | None) -> str:
    """Ponomareva et al. 2023 ("How to DP-fy ML"), section 5.2."""
    if epsilon is None:
        return "none: no DP guarantee"
    if epsilon <= 1:
        return "strong (epsilon <= 1)"
    if epsilon <= 10:
        return "reasonable (epsilon <= 10)"
    return "weak (epsilon > 10)"


def assumptions() -> dict[str, str]:
    return {
        "privacy unit": "one user: all of a user's interactions at a site (one training example per user)",
        "neighbouring relation": "add or remove one user (with all of their interactions) at one site",
        "mechanism": "DP-SGD: per-user gradients clipped to norm C, Gaussian noise of std noise_multiplier * C added "
        "to their sum at every step",
        "sampling": "Poisson sampling of users at each step, at the ledger's sample rate",
        "composition": "all steps of all ledger lines of a site, across rounds and the runs given, composed",
        "accountants": "Opacus RDP (the sites' spending accountant; the stated epsilon), Opacus PRV and "
        "dp-accounting PLD (tighter estimates, cross-checks)",
        "global model": "users are disjoint across sites, so the global model is (max over sites of epsilon, "
        "delta)-DP for every user; FedAvg of DP updates is post-processing",
        "threat model": "the server and other sites see every update a site sends; nothing is assumed of secure "
        "aggregation or of site sampling (no amplification by site sampling is claimed)",
    }


def global_statement(report: AuditReport) -> str:
    if not report.dp:
        return "NO GUARANTEE: the run was trained without differential privacy"
    if report.epsilon is None:
        return "NO GUARANTEE CAN BE STATED: no ledger lines were found"
    return (
        f"({report.epsilon:.3f}, {report.delta:g})-DP for every user, user-level, add/remove-one-user neighbouring, "
        f"over {len(report.sites)} site(s); tier: {tier(report.epsilon)}"
        + ("" if report.passed else ". THE AUDIT FAILED: see the findings; this statement cannot be relied on")
    )


def independent_epsilons(history: Sequence[MechanismStep], delta: float) -> dict[str, float | None]:
    """Epsilon of the whole history from each accountant; None where one cannot evaluate it (the caller reports it)."""
    results: dict[str, float | None] = {}
    for name, compute in (
        ("opacus-rdp", lambda: epsilon_from_history(history, delta, "rdp")),
        ("opacus-prv", lambda: prv_epsilon(history, delta)),
        ("dp-accounting-pld", lambda: pld_epsilon(history, delta)),
    ):
        try:
            results[name] = float(compute()) if history else 0.0
        except (ValueError, RuntimeError, OverflowError):
            results[name] = None
    return results


def prv_epsilon(history: Sequence[MechanismStep], delta: float) -> float:
    """Opacus' PRV accountant; it reports the upper end of its error window, so small epsilons get a finer one."""
    accountant = PRVAccountant()
    accountant.history = list(history)
    coarse = float(accountant.get_epsilon(delta, eps_error=PRV_COARSE_ERROR))
    if coarse > PRV_COARSE_ERROR / (RELATIVE_TOLERANCE / 4):
        return coarse
    return float(accountant.get_epsilon(delta, eps_error=max(PRV_FINEST_ERROR, coarse * RELATIVE_TOLERANCE / 4)))


def pld_epsilon(history: Sequence[MechanismStep], delta: float) -> float:
    """Google's dp-accounting privacy-loss-distribution accountant over the same Poisson-subsampled Gaussian steps."""
    accountant = pld_privacy_accountant.PLDAccountant(
        dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE, value_discretization_interval=PLD_DISCRETIZATION
    )
    accountant.compose(
        dp_accounting.ComposedDpEvent(
            [
                dp_accounting.SelfComposedDpEvent(
                    dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(sigma)), steps
                )
                for sigma, rate, steps in history
            ]
        )
    )
    return float(accountant.get_epsilon(delta))


def _exceeds(value: float, reference: float) -> bool:
    return value > reference * (1 + RELATIVE_TOLERANCE) + ABSOLUTE_TOLERANCE


@dataclass(frozen=True)
class _Entry:
    where: str
    number: int
    line_hash: str
    data: dict[str, Any]

    @property
    def step(self) -> MechanismStep:
        return (float(self.data["noise_multiplier"]), float(self.data["sample_rate"]), int(self.data["steps"]))


@dataclass
class _LedgerFile:
    """One ledger as the audit read it: its usable entries, and every line's hash (what a recorded head names)."""

    path: Path
    entries: list[_Entry]
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


def check_chain(path: Path) -> tuple[_LedgerFile, list[Finding]]:
    """Every usable line of one ledger, and every break in it, said precisely."""
    try:
        lines = scan(path)
    except (OSError, UnicodeDecodeError) as error:
        return _LedgerFile(path, [], []), [Finding("error", str(path), f"cannot read the ledger: {error}")]
    findings: list[Finding] = []
    hash_to_line = {line.hash: line.number for line in lines}
    entries: list[_Entry] = []
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
        entries.append(_Entry(where, line.number, line.hash, line.entry))
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
    return _LedgerFile(path, entries, [line.hash for line in lines]), findings


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
    if entry["accountant"] not in ("rdp", "prv", "gdp"):
        problems.append(f"accountant {entry['accountant']!r} is not one Opacus knows")
    if entry.get("sampling", "poisson") != "poisson":
        problems.append(f"sampling {entry.get('sampling')!r}: only Poisson sampling is accounted here")
    if entry.get("privacy_unit", "user") != "user":
        problems.append(f"privacy unit {entry.get('privacy_unit')!r}: fedtail's guarantee is per user")
    return problems


def _is_nonce(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 2 * NONCE_BYTES and all(c in "0123456789abcdef" for c in value)


def check_rounds(entries: Sequence[_Entry]) -> list[Finding]:
    """Within each run, rounds must strictly increase; gaps are rounds the site did not train (noted)."""
    findings: list[Finding] = []
    last: dict[str, _Entry] = {}
    for entry in entries:
        run_id, number = entry.data["run_id"], entry.data["round"]
        previous = last.get(run_id)
        if previous is not None:
            before = previous.data["round"]
            if number == before:
                findings.append(
                    Finding("error", entry.where, f"round {number} of run {run_id} recorded twice (also {previous.where})")
                )
            elif number < before:
                findings.append(
                    Finding("error", entry.where, f"round {number} of run {run_id} comes after round {before}: out of order")
                )
            elif number > before + 1:
                findings.append(
                    Finding(
                        "note",
                        entry.where,
                        f"run {run_id}: no line for round(s) {before + 1}-{number - 1} (not sampled, declined or failed "
                        "there; a run folder's rounds.jsonl confirms which)",
                    )
                )
        last[run_id] = entry
    return findings


def check_recorded_epsilons(entries: Sequence[_Entry]) -> list[Finding]:
    """Each line's claimed epsilon so far against a fresh accountant over the lines up to it (same accountant)."""
    findings: list[Finding] = []
    history: list[MechanismStep] = []
    for entry in entries:
        history.append(entry.step)
        claimed = float(entry.data["epsilon_so_far"])
        recomputed = epsilon_from_history(history, float(entry.data["delta"]), str(entry.data["accountant"]))
        if _exceeds(recomputed, claimed):
            findings.append(
                Finding(
                    "error",
                    entry.where,
                    f"epsilon UNDERSTATED: the line claims {claimed:.4f} so far, a fresh {entry.data['accountant']} "
                    f"accountant over lines 1..here gives {recomputed:.4f}",
                )
            )
        elif _exceeds(claimed, recomputed):
            findings.append(
                Finding(
                    "warning",
                    entry.where,
                    f"the line claims epsilon {claimed:.4f} so far, recomputation gives only {recomputed:.4f} "
                    "(overstated: safe, but the ledger does not match its own mechanism)",
                )
            )
    return findings


@dataclass(frozen=True)
class CoordinatorRecord:
    """A coordinator's per-round record of one run (its rounds.jsonl) and what its run folder says of the run."""

    rounds: Path
    run_id: str | None
    """From run.json beside it; a line's own ``run_id`` (recorded since ledger heads were) takes precedence."""
    model_selection: dict[str, Any] | None


def coordinator_record(path: Path) -> CoordinatorRecord:
    """The coordinator's run folder, or its rounds.jsonl on its own (what a deployed site's officer is handed)."""
    folder, rounds = (path, path / ROUNDS_FILE) if path.is_dir() else (path.parent, path)
    if not rounds.is_file():
        raise DataError(f"no coordinator record here: give the coordinator's run folder or its {ROUNDS_FILE}", rounds)
    run_id, _, model_selection = _run_facts(folder)
    return CoordinatorRecord(rounds, run_id, model_selection)


def check_against_coordinator(
    record: CoordinatorRecord, ledgers: Sequence[_LedgerFile], every_site: bool
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
    by_site: dict[str, list[_LedgerFile]] = {}
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
                files = [_LedgerFile(site_ledger(path.parent / LEDGER_DIR, site), [], [])]
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
    ledger: _LedgerFile,
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
        if round_lines and reported is not None and _exceeds(reported, float(round_lines[-1].data["epsilon_so_far"])):
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
    ledger: _LedgerFile, site: str, round_number: int, count: int, reported: float, where: str
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
    recomputed = epsilon_from_history(history, deltas[0], str(entries[-1].data["accountant"])) if entries else 0.0
    if _exceeds(reported, recomputed):
        return [
            Finding(
                "error",
                f"{ledger.path}:{count}",
                f"site {site} reported epsilon {reported:.4f} to the coordinator after round {round_number} ({where}); "
                f"lines 1-{count} of its ledger now recompute to only {recomputed:.4f}: the ledger was rewritten",
            )
        ]
    if _exceeds(recomputed, reported):
        return [
            Finding(
                "warning",
                where,
                f"site {site} reported epsilon {reported:.4f} after round {round_number}, but lines 1-{count} of its "
                f"ledger recompute to {recomputed:.4f}: the coordinator's record understates the site's spend",
            )
        ]
    return []


def _not_verified(ledger: _LedgerFile) -> str | None:
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


@dataclass
class _Source:
    """One path given to the audit: its ledgers, and the coordinator's record around them when there is one."""

    ledgers: list[Path]
    record: CoordinatorRecord | None
    run_folder: Path | None
    dp: bool


def _run_facts(folder: Path) -> tuple[str | None, bool, dict[str, Any] | None]:
    """A run folder's run id, whether it trained with DP, and how its model was selected (summary.json)."""
    record = read_run_record(folder)
    run_id = None if record is None else record.run_id
    privacy: dict[str, Any] = {}
    if (folder / SUMMARY_FILE).exists():
        privacy = json.loads((folder / SUMMARY_FILE).read_text(encoding="utf-8")).get("privacy", {})
    return run_id, bool(privacy.get("dp", True)), privacy.get("model_selection")


def _source(path: Path) -> _Source:
    if path.is_file():
        return _Source([path], None, None, True)
    if not path.is_dir():
        raise DataError("no such run folder or ledger file", path)
    ledger_dir = path / LEDGER_DIR
    ledgers = sorted(ledger_dir.glob("site-*.jsonl")) if ledger_dir.is_dir() else sorted(path.glob("site-*.jsonl"))
    run_id, dp, model_selection = _run_facts(path)
    if not ledgers and dp:
        raise DataError(f"no site ledgers (site-*.jsonl) here or in {LEDGER_DIR}/", path)
    run_folder = path if run_id is not None else None
    record = (
        CoordinatorRecord(path / ROUNDS_FILE, run_id, model_selection)
        if run_folder is not None and (path / ROUNDS_FILE).exists()
        else None
    )
    return _Source(ledgers, record, run_folder, dp)


def _selection_not_covered(record: CoordinatorRecord) -> str | None:
    selection = record.model_selection
    if not selection:
        return None
    return model_selection_statement(
        int(selection["kept_round"]), int(selection["candidate_rounds"]), int(selection["validation_users"])
    )


def audit(paths: Sequence[str | Path], coordinator: Sequence[str | Path] = ()) -> AuditReport:
    """Audit run folders or ledger files, cross-checked with the coordinator's records of each run given.

    Ledgers of the same site are composed. A run folder is its own coordinator
    record; ``coordinator`` adds records (run folders or rounds.jsonl files) for
    ledgers given on their own, as a deployed site's officer holds them.
    """
    sources = [_source(Path(p)) for p in paths]
    records = [coordinator_record(Path(p)) for p in coordinator]
    findings: list[Finding] = []
    by_site: dict[str, list[_Entry]] = {}
    files_by_site: dict[str, list[str]] = {}
    seen_lines: set[str] = set()
    ledger_files: list[_LedgerFile] = []
    for source in sources:
        source_files: list[_LedgerFile] = []
        for ledger in source.ledgers:
            ledger_file, chain_findings = check_chain(ledger)
            entries = ledger_file.entries
            source_files.append(ledger_file)
            findings += chain_findings + check_rounds(entries) + check_recorded_epsilons(entries)
            sites = {e.data["site"] for e in entries}
            if len(sites) > 1:
                findings.append(Finding("error", str(ledger), f"one ledger holds lines of several sites: {sorted(sites)}"))
            for entry in entries:
                site = str(entry.data["site"])
                files_by_site.setdefault(site, [])
                if str(ledger) not in files_by_site[site]:
                    files_by_site[site].append(str(ledger))
                if entry.line_hash not in seen_lines:  # a deployed site's ledger given twice is not spent twice
                    seen_lines.add(entry.line_hash)
                    by_site.setdefault(site, []).append(entry)
        if source.dp:
            if source.record is not None:
                findings += check_against_coordinator(source.record, source_files, every_site=True)
            elif source.run_folder is not None:
                findings.append(Finding("warning", str(source.run_folder), f"no {ROUNDS_FILE}: not cross-checked"))
            for record in records:
                findings += check_against_coordinator(record, source_files, every_site=False)
        ledger_files += source_files
    composed = len(sources) > 1
    sites = {site: _site_audit(site, entries, files_by_site[site], composed, findings) for site, entries in by_site.items()}
    run_records = [source.record for source in sources if source.record is not None] + records
    unverified = [text for text in map(_not_verified, ledger_files) if text]
    return AuditReport(
        [str(p) for p in paths],
        [str(p) for p in coordinator],
        dict(sorted(sites.items(), key=lambda item: site_order(item[0]))),
        findings,
        any(s.dp for s in sources),
        not_covered=[*NOT_COVERED, *dict.fromkeys(t for t in map(_selection_not_covered, run_records) if t)],
        not_verified=[*LIMITS, *unverified],
        witnessed=bool(ledger_files) and not unverified and not any(f.contradicted for f in ledger_files),
    )


def _site_audit(site: str, entries: list[_Entry], ledgers: list[str], composed: bool, findings: list[Finding]) -> SiteAudit:
    deltas = sorted({float(e.data["delta"]) for e in entries})
    delta = deltas[-1]
    if len(deltas) > 1:
        findings.append(Finding("note", f"site {site}", f"lines use several deltas {deltas}; composed at the largest"))
    history = [e.step for e in entries]
    recomputed = independent_epsilons(history, delta)
    recorded = None if composed else float(entries[-1].data["epsilon_so_far"])
    for name, value in recomputed.items():
        if value is None:
            findings.append(Finding("warning", f"site {site}", f"{name} could not evaluate this history"))
        elif recorded is not None and _exceeds(value, recorded):
            findings.append(
                Finding(
                    "error",
                    f"site {site}",
                    f"epsilon UNDERSTATED: the ledger's last line claims {recorded:.4f}, {name} recomputes {value:.4f}",
                )
            )
    users = [int(e.data["users"]) for e in entries if isinstance(e.data.get("users"), int)]
    site_users = min(users) if users else None
    audit_ = SiteAudit(
        site=site,
        ledgers=ledgers,
        runs=list(dict.fromkeys(str(e.data["run_id"]) for e in entries)),
        entries=len(entries),
        steps=sum(step for _, _, step in history),
        delta=delta,
        recorded_epsilon=recorded,
        recomputed=recomputed,
        users=site_users,
        mechanism=", ".join(
            f"{symbol} {_value_range([float(e.data[name]) for e in entries])}"
            for symbol, name in (("sigma", "noise_multiplier"), ("q", "sample_rate"), ("C", "max_grad_norm"))
        ),
        epsilon_per_entry=[epsilon_from_history(history[: i + 1], delta) for i in range(len(history))],
    )
    if audit_.delta_below_one_over_users is False:
        findings.append(
            Finding("error", f"site {site}", f"delta {delta:g} is not below 1/users = 1/{site_users}: the guarantee is void")
        )
    elif audit_.users is None:
        findings.append(Finding("note", f"site {site}", "the ledger does not record the site's users: delta < 1/users unchecked"))
    return audit_


def _value_range(values: list[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:.4g}" if math.isclose(low, high) else f"{low:.4g}-{high:.4g}"


def write_audit(report: AuditReport, out_dir: Path) -> list[Path]:
    """audit.json (for machines), audit.md (for a person) and the epsilon plot, side by side."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / AUDIT_JSON, report.as_dict())
    series = [
        Series(f"site {site.site}", list(range(1, len(site.epsilon_per_entry) + 1)), site.epsilon_per_entry)
        for site in report.sites.values()
    ]
    write_line_charts(out_dir / AUDIT_PLOT, [Panel("epsilon per site (recomputed, RDP)", "training call", series)])
    atomic_write_text(out_dir / AUDIT_MARKDOWN, format_markdown(report))
    return [out_dir / AUDIT_JSON, out_dir / AUDIT_MARKDOWN, out_dir / AUDIT_PLOT]


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _verdict(report: AuditReport) -> str:
    if not report.dp:
        return "NO GUARANTEE (trained without DP)"
    if not report.passed:
        return "FAILED"
    return "PASSED" if report.witnessed else "PASSED, NOT WITNESSED (see 'Not verified')"


def format_markdown(report: AuditReport) -> str:
    records = ", ".join(f"`{p}`" for p in report.coordinator)
    lines = [
        f"# Privacy audit: {_verdict(report)}",
        "",
        f"Audited: {', '.join(f'`{p}`' for p in report.paths)}"
        + (f", against the coordinator's record {records}" if records else "")
        + f". Recomputed from the ledgers with Opacus {version('opacus')} and dp-accounting "
        f"{version('dp-accounting')}.",
        "",
        "## Guarantee",
        "",
        f"**{global_statement(report)}.**",
        "",
    ]
    if report.sites:
        lines += [
            "| site | epsilon (stated) | recorded | Opacus RDP | Opacus PRV | dp-accounting PLD | delta | delta < 1/users | "
            "mechanism | steps | ledger lines | tier |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for site in report.sites.values():
            below = {True: "yes", False: "NO", None: "unknown"}[site.delta_below_one_over_users]
            lines.append(
                f"| {site.site} | {site.epsilon:.4f} | {_number(site.recorded_epsilon)} | "
                + " | ".join(_number(site.recomputed[name]) for name in ACCOUNTANTS)
                + f" | {site.delta:g} | {below} | {site.mechanism} | {site.steps} | {site.entries} | {tier(site.epsilon)} |"
            )
        lines += [
            "",
            "The stated epsilon is the sites' own accountant (Opacus RDP) recomputed, or the recorded value if that "
            "is higher. PRV and PLD are tighter numerical accountants; they are shown as cross-checks. "
            f"An epsilon recomputed more than {RELATIVE_TOLERANCE:.0%} above the recorded one fails the audit.",
            "",
            f"![epsilon per site after each training call]({AUDIT_PLOT})",
            "",
        ]
    lines += ["## Findings", ""]
    lines += [f"- {finding}" for finding in report.findings] or [
        "- none: every hash chain is intact and every epsilon the ledgers record matches its recomputation "
        "(what these checks cannot show is listed below)"
    ]
    lines += ["", "## Not verified", ""]
    lines += [f"- {text}" for text in report.not_verified]
    lines += ["", "## Assumptions", ""]
    lines += [f"- **{name}**: {text}" for name, text in assumptions().items()]
    lines += ["", "## Not covered by this guarantee", ""]
    lines += [f"- {text}" for text in report.not_covered]
    return "\n".join(lines) + "\n"

