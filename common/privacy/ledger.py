"""The site's privacy ledger: append-only JSON lines, one per DP training call.

The ledger lives on the site's disk and is the only source of truth for what a
site has spent: across rounds, across runs, and across restarts of either side.
Each line holds everything needed to recompute epsilon without trusting the
training code (mechanism, sampling, noise, clipping, steps, delta, accountant,
versions) and the SHA-256 of the previous line, so a deleted or edited line is
detected. A chain cannot show that its *last* lines were cut off, nor that the
whole ledger was rewritten and re-hashed consistently: only an outside record of
its head can. Each reply therefore carries the ledger's head (line count and the
hash of the last line), which the coordinator records per round.

The head hash is published, so it must not reveal a line's private fields
(``users``): every line since format 2 holds a secret random ``nonce`` that
never leaves the site, which makes its hash a hiding commitment. Without it,
anyone knowing the rest of the line could hash every candidate user count.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common.errors import DataError
from common.privacy.accounting import MechanismStep, epsilon_from_history
from common.privacy.mechanisms import GRADIENT_SUM, SITE_TRUST

LEDGER_FORMAT = "fedtail-ledger/2"
UNSALTED_FORMAT = "fedtail-ledger/1"
"""Lines written before the nonce: still read and audited, but their hash is never published."""
LEDGER_FORMATS = (UNSALTED_FORMAT, LEDGER_FORMAT)
GENESIS_HASH = "0" * 64
NONCE_BYTES = 16


@dataclass(frozen=True)
class Spend:
    """One DP-SGD training call at a site: what an accountant needs, and its context."""

    run_id: str
    round: int
    site: str
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    steps: int
    delta: float
    accountant: str
    library_versions: dict[str, str]
    users: int | None = None
    """Training users at the site: stays on the site's disk with the ledger, so an auditor can check delta < 1/users."""
    privacy_unit: str = "user"
    neighbouring: str = "add or remove one user with all of their interactions at this site"
    sampling: str = "poisson"
    release: str = GRADIENT_SUM.release
    """What was released: DP-SGD weights, or the popularity sum (``common.privacy.popularity``): both Gaussian."""
    noise_placement: str = "site"
    """Who added the noise whose multiplier is recorded: this site (``site``), or the coordinator once over the sum
    of every site's clipped gradients (``central``; ``noise_multiplier`` is then that of the total noise)."""
    trust: str = SITE_TRUST
    """What the recorded epsilon relies on, in plain words."""
    share_noise_multiplier: float | None = None
    """``distributed``: the multiplier of the noise share the site added itself (``noise_multiplier``: the total's)."""
    fallback_epsilon_so_far: float | None = None
    """``distributed``: the site's epsilon so far if secure aggregation failed, every distributed step counted with its
    own share's noise alone (``common.privacy.fallback``)."""


def _line_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class LedgerLine:
    """One line as read, before anyone trusts it: ``problem`` says why it cannot be (empty when it can)."""

    number: int
    entry: dict[str, Any]
    hash: str
    problem: str = ""


def scan(path: Path) -> list[LedgerLine]:
    """Every line of a ledger with its hash and the first thing wrong with it, for readers that fail fast
    (training) and for readers that report every break (the audit)."""
    if not path.exists():
        return []
    return _scan_text(path.read_bytes().decode("utf-8"), 1, GENESIS_HASH)


def _scan_text(body: str, first_number: int, previous: str) -> list[LedgerLine]:
    """``scan`` of the ledger's lines from line ``first_number`` on (``body``), the line before them hashing to
    ``previous``; newlines read as a text file reads them (``\r\n`` and ``\r`` end a line too)."""
    lines: list[LedgerLine] = []
    for number, line in enumerate(io.StringIO(body, newline=None), start=first_number):
        text = line.rstrip("\n")
        entry: dict[str, Any] = {}
        problem = ""
        if not text:
            problem = "blank line inside the ledger (edited or truncated?)"
        else:
            try:
                entry = json.loads(text)
            except json.JSONDecodeError as error:
                problem = f"not a JSON ledger line ({error.msg}); truncated write?"
            if not problem and not isinstance(entry, dict):
                entry, problem = {}, "not a JSON object"
        if not problem and entry.get("prev_hash") != previous:
            problem = (
                "hash chain broken: this line does not follow the previous one (a line was removed, "
                "reordered or edited)"
            )
        lines.append(LedgerLine(number, entry, _line_hash(text), problem))
        previous = lines[-1].hash
    return lines


@dataclass(frozen=True)
class _Verified:
    """A ledger file's bytes as this process last verified them, and the entries and line hashes they held."""

    raw: bytes
    entries: tuple[dict[str, Any], ...]
    hashes: tuple[str, ...]


_VERIFIED: dict[Path, _Verified] = {}
"""Why: a site reads its ledger several times a round (continuity, budget, the line, the reply's head), and under
``noise = central`` a round is one step, so verifying every line on every read grew with the rounds (60 ms a round
at round 300). A read still verifies the whole file, but lines it finds byte for byte as verified before are not
parsed and hashed again."""


def _history(entries: list[dict[str, Any]]) -> list[MechanismStep]:
    return [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries]


class Ledger:
    """``Ledger(path).append(spend)``; ``.entries()`` verifies the chain on every read."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def entries(self) -> list[dict[str, Any]]:
        return self._read()[0]

    def head(self) -> tuple[int, str]:
        """(number of entries, hash of the last line): what a reader remembers to detect later truncation."""
        entries, last, _ = self._read()
        return len(entries), last

    def public_head(self) -> tuple[int, str]:
        """The head a site may publish: the line count, and the last line's hash when that line carries a nonce.

        A line without a nonce (format 1) would give its ``users`` away to a
        brute force over its hash, so its hash is withheld (an empty string).
        """
        entries, last, _ = self._read()
        hiding = not entries or isinstance(entries[-1].get("nonce"), str)
        return len(entries), last if hiding else ""

    def continues(self, count: int, last_hash: str) -> bool:
        """Whether the ledger still holds, unchanged, the first ``count`` lines it had when ``last_hash`` was read."""
        hashes = self._read()[2]
        return count == 0 or (count <= len(hashes) and hashes[count - 1] == last_hash)

    def _read(self) -> tuple[list[dict[str, Any]], str, list[str]]:
        """Every entry verified against the chain, the hash the next line must carry, and each line's hash.

        Only the lines after those this process verified before are parsed, and only while the file still starts
        with exactly the bytes verified then (``_VERIFIED``); any other change (an edit, a cut, a replaced file)
        verifies it all again. The entries are shared with later reads: read them, never change them."""
        raw = self.path.read_bytes() if self.path.exists() else b""
        key = self.path.resolve()
        known = _VERIFIED.get(key)
        if known is None or not known.raw.endswith(b"\n") or not raw.startswith(known.raw):
            known = _Verified(b"", (), ())
        previous = known.hashes[-1] if known.hashes else GENESIS_HASH
        lines = _scan_text(raw[len(known.raw) :].decode("utf-8"), len(known.hashes) + 1, previous)
        for line in lines:
            if line.problem:
                raise DataError(line.problem, self.path, line.number)
        verified = _Verified(
            raw, (*known.entries, *(line.entry for line in lines)), (*known.hashes, *(line.hash for line in lines))
        )
        _VERIFIED[key] = verified
        hashes = list(verified.hashes)
        return list(verified.entries), (hashes[-1] if hashes else GENESIS_HASH), hashes

    def records_release(self, run_id: str, round_number: int) -> bool:
        """Whether a line records ``run_id``'s round ``round_number``: only then can a site hold that round's released
        update (it is saved after its line, and lines are never removed), so only then is it worth loading."""
        return any(e.get("run_id") == run_id and e.get("round") == round_number for e in reversed(self.entries()))

    def history(self) -> list[MechanismStep]:
        return _history(self.entries())

    def epsilon(self, delta: float) -> float:
        return epsilon_from_history(self.history(), delta)

    def append(self, spend: Spend) -> dict[str, Any]:
        """Record a training call that happened; returns the line written (with the epsilon so far)."""
        entries, previous, _ = self._read()
        history = [*_history(entries), (spend.noise_multiplier, spend.sample_rate, spend.steps)]
        entry = {
            "format": LEDGER_FORMAT,
            **asdict(spend),
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "epsilon_so_far": epsilon_from_history(history, spend.delta, spend.accountant),
            "prev_hash": previous,
            "nonce": secrets.token_hex(NONCE_BYTES),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        return entry
