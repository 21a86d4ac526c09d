"""The site ledger: append-only, hash-chained, the sole source of a site's epsilon."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from common.errors import DataError
from common.privacy.accounting import ACCOUNTANT, calibrate_noise, epsilon_from_history
from common.privacy.ledger import GENESIS_HASH, LEDGER_FORMAT, UNSALTED_FORMAT, Ledger, Spend, scan


def _spend(round_number: int, sigma: float = 1.1) -> Spend:
    return Spend("run", round_number, "3", 0.1, sigma, 1.0, 20, 1e-5, ACCOUNTANT, {"opacus": "1.6.0"})


def _ledger(tmp_path: Path, rounds: int = 3) -> Ledger:
    ledger = Ledger(tmp_path / "site-3.jsonl")
    for number in range(1, rounds + 1):
        ledger.append(_spend(number))
    return ledger


def test_epsilon_so_far_composes_every_line(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    entries = ledger.entries()
    assert [e["round"] for e in entries] == [1, 2, 3]
    for count, entry in enumerate(entries, start=1):
        assert entry["epsilon_so_far"] == pytest.approx(epsilon_from_history([(1.1, 0.1, 20)] * count, 1e-5))
    assert ledger.epsilon(1e-5) == pytest.approx(entries[-1]["epsilon_so_far"])
    assert {"privacy_unit", "neighbouring", "sampling", "accountant", "library_versions", "run_id"} <= set(entries[0])


def test_a_line_composes_every_earlier_line_with_its_own_accountant(tmp_path: Path) -> None:
    """A site that spent with RDP and now spends with PLD: its new line covers the old lines too, under PLD."""
    ledger = Ledger(tmp_path / "site-3.jsonl")
    ledger.append(Spend("old", 1, "3", 0.1, 1.1, 1.0, 20, 1e-5, "rdp", {}))
    ledger.append(_spend(1))
    old, new = ledger.entries()
    assert (old["accountant"], new["accountant"]) == ("rdp", "pld")
    both = [(1.1, 0.1, 20)] * 2
    assert new["epsilon_so_far"] == pytest.approx(epsilon_from_history(both, 1e-5, "pld"))
    assert new["epsilon_so_far"] < 0.95 * epsilon_from_history(both, 1e-5, "rdp")


@pytest.mark.parametrize("tamper", ["delete", "edit", "reorder"])
def test_a_deleted_edited_or_reordered_line_breaks_the_chain(tmp_path: Path, tamper: str) -> None:
    ledger = _ledger(tmp_path)
    lines = ledger.path.read_text().splitlines()
    if tamper == "delete":
        del lines[1]
    elif tamper == "edit":
        entry = json.loads(lines[1])
        entry["noise_multiplier"] = 5.0  # pretend more noise was used: lowers epsilon
        lines[1] = json.dumps(entry, sort_keys=True)
    else:
        lines[1], lines[2] = lines[2], lines[1]
    ledger.path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="hash chain broken") as error:
        ledger.entries()
    assert "line 2" in str(error.value) or "line 3" in str(error.value)


def test_a_line_edited_after_the_ledger_was_read_is_still_caught(tmp_path: Path) -> None:
    """A read verifies only lines it has not seen, so it must notice that a line it has seen changed."""
    ledger = _ledger(tmp_path)
    assert len(ledger.entries()) == 3
    lines = ledger.path.read_text().splitlines()
    lines[0] = lines[0].replace('"round": 1', '"round": 7')  # same length, same size on disk
    ledger.path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="hash chain broken") as error:
        ledger.entries()
    assert "line 2" in str(error.value)


def test_reads_between_appends_agree_with_a_full_scan(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path, rounds=2)
    ledger.entries()
    other = Ledger(tmp_path / "site-3.jsonl")  # another reader of the same file, as a restarted site would be
    other.append(_spend(3))
    lines = scan(ledger.path)
    assert ledger.entries() == [line.entry for line in lines]
    assert ledger.head() == (3, lines[-1].hash)
    ledger.path.write_text("".join(f"{text}\n" for text in ledger.path.read_text().splitlines()[:2]))
    assert not ledger.continues(3, lines[-1].hash)  # cut off after it was read
    assert ledger.head() == (2, lines[1].hash)


def test_a_truncated_last_line_is_reported(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path, rounds=2)
    text = ledger.path.read_text()
    ledger.path.write_text(text[:-20])
    with pytest.raises(DataError, match="line 2"):
        ledger.entries()


def test_calibrated_noise_meets_the_cumulative_target() -> None:
    sigma = calibrate_noise(4.0, 1e-5, 0.05, 500)
    spent = epsilon_from_history([(sigma, 0.05, 500)], 1e-5)
    assert spent <= 4.0 and spent == pytest.approx(4.0, abs=0.03)
    assert calibrate_noise(1.0, 1e-5, 0.05, 500) > sigma, "a smaller budget needs more noise"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _guess_users(public: dict[str, object], head_hash: str, candidates: range) -> int | None:
    """The coordinator's brute force: every field of the line but ``users`` is known to it (same second too)."""
    for users in candidates:
        if _sha256(json.dumps({**public, "users": users}, sort_keys=True)) == head_hash:
            return users
    return None


def test_every_line_carries_its_own_secret_nonce(tmp_path: Path) -> None:
    entries = _ledger(tmp_path).entries()
    assert {entry["format"] for entry in entries} == {LEDGER_FORMAT}
    nonces = [entry["nonce"] for entry in entries]
    assert all(len(nonce) == 32 and int(nonce, 16) >= 0 for nonce in nonces)
    assert len(set(nonces)) == len(nonces)


def test_two_ledgers_that_differ_only_in_users_give_unrelated_heads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(time, "gmtime", lambda *_: time.struct_time((2025, 1, 2, 3, 4, 5, 3, 2, 0)))  # same second
    heads = {}
    for users in (128, 129, 129):
        ledger = Ledger(tmp_path / f"{users}-{len(heads)}" / "site-3.jsonl")
        ledger.append(Spend("run", 1, "3", 0.1, 1.1, 1.0, 20, 1e-5, "rdp", {"opacus": "1.6.0"}, users=users))
        lines, head_hash = ledger.public_head()
        assert lines == 1 and head_hash == _sha256(ledger.path.read_text().rstrip("\n"))
        known = {k: v for k, v in ledger.entries()[0].items() if k not in ("users", "nonce")}
        heads[(users, len(heads))] = head_hash, known
    assert len({head for head, _ in heads.values()}) == 3, "even equal ledgers differ: the nonce is fresh per line"
    (head, public), *_ = heads.values()
    assert _guess_users(public, head, range(1, 5_000)) is None, "the head hides the user count"
    # The control: the same line without its nonce (format 1) gives its user count away to the same search.
    unsalted = {**public, "format": UNSALTED_FORMAT}
    unsalted_head = _sha256(json.dumps({**unsalted, "users": 128}, sort_keys=True))
    assert _guess_users(unsalted, unsalted_head, range(1, 5_000)) == 128


def test_a_ledger_written_before_nonces_still_reads_and_withholds_its_head_hash(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path, rounds=2)
    previous, lines = GENESIS_HASH, []
    for entry in ledger.entries():  # the same ledger as format 1 wrote it: no nonce
        entry = {**{k: v for k, v in entry.items() if k != "nonce"}, "format": UNSALTED_FORMAT, "prev_hash": previous}
        lines.append(json.dumps(entry, sort_keys=True))
        previous = _sha256(lines[-1])
    ledger.path.write_text("\n".join(lines) + "\n")
    assert [entry["round"] for entry in ledger.entries()] == [1, 2]
    assert ledger.head() == (2, previous), "the site itself still remembers the full head"
    assert ledger.public_head() == (2, ""), "but never publishes the hash of a line without a nonce"
    ledger.append(_spend(3))
    lines_now, published = ledger.public_head()
    assert lines_now == 3 and published == ledger.head()[1] and ledger.entries()[2]["prev_hash"] == previous
    assert Ledger(tmp_path / "empty.jsonl").public_head() == (0, GENESIS_HASH)
