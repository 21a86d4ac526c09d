"""The privacy audit: what guarantee each user got, recomputed from the site ledgers.

An auditor must not trust the server, the training code, or the epsilon a
ledger line claims. So the audit re-reads every line and re-checks its hash
chain (``ledgers``), re-derives each site's epsilon with three accountants
(``accounting``: Google's dp-accounting PLD, which the sites spend with, or the
accountant an older ledger names; Opacus' PRV, another code base; Opacus' RDP)
and compares them with what was recorded. Where the coordinator's record of a run is given (a run folder, or
``coordinator=``), every ledger is checked against the heads its site reported
(``witness``). ``report`` states the guarantee and writes it, with whatever the
audit could not check.

Several run folders (or ledgers) of the same site are composed: the same users
trained again spend again.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common.errors import DataError
from common.privacy.accounting import epsilon_from_history, model_selection_statement
from common.privacy.ledger import Spend
from common.run_files import LEDGER_DIR, ROUNDS_FILE, site_order
from simulations.audit.accounting import BY_LEDGER_NAME, TIGHT_ACCOUNTANTS, independent_epsilons
from simulations.audit.fallback import fallback_findings
from simulations.audit.findings import Finding, exceeds
from simulations.audit.ledgers import Entry, LedgerFile, check_chain, check_recorded_epsilons, check_rounds
from simulations.audit.report import LIMITS, NOT_COVERED, AuditReport, SiteAudit
from simulations.audit.witness import (
    CoordinatorRecord,
    check_against_coordinator,
    coordinator_record,
    not_verified,
    run_facts,
)


@dataclass
class _Source:
    """One path given to the audit: its ledgers, and the coordinator's record around them when there is one."""

    ledgers: list[Path]
    record: CoordinatorRecord | None
    run_folder: Path | None
    dp: bool


def _source(path: Path) -> _Source:
    if path.is_file():
        return _Source([path], None, None, True)
    if not path.is_dir():
        raise DataError("no such run folder or ledger file", path)
    ledger_dir = path / LEDGER_DIR
    ledgers = sorted(ledger_dir.glob("site-*.jsonl")) if ledger_dir.is_dir() else sorted(path.glob("site-*.jsonl"))
    run_id, dp, model_selection = run_facts(path)
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
    by_site: dict[str, list[Entry]] = {}
    files_by_site: dict[str, list[str]] = {}
    seen_lines: set[str] = set()
    ledger_files: list[LedgerFile] = []
    for source in sources:
        source_files: list[LedgerFile] = []
        for ledger in source.ledgers:
            ledger_file, chain_findings = check_chain(ledger)
            entries = ledger_file.entries
            source_files.append(ledger_file)
            findings += chain_findings + check_rounds(entries) + check_recorded_epsilons(entries)
            named = {e.data["site"] for e in entries}
            if len(named) > 1:
                findings.append(
                    Finding("error", str(ledger), f"one ledger holds lines of several sites: {sorted(named)}")
                )
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
    sites = {
        site: _site_audit(site, entries, files_by_site[site], composed, findings) for site, entries in by_site.items()
    }
    run_records = [source.record for source in sources if source.record is not None] + records
    unverified = [text for text in map(not_verified, ledger_files) if text]
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


def _site_audit(
    site: str, entries: list[Entry], ledgers: list[str], composed: bool, findings: list[Finding]
) -> SiteAudit:
    deltas = sorted({float(e.data["delta"]) for e in entries})
    delta = deltas[-1]
    if len(deltas) > 1:
        findings.append(Finding("note", f"site {site}", f"lines use several deltas {deltas}; composed at the largest"))
    history = [e.step for e in entries]
    findings += fallback_findings(site, entries, delta)
    recomputed = independent_epsilons(history, delta)
    recorded = None if composed else float(entries[-1].data["epsilon_so_far"])
    spending = entries[-1].accountant  # the site's accountant now: its last line's epsilon covers every line before
    checked = {BY_LEDGER_NAME[spending], *TIGHT_ACCOUNTANTS}
    for name, value in recomputed.items():
        if value is None:
            findings.append(Finding("warning", f"site {site}", f"{name} could not evaluate this history"))
        elif recorded is not None and name in checked and exceeds(value, recorded):
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
        accountant=BY_LEDGER_NAME[spending],
        users=site_users,
        mechanism=", ".join(
            f"{symbol} {_value_range([float(e.data[name]) for e in entries])}"
            for symbol, name in (("sigma", "noise_multiplier"), ("q", "sample_rate"), ("C", "max_grad_norm"))
        ),
        epsilon_per_entry=[epsilon_from_history(history[: i + 1], delta, spending) for i in range(len(history))],
        trust=list(dict.fromkeys(_trust(e.data) for e in entries)),
    )
    if audit_.delta_below_one_over_users is False:
        findings.append(
            Finding(
                "error", f"site {site}", f"delta {delta:g} is not below 1/users = 1/{site_users}: the guarantee is void"
            )
        )
    elif audit_.users is None:
        findings.append(
            Finding("note", f"site {site}", "the ledger does not record the site's users: delta < 1/users unchecked")
        )
    return audit_


def _trust(line: dict) -> str:
    """What a line's epsilon relies on, in plain words (lines written before the field: the site's own noise)."""
    placement = str(line.get("noise_placement", "site"))
    return f"{placement}: relies on {line.get('trust') or Spend.trust}"


def _value_range(values: list[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:.4g}" if math.isclose(low, high) else f"{low:.4g}-{high:.4g}"
