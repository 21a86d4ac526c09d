"""The privacy audit: broken ledgers fail precisely, understated epsilons are caught, accountants agree, forged ledgers
are caught with the coordinator's record and said to be unverifiable without it."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from common.errors import DataError
from common.privacy.accounting import ACCOUNTANT, epsilon_from_history
from common.privacy.ledger import GENESIS_HASH, UNSALTED_FORMAT, Ledger, Spend
from simulations.audit import audit
from simulations.audit.accounting import independent_epsilons
from simulations.audit.report import AUDIT_JSON, AUDIT_MARKDOWN, AUDIT_PLOT, LIMITS, format_markdown, write_audit

SIGMA, RATE, STEPS, DELTA = 1.1, 0.1, 20, 1e-5


def _spend(round_number: int, run_id: str = "run-a", site: str = "3", users: int = 500, steps: int = STEPS) -> Spend:
    return Spend(run_id, round_number, site, RATE, SIGMA, 1.0, steps, DELTA, ACCOUNTANT, {"opacus": "1.6.0"},
                 users=users)


def _ledger(path: Path, rounds: int = 4, **spend: object) -> Path:
    ledger = Ledger(path)
    for number in range(1, rounds + 1):
        ledger.append(_spend(number, **spend))  # type: ignore[arg-type]
    return path


def _errors(path: Path | list[Path]) -> list[str]:
    report = audit(path if isinstance(path, list) else [path])
    return [f"{f.where}: {f.message}" for f in report.findings if f.severity == "error"]


def _rechain(lines: list[dict[str, object]]) -> str:
    """A forger's ledger: edited lines with every hash recomputed, so the chain itself looks intact."""
    previous, out = GENESIS_HASH, []
    for entry in lines:
        text = json.dumps({**entry, "prev_hash": previous}, sort_keys=True)
        out.append(text)
        previous = hashlib.sha256(text.encode()).hexdigest()
    return "\n".join(out) + "\n"


def test_an_intact_ledger_passes_and_every_accountant_confirms_it(tmp_path: Path) -> None:
    path = _ledger(tmp_path / "site-3.jsonl")
    report = audit([path])
    assert report.passed, report.findings
    site = report.sites["3"]
    expected = epsilon_from_history([(SIGMA, RATE, STEPS)] * 4, DELTA, "pld")
    assert site.accountant == "dp-accounting-pld" and site.recorded_epsilon == pytest.approx(expected)
    assert site.recomputed["dp-accounting-pld"] == pytest.approx(expected)
    # PRV (another code base) agrees with PLD; RDP, a looser bound, lands above both.
    assert site.recomputed["opacus-prv"] == pytest.approx(expected, rel=0.01)
    assert site.recomputed["opacus-rdp"] > 1.05 * expected
    assert site.steps == 4 * STEPS and site.delta_below_one_over_users is True
    assert report.epsilon == pytest.approx(expected)


def test_a_ledger_written_before_lines_named_their_accountant_is_audited_with_rdp(tmp_path: Path) -> None:
    """Such ledgers were spent with RDP: their guarantee is RDP's, and a site that moved on to PLD states PLD's."""
    path = _ledger(tmp_path / "site-3.jsonl", rounds=2)
    old = [  # as an older fedtail wrote them: no accountant, RDP's epsilon so far
        {**{k: v for k, v in entry.items() if k != "accountant"},
         "epsilon_so_far": epsilon_from_history([(SIGMA, RATE, STEPS)] * count, DELTA, "rdp")}
        for count, entry in enumerate(Ledger(path).entries(), start=1)
    ]
    path.write_text(_rechain(old))
    report = audit([path])
    assert report.passed, report.findings
    rdp = epsilon_from_history([(SIGMA, RATE, STEPS)] * 2, DELTA, "rdp")
    assert report.sites["3"].accountant == "opacus-rdp" and report.epsilon == pytest.approx(rdp)
    Ledger(path).append(_spend(3))  # the same site now, spending with PLD over every line
    report = audit([path])
    assert report.passed, report.findings
    pld = epsilon_from_history([(SIGMA, RATE, STEPS)] * 3, DELTA, "pld")
    assert report.sites["3"].accountant == "dp-accounting-pld" and report.epsilon == pytest.approx(pld)
    assert pld < epsilon_from_history([(SIGMA, RATE, STEPS)] * 3, DELTA, "rdp")


def test_a_line_understated_against_prv_and_pld_fails_whatever_accountant_it_names(tmp_path: Path) -> None:
    """A line may name RDP and record less than RDP gives only if PRV and PLD (the exact epsilon, from above)
    agree; below them it is understated, whichever accountant it names."""
    path = _ledger(tmp_path / "site-3.jsonl", rounds=1)
    (entry,) = Ledger(path).entries()
    pld = epsilon_from_history([(SIGMA, RATE, STEPS)], DELTA, "pld")
    path.write_text(_rechain([{**entry, "accountant": "rdp", "epsilon_so_far": 0.9 * pld}]))
    errors = _errors(path)
    for name in ("opacus-rdp", "opacus-prv", "dp-accounting-pld"):
        assert any(f"{name} recomputes" in e for e in errors), (name, errors)


def test_a_removed_line_is_reported_at_the_line_after_it(tmp_path: Path) -> None:
    path = _ledger(tmp_path / "site-3.jsonl")
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:1] + lines[2:]) + "\n")
    errors = _errors(path)
    assert any(
        e.startswith(f"{path}:2: hash chain broken: line 1 was edited after it was written, or lines between 1 and 2 "
                     "were removed") for e in errors
    ), errors


def test_an_edited_line_is_reported(tmp_path: Path) -> None:
    path = _ledger(tmp_path / "site-3.jsonl")
    lines = path.read_text().splitlines()
    edited = json.loads(lines[1])
    edited["noise_multiplier"] = 5.0  # pretend the round was noisier than it was
    lines[1] = json.dumps(edited, sort_keys=True)
    path.write_text("\n".join(lines) + "\n")
    errors = _errors(path)
    assert any(e.startswith(f"{path}:3: hash chain broken: line 2 was edited") for e in errors), errors


def test_reordered_lines_are_reported(tmp_path: Path) -> None:
    path = _ledger(tmp_path / "site-3.jsonl")
    lines = path.read_text().splitlines()
    lines[1], lines[2] = lines[2], lines[1]
    path.write_text("\n".join(lines) + "\n")
    errors = _errors(path)
    assert any("line 2 was written right after line 1" in e or "out of order" in e for e in errors), errors
    assert any("round 2 of run run-a comes after round 3: out of order" in e for e in errors), errors


def test_an_understated_epsilon_is_caught_even_with_a_forged_chain(tmp_path: Path) -> None:
    path = _ledger(tmp_path / "site-3.jsonl")
    entries = Ledger(path).entries()
    entries[-1]["epsilon_so_far"] = entries[-1]["epsilon_so_far"] / 2
    path.write_text(_rechain(entries))
    errors = _errors(path)
    assert any(f"{path}:4: epsilon UNDERSTATED" in e for e in errors), errors
    assert any("site 3: epsilon UNDERSTATED: the ledger's last line claims" in e for e in errors), errors


def test_a_cut_off_last_line_is_caught_by_the_servers_round_records(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "ledgers").mkdir(parents=True)
    path = _ledger(run / "ledgers" / "site-3.jsonl", run_id="the-run")
    entries = Ledger(path).entries()
    (run / "run.json").write_text(json.dumps({"run_id": "the-run"}))
    (run / "rounds.jsonl").write_text(
        "".join(
            json.dumps({"round": e["round"], "sites_trained": ["3"], "site_epsilon": {"3": e["epsilon_so_far"]}}) + "\n"
            for e in entries
        )
    )
    assert audit([run]).passed
    path.write_text("".join(line + "\n" for line in path.read_text().splitlines()[:-1]))  # the chain alone looks fine
    errors = _errors(run)
    assert any(
        "the server recorded site 3 training round 4 of run the-run, but the site's ledger has no line for it" in e
        for e in errors
    ), errors


def test_runs_of_the_same_site_compose_and_one_ledger_given_twice_is_not_counted_twice(tmp_path: Path) -> None:
    first = _ledger(tmp_path / "a" / "site-3.jsonl", rounds=3, run_id="run-a")
    second = _ledger(tmp_path / "b" / "site-3.jsonl", rounds=2, run_id="run-b")
    composed = audit([first, second]).sites["3"]
    assert composed.recomputed["dp-accounting-pld"] == pytest.approx(
        epsilon_from_history([(SIGMA, RATE, STEPS)] * 5, DELTA)
    )
    assert composed.recorded_epsilon is None and composed.runs == ["run-a", "run-b"]
    twice = audit([first, first]).sites["3"]
    assert twice.steps == 3 * STEPS


def test_a_delta_not_below_one_over_users_fails(tmp_path: Path) -> None:
    path = _ledger(tmp_path / "site-3.jsonl", users=200_000)  # delta 1e-5 >= 1/200,000
    assert any("delta 1e-05 is not below 1/users = 1/200000" in e for e in _errors(path))


def test_missing_fields_are_named(tmp_path: Path) -> None:
    path = _ledger(tmp_path / "site-3.jsonl", rounds=1)
    entry = Ledger(path).entries()[0]
    del entry["steps"]
    path.write_text(_rechain([entry]))
    assert any("field 'steps' is missing" in e for e in _errors(path))


@pytest.mark.parametrize("rate", [0.01, 0.05, 0.2])
@pytest.mark.parametrize("sigma", [0.8, 1.2, 3.0])
@pytest.mark.parametrize("steps", [50, 500])
def test_opacus_prv_and_dp_accounting_pld_agree_within_two_percent(rate: float, sigma: float, steps: int) -> None:
    values = independent_epsilons([(sigma, rate, steps)], DELTA)
    prv, pld = values["opacus-prv"], values["dp-accounting-pld"]
    assert prv is not None and pld is not None
    assert abs(prv - pld) <= 0.02 * pld, values
    assert pld <= values["opacus-rdp"] * 1.001  # RDP is an upper bound on both


def test_reports_are_written_with_the_plot_and_the_assumptions(tmp_path: Path) -> None:
    path = _ledger(tmp_path / "site-3.jsonl")
    written = write_audit(audit([path]), tmp_path / "out")
    assert {p.name for p in written} == {AUDIT_JSON, AUDIT_MARKDOWN, AUDIT_PLOT}
    markdown = (tmp_path / "out" / AUDIT_MARKDOWN).read_text()
    for required in ("privacy unit", "neighbouring relation", "mechanism", "sampling", "accountants", "delta",
                     "Not covered", f"]({AUDIT_PLOT})", "PASSED"):
        assert required in markdown, required
    payload = json.loads((tmp_path / "out" / AUDIT_JSON).read_text())
    assert payload["passed"] and payload["sites"]["3"]["tier"].startswith("reasonable")
    assert "<polyline" in (tmp_path / "out" / AUDIT_PLOT).read_text()


def test_a_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such run folder or ledger file"):
        audit([tmp_path / "nowhere"])


def test_the_command_exits_1_on_a_broken_ledger_and_0_on_a_good_one(tmp_path: Path) -> None:
    good = _ledger(tmp_path / "good" / "site-3.jsonl")
    bad = _ledger(tmp_path / "bad" / "site-3.jsonl")
    lines = bad.read_text().splitlines()
    bad.write_text("\n".join(lines[:1] + lines[2:]) + "\n")
    command = [sys.executable, "-m", "simulations.cli", "audit"]
    ok = subprocess.run([*command, str(good)], capture_output=True, text=True)
    broken = subprocess.run([*command, str(bad)], capture_output=True, text=True)
    missing = subprocess.run([*command, str(tmp_path / "nowhere")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert broken.returncode == 1 and "hash chain broken" in broken.stdout and "AUDIT FAILED" in broken.stderr
    assert missing.returncode == 2 and "Traceback" not in missing.stderr


RUN_ID = "the-run"


def _witnessed_run(root: Path, rounds: int = 4, unsalted: bool = False) -> Path:
    """A run folder as the coordinator leaves it: site 3's ledger (2 steps a round), and per round what the site
    reported: its epsilon and its ledger head. ``unsalted``: as format 1 wrote it (no nonce, no head hash)."""
    (root / "ledgers").mkdir(parents=True)
    (root / "run.json").write_text(json.dumps({"run_id": RUN_ID}))
    ledger = Ledger(root / "ledgers" / "site-3.jsonl")
    records = []
    for number in range(1, rounds + 1):
        ledger.append(_spend(number, run_id=RUN_ID, steps=2))
        if unsalted:
            ledger.path.write_text(_rechain([_without_nonce(e) for e in ledger.entries()]))
        lines, head_hash = ledger.public_head()
        records.append({"round": number, "run_id": RUN_ID, "sites_trained": ["3"],
                        "site_epsilon": {"3": ledger.epsilon(DELTA)},
                        "site_ledger_head": {"3": {"lines": lines, "hash": head_hash or None}}})
    (root / "rounds.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    return root


def _without_nonce(entry: dict[str, Any]) -> dict[str, Any]:
    return {**{k: v for k, v in entry.items() if k != "nonce"}, "format": UNSALTED_FORMAT}


FORGERIES: dict[str, Callable[[list[dict[str, Any]]], list[dict[str, Any]]]] = {
    "steps 2 -> 1": lambda entries: [{**e, "steps": 1} for e in entries],
    "noise multiplier 5": lambda entries: [{**e, "noise_multiplier": 5.0} for e in entries],
    "last line cut": lambda entries: entries[:-1],
}


def _forge(path: Path, forgery: str) -> None:
    """A careful forger with the site's disk: lines rewritten, every epsilon and hash recomputed, nonces kept."""
    entries, history = FORGERIES[forgery](Ledger(path).entries()), []
    for entry in entries:
        history.append((entry["noise_multiplier"], entry["sample_rate"], entry["steps"]))
        entry["epsilon_so_far"] = epsilon_from_history(history, entry["delta"])
    path.write_text(_rechain(entries))


@pytest.mark.parametrize("forgery", FORGERIES)
def test_a_forged_ledger_audited_alone_is_reported_as_unverifiable(tmp_path: Path, forgery: str) -> None:
    ledger = _witnessed_run(tmp_path / "run") / "ledgers" / "site-3.jsonl"
    _forge(ledger, forgery)
    report = audit([ledger])
    assert report.passed and not report.witnessed, "a chain rewritten consistently is intact: a lone ledger's limit"
    (unverified,) = report.not_verified[len(LIMITS) :]
    for said in (str(ledger), "audited alone", "rewritten and re-hashed consistently", "last lines cut off",
                 "--coordinator"):
        assert said in unverified, said
    markdown = format_markdown(report)
    assert "# Privacy audit: PASSED, NOT WITNESSED" in markdown and "## Not verified" in markdown
    assert "every epsilon confirmed" not in markdown


@pytest.mark.parametrize("forgery", FORGERIES)
def test_a_forged_ledger_is_caught_with_the_coordinators_record(tmp_path: Path, forgery: str) -> None:
    run = _witnessed_run(tmp_path / "run")
    ledger = run / "ledgers" / "site-3.jsonl"
    _forge(ledger, forgery)
    handed = tmp_path / "officer" / "rounds.jsonl"  # the record alone, as the coordinator hands it to a site
    handed.parent.mkdir()
    shutil.copy(run / "rounds.jsonl", handed)
    expected = "its last lines were cut off" if forgery == "last line cut" else "the ledger was rewritten"
    for paths, coordinator in (([ledger], [run]), ([ledger], [handed]), ([run], [])):
        errors = [f"{f.where}: {f.message}" for f in audit(paths, coordinator).findings if f.severity == "error"]
        assert any(expected in error for error in errors), (paths, coordinator, errors)


def test_an_intact_ledger_with_the_coordinators_record_is_witnessed_up_to_its_last_head(tmp_path: Path) -> None:
    run = _witnessed_run(tmp_path / "run")
    ledger = run / "ledgers" / "site-3.jsonl"
    report = audit([ledger], [run / "rounds.jsonl"])
    assert report.passed and report.witnessed, report.findings
    assert report.not_verified == list(LIMITS)
    assert format_markdown(report).startswith("# Privacy audit: PASSED\n")
    Ledger(ledger).append(_spend(1, run_id="a-later-run", steps=2))  # a run whose record is not given
    (unverified,) = audit([ledger], [run]).not_verified[len(LIMITS) :]
    assert "lines 5-5 come after the last head the given records hold" in unverified


def test_an_epsilon_the_site_reported_above_what_its_ledger_recomputes_is_an_error(tmp_path: Path) -> None:
    run = _witnessed_run(tmp_path / "run", unsalted=True)  # heads without hashes: the count and epsilon still tell
    ledger = run / "ledgers" / "site-3.jsonl"
    report = audit([ledger], [run])
    assert report.passed, report.findings
    assert any(f.severity == "note" and f"older format {UNSALTED_FORMAT}" in f.message for f in report.findings)
    (unverified,) = report.not_verified[len(LIMITS) :]
    assert "lines 1-4 were counted but not compared" in unverified
    _forge(ledger, "noise multiplier 5")
    errors = [f.message for f in audit([ledger], [run]).findings if f.severity == "error"]
    assert any("reported epsilon" in e and "now recompute to only" in e for e in errors), errors


def test_a_record_naming_other_sites_checks_only_the_ledgers_given(tmp_path: Path) -> None:
    run = _witnessed_run(tmp_path / "run")
    lines = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
    for line in lines:
        line["sites_trained"].append("east")
        line["site_ledger_head"]["east"] = {"lines": line["round"], "hash": "ab" * 32}
    (run / "rounds.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    report = audit([run / "ledgers" / "site-3.jsonl"], [run / "rounds.jsonl"])
    assert report.passed and report.witnessed, report.findings
    assert any("site(s) east, whose ledgers were not given" in f.message for f in report.findings)
    errors = [f.message for f in audit([run]).findings if f.severity == "error"]  # a run folder holds every site's
    assert any("site east's ledger at 4 lines" in e and "cut off" in e for e in errors), errors


@pytest.mark.parametrize("selection", ["best-validation", "last"])
def test_model_selection_on_validation_items_is_listed_as_not_covered(tmp_path: Path, selection: str) -> None:
    run = _witnessed_run(tmp_path / "run")
    privacy: dict[str, Any] = {"dp": True}
    if selection == "best-validation":  # what the server writes when best-validation picked the kept model
        privacy["model_selection"] = {"rule": selection, "kept_round": 3, "candidate_rounds": 4, "validation_users": 40}
    (run / "summary.json").write_text(json.dumps({"privacy": privacy}))
    selection_entries = [text for text in audit([run]).not_covered if text.startswith("Model selection")]
    if selection == "last":
        assert selection_entries == []
    else:
        (entry,) = selection_entries
        for said in ("round 3", "among 4 released rounds", "of 40 users", "non-private", "held-out"):
            assert said in entry, said


def test_the_command_audits_a_sites_ledger_against_the_coordinators_record(tmp_path: Path) -> None:
    run = _witnessed_run(tmp_path / "run")
    ledger = run / "ledgers" / "site-3.jsonl"
    _forge(ledger, "noise multiplier 5")
    command = [sys.executable, "-m", "simulations.cli", "audit", str(ledger), "--out", str(tmp_path / "out")]
    alone = subprocess.run(command, capture_output=True, text=True)
    witnessed = subprocess.run([*command, "--coordinator", str(run / "rounds.jsonl")], capture_output=True, text=True)
    assert alone.returncode == 0 and "NOT WITNESSED" in alone.stdout and "audited alone" in alone.stdout, alone.stderr
    assert witnessed.returncode == 1 and "the ledger was rewritten" in witnessed.stdout, witnessed.stderr
