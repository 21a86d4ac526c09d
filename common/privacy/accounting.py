"""Privacy accounting shared by sites (spending) and auditors (checking).

Epsilon is always recomputed from the mechanism's history (noise multiplier,
sampling rate, steps per training call) by a fresh accountant, never carried
as a running number: that is what makes the site ledger auditable.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path
from typing import Literal, get_args

import dp_accounting
from dp_accounting.pld import privacy_loss_distribution
from opacus.accountants import create_accountant

from common.errors import ConfigError
from common.utils import timeline
from common.utils.files import atomic_write_text

ACCOUNTANT = "pld"
"""The spending accountant: a site calibrates its noise, checks its budget and writes its ledger lines with it.

Google's dp-accounting privacy-loss distribution (PLD) of the Poisson-subsampled Gaussian, composed numerically.
Its pessimistic discretisation makes it an upper bound on epsilon, like RDP, but a far tighter one: at the same
noise it states 8 to 12% less epsilon than Opacus' RDP, so at the same epsilon a run gets less noise
(docs/privacy.md, "Accountants")."""
LEGACY_ACCOUNTANT = "rdp"
"""What a ledger line that names no accountant was spent with: fedtail calibrated with Opacus' RDP before PLD."""
ACCOUNTANTS = ("pld", "rdp", "prv")
"""The accountants a ledger line may name: each gives an upper bound on the epsilon of its history."""
HISTORY_RECORDER = "rdp"
"""The Opacus accountant a site's PrivacyEngine keeps: only its history (noise, rate, steps) is read, never its
epsilon (Opacus has no PLD accountant)."""
PLD_DISCRETIZATION = 1e-3
"""dp-accounting's ``value_discretization_interval``: privacy losses are rounded *up* to this grid, so a coarser grid
only overstates epsilon (below noise multiplier 1 it widens as 1 / sigma, ``pld_epsilon``). 1e-3 lands within 5e-4
of 1e-4's epsilon at the settings fedtail runs (q from 0.01 to 0.5,
40 to 2,000 steps, epsilon 1 to 8) in about 0.2 s an evaluation, 8x faster than 1e-4; 1e-2 overstates by up to 0.05."""
EPSILON_TOLERANCE = 0.005
"""How close below the target epsilon a calibrated noise multiplier lands (as Opacus' ``epsilon_tolerance``)."""
MAX_NOISE_MULTIPLIER = 1e6
"""Where the calibration gives up (Opacus' ``MAX_SIGMA``): a target no such noise reaches is a configuration error."""
CACHE_DIR_ENV = "FEDTAIL_CACHE_DIR"
MechanismStep = tuple[float, float, int]
"""(noise_multiplier, sample_rate, steps): one training call, as Opacus' accountants store it."""

GradSampleMode = Literal["ghost", "hooks"]
"""How Opacus gets each user's gradient norm; both clip every per-user gradient (tests/client/test_dp.py).

``ghost`` computes the norms without materialising per-user gradients (memory
independent of the catalogue, see ``client.ghost_clipping``); ``hooks`` stores a
batch x catalogue x hidden gradient per item table. ``ghost`` is the default:
the faster of the two at every catalogue size measured and far lighter at large
ones (docs/benchmarks.md). Opacus' ``functorch`` mode is not offered: it fails
on an empty Poisson batch, which small sites draw routinely.
"""
GRAD_SAMPLE_MODES: tuple[str, ...] = get_args(GradSampleMode)


def epsilon_from_history(history: Sequence[MechanismStep], delta: float, accountant: str = ACCOUNTANT) -> float:
    """Epsilon of composing every recorded DP-SGD call at ``delta``; 0 when nothing was spent."""
    return _epsilon(merged_history(history), float(delta), accountant)


def merged_history(history: Sequence[MechanismStep]) -> tuple[MechanismStep, ...]:
    """The same composition with the steps of equal (noise multiplier, sampling rate) pairs added up.

    Composition does not depend on order, and k calls of s steps of one
    mechanism are k x s steps of it, so every accountant gives the same
    epsilon; but a ledger of one-step rounds (``noise = central``) would
    otherwise cost an accountant one evaluation per round, on every round.
    """
    merged: dict[tuple[float, float], int] = {}
    for sigma, rate, count in history:
        key = (float(sigma), float(rate))
        merged[key] = merged.get(key, 0) + int(count)
    return tuple((sigma, rate, count) for (sigma, rate), count in merged.items())


@lru_cache(maxsize=1024)
def _epsilon(history: tuple[MechanismStep, ...], delta: float, accountant: str) -> float:
    """Memoized: a fresh accountant over the same history always gives the same answer (and each takes 0.1-0.6 s)."""
    return _fresh_epsilon(history, delta, accountant)


def _fresh_epsilon(history: Sequence[MechanismStep], delta: float, accountant: str) -> float:
    if not history:
        return 0.0
    if accountant == "pld":
        return pld_epsilon(history, delta)
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"unknown accountant '{accountant}': use one of {', '.join(ACCOUNTANTS)}")
    fresh = create_accountant(accountant)
    fresh.history = list(history)
    return float(fresh.get_epsilon(delta))


def pld_epsilon(history: Sequence[MechanismStep], delta: float) -> float:
    """dp-accounting's PLD over the Poisson-subsampled Gaussian steps, add-or-remove-one-user neighbouring.

    The same operations as dp-accounting's ``PLDAccountant`` composing a ``SelfComposedDpEvent`` of a
    ``PoissonSampledDpEvent`` per history entry, in the same order, so the same number to the last bit
    (tests/common/test_accounting.py); only one step's distribution is kept between calls (``_one_step_pld``).
    """
    # The privacy loss spreads as 1/sigma: below sigma 1 the grid widens with it, so that the distribution keeps
    # about the same number of points (at sigma 1e-4, a 1e-3 grid would hold 1e8 and never finish); coarser only
    # overstates.
    interval = PLD_DISCRETIZATION * max(1.0, 1.0 / min(sigma for sigma, _, _ in history))
    composed = privacy_loss_distribution.identity(value_discretization_interval=interval)
    for sigma, rate, steps in history:
        if rate == 0:  # nobody can be sampled: no privacy loss, as the accountant skips it
            continue
        composed = composed.compose(_one_step_pld(float(sigma), float(rate), interval).self_compose(int(steps)))
    return float(composed.get_epsilon_for_delta(delta))


@lru_cache(maxsize=64)
def _one_step_pld(sigma: float, rate: float, interval: float) -> privacy_loss_distribution.PrivacyLossDistribution:
    """One Poisson-subsampled Gaussian step's privacy loss distribution (immutable: composing makes new ones).

    Why: it is 3/4 of an evaluation's time and does not depend on the step count, while a run of one-step rounds
    asks for a new step count (its ledger's, plus one) on every round."""
    return privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=sigma, value_discretization_interval=interval, sampling_prob=rate,
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    )


def calibration_cache_dir() -> Path:
    """Where a site keeps what it computed from public values only: ``$FEDTAIL_CACHE_DIR``, else the user's cache."""
    configured = os.environ.get(CACHE_DIR_ENV)
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedtail"


@lru_cache(maxsize=256)
def calibrate_noise(
    target_epsilon: float, delta: float, sample_rate: float, total_steps: int, accountant: str = ACCOUNTANT
) -> float:
    """The noise multiplier at which ``total_steps`` steps at ``sample_rate`` cost ``target_epsilon``.

    Calibrated on the *cumulative* budget of all planned rounds, not per round.
    It depends only on public plan parameters, so a resumed run gets the same
    noise as an uninterrupted one. Spending from earlier runs is not discounted
    here: the site's budget check declines rounds that would exceed it.

    The search takes a second or more, and every deployed round of a run asks the same question, so the answer is
    also kept on disk (``calibration_cache_dir``), keyed by every argument and the Opacus version; a process that
    starts cold (a restarted site runtime, a fresh ClientApp) then pays one accountant evaluation instead of the
    search. A cached value is used only if that evaluation confirms it costs the target epsilon (within the
    search's tolerance, never above): an edited or stale file gives another noise level to no one.
    """
    if target_epsilon <= 0 or not 0 < delta < 1:
        raise ConfigError(f"need epsilon > 0 and 0 < delta < 1, got epsilon={target_epsilon}, delta={delta}")
    if total_steps < 1 or not 0 < sample_rate <= 1:
        raise ConfigError(f"need steps >= 1 and 0 < sample rate <= 1, got {total_steps}, {sample_rate}")
    with timeline.stage("calibration"):
        key = json.dumps([float(target_epsilon), float(delta), float(sample_rate), int(total_steps), accountant,
                          EPSILON_TOLERANCE, PLD_DISCRETIZATION, version("opacus"), version("dp-accounting")])
        path = calibration_cache_dir() / f"noise-{hashlib.sha256(key.encode('utf-8')).hexdigest()[:32]}.json"
        cached = _cached_noise(path, key)
        if cached is not None:
            spent = epsilon_from_history([(cached, sample_rate, total_steps)], delta, accountant)
            if target_epsilon - 2 * EPSILON_TOLERANCE <= spent <= target_epsilon:
                return cached
        noise = _search_noise(target_epsilon, delta, sample_rate, total_steps, accountant)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps({"key": key, "noise_multiplier": noise}))
        except OSError:
            pass  # a cache that cannot be written (read-only home, a concurrent writer) only costs time
        return noise


def _search_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """Opacus' ``get_noise_multiplier`` bisection, step for step, for any accountant here (Opacus knows no PLD): the
    least noise found whose epsilon is below the target and within ``EPSILON_TOLERANCE`` of it."""

    def cost(noise: float) -> float:
        return _fresh_epsilon([(noise, sample_rate, steps)], delta, accountant)

    low, high, spent = 0.0, 10.0, math.inf
    while spent > target_epsilon:
        high *= 2
        if high > MAX_NOISE_MULTIPLIER:
            raise ConfigError(f"epsilon={target_epsilon} is out of reach of any noise multiplier up to 1e6")
        spent = cost(high)
    while target_epsilon - spent > EPSILON_TOLERANCE:
        middle = (low + high) / 2
        middle_spent = cost(middle)
        if middle_spent < target_epsilon:
            high, spent = middle, middle_spent
        else:
            low = middle
    return high


def _cached_noise(path: Path, key: str) -> float | None:
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
        noise = float(entry["noise_multiplier"])
        return noise if entry["key"] == key and math.isfinite(noise) and noise > 0 else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def delta_below_one_over_users(num_users: int, delta: float) -> bool:
    """The rule for delta, shared by a site's checks and the audit."""
    return delta < 1.0 / max(num_users, 1)


def check_delta(num_users: int, delta: float) -> None:
    """Delta must be below 1/users: a larger one allows a mechanism that publishes one user's data outright.

    The site operator's rule, checked where the exact count may be seen: by
    ``fedtail deploy check`` at the site, a simulation's launcher, and the
    audit (from the ledger, on the site's side). Never in a round: a decline
    for it would tell the coordinator about the count.
    """
    if not delta_below_one_over_users(num_users, delta):
        raise ConfigError(
            f"delta={delta:g} is not below 1/users = 1/{num_users} at this site; "
            "a delta that large allows releasing a user's data outright"
        )


def model_selection_statement(kept_round: int, candidate_rounds: int, validation_users: int) -> str:
    """What choosing the kept model on validation items releases, with its size: a "not covered" entry.

    The released rounds are DP outputs, but picking one of them by the held-out
    items of the same users is a function of those items outside any ledger.
    """
    return (
        f"Model selection (best-validation): the kept model is round {kept_round}, chosen among {candidate_rounds} "
        f"released rounds by NDCG@10 on the held-out validation items of {validation_users} users. In simulation "
        "these are the same users whose training data the sites hold, so the choice is a non-private function of "
        "their held-out items, not post-processing of the DP releases alone; it is in no ledger "
        "(model-selection=last keeps the last round and avoids it)."
    )
