"""One site's round: the budget check against its ledger, replay of a released update, DP training, the ledger line.

Before training, the round's cost is checked against the site's own budget
using the ledger on the site's disk; a round that would overspend is declined
and nothing is trained. A round retried with the same global model re-sends
the update already released (``client.replay``). The ledger line is written
(and fsynced) before the update leaves the site.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from functools import cache
from importlib.metadata import version
from typing import Any

import torch

from client.clipped_sum import clipped_sum
from client.delta_sum import clipped_delta_sum
from client.dp_sgd import train_non_private, train_private
from client.replay import ReleasedUpdate, weights_fingerprint
from client.secure_aggregation import noise_share
from common.data.split import TrainingExamples
from common.errors import ConfigError
from common.privacy.accounting import ACCOUNTANT, MechanismStep, epsilon_from_history
from common.privacy.fallback import fallback_epsilon
from common.privacy.ledger import Ledger, Spend
from common.protocol.round_plan import LocalTraining, PrivacyPlan, plan_round, round_mechanism
from common.protocol.secure_sum import sum_bound
from common.recommender.model import SASRec
from common.utils import timeline

BUDGET_TOLERANCE = 1e-9


@dataclass(frozen=True)
class RoundOutcome:
    """``state_dict`` is None when the site declined; ``epsilon`` is the site's total after this round.

    Under ``noise = central`` ``state_dict`` is not weights but the round's sum of clipped per-user gradients of the
    trainable parameters (``client.clipped_sum``), or with ``user-update = delta`` of clipped per-user model deltas
    (``client.delta_sum``)."""

    state_dict: dict[str, torch.Tensor] | None
    epsilon: float
    declined_reason: str = ""


def train_site_round(
    model: SASRec,
    examples: TrainingExamples,
    training: LocalTraining,
    privacy: PrivacyPlan,
    ledger: Ledger | None,
    run_id: str,
    round_number: int,
    site: str,
    device: torch.device,
    seed: int,
) -> RoundOutcome:
    """Train ``model`` (holding the global weights) for one round; record the spend before returning.

    Under DP every outcome (trained, replayed, declined for the budget) and
    every number in it is a function of public values and of the ledger's
    history, never of how many users the site has: a site with no users at
    all trains too, and releases pure noise (under ``noise = central``: a sum
    of zeros, which the coordinator's noise covers as it covers any sum).
    """
    torch.manual_seed(seed)  # dropout and the like: public randomness is fine there
    if not privacy.enabled:
        warnings.warn("NON-PRIVATE training at this site: no clipping, no noise, no privacy guarantee", stacklevel=2)
        train_non_private(model, examples, training, device, torch.Generator().manual_seed(seed))
        return RoundOutcome(_weights(model), float("inf"))

    if ledger is None:
        raise ConfigError("DP training needs a ledger on the site's disk")
    plan = plan_round(training, privacy)
    mechanism = round_mechanism(privacy, plan)  # its halves run where privacy.noise_placement says
    released = ReleasedUpdate(ledger.path.with_suffix(".last-update.pt"))
    global_fingerprint = weights_fingerprint(model.state_dict())
    history = ledger.history()
    spent = epsilon_from_history(history, privacy.delta)
    retried = ledger.records_release(run_id, round_number)  # else there is nothing to re-send: skip loading it
    replay = released.find(run_id, round_number, global_fingerprint) if retried else None
    if replay is not None:
        return RoundOutcome(replay, spent)
    checked = max(1, privacy.planned_rounds - round_number + 1) if privacy.whole_run else 1
    what = "round" if checked == 1 else f"window's remaining {checked} rounds"
    refusal = over_budget(history, mechanism.step, privacy, what, checked)
    fallback = None
    if not refusal and mechanism.placement == "distributed":
        fallback, refusal = over_fallback_cap(ledger.entries(), mechanism.share_step, privacy, what, checked)
    if refusal:
        return RoundOutcome(None, spent, refusal)
    if mechanism.placement in ("central", "distributed"):  # the individual half here, the noise after the sum
        user_sum = clipped_delta_sum if training.user_update == "delta" else clipped_sum
        with timeline.stage("clipped-sum"):
            weights = user_sum(model, examples, training, mechanism.clip, device)
        if mechanism.placement == "distributed":
            weights = noise_share(weights, mechanism, sum_bound(mechanism.clip, training.batch_size))
    else:  # both halves here, inside Opacus' DP-SGD steps; the ledger records what Opacus' accountant recorded
        noise_multiplier, sample_rate, steps = train_private(model, examples, training, privacy, plan, device)
        mechanism = replace(mechanism, noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        weights = _weights(model)
    entry = ledger.append(
        Spend(
            run_id=run_id,
            round=round_number,
            site=site,
            delta=privacy.delta,
            accountant=ACCOUNTANT,
            library_versions=library_versions(),
            users=len(examples),
            **mechanism.ledger_fields(fallback),
        )
    )
    released.save(run_id, round_number, global_fingerprint, weights)
    return RoundOutcome(weights, float(entry["epsilon_so_far"]))  # composed at privacy.delta, as the ledger line


def over_budget(
    history: list[MechanismStep], step: MechanismStep, privacy: PrivacyPlan, what: str, repeats: int = 1
) -> str:
    """Why ``repeats`` x ``step`` after ``history`` would overspend the site's budget; "" when it fits.

    A site with a window-epsilon checks a window's remaining rounds at once (``repeats``), so that a window
    crossing the lifetime cap is declined whole rather than trained in part.
    """
    spent = epsilon_from_history(history, privacy.delta)
    after = epsilon_from_history([*history, *[step] * repeats], privacy.delta)
    if after <= privacy.budget + BUDGET_TOLERANCE:
        return ""
    cap = "lifetime cap" if privacy.whole_run else "budget"
    return (
        f"declined: this {what} would raise the site's epsilon from {spent:.3f} to {after:.3f} at delta "
        f"{privacy.delta:g}, above its {cap} of {privacy.budget:g}"
    )


def over_fallback_cap(
    entries: list[dict[str, Any]], share_step: MechanismStep, privacy: PrivacyPlan, what: str, repeats: int = 1
) -> tuple[float, str]:
    """A ``distributed`` release of ``share_step`` (the site's own share: its multiplier, rate, steps) after the
    ledger's ``entries``: the fallback epsilon after it, and why it is declined ("" when ``repeats`` such releases
    keep the fallback within the site's ``max-fallback-epsilon``).

    The fallback is what the site's own noise is worth if secure aggregation failed (``common.privacy.fallback``);
    checked before the release, as the budget is, so that a coordinator cannot take it past the cap.
    """
    line = {"noise_placement": "distributed", "share_noise_multiplier": share_step[0], "sample_rate": share_step[1],
            "steps": share_step[2]}
    after = fallback_epsilon([*entries, line], privacy.delta)
    last = after if repeats == 1 else fallback_epsilon([*entries, *[line] * repeats], privacy.delta)
    if last <= privacy.fallback_cap + BUDGET_TOLERANCE:
        return after, ""
    return after, (
        f"declined: this {what} would raise the site's fallback epsilon (its own noise shares alone, should secure "
        f"aggregation fail) to {last:.3f} at delta {privacy.delta:g}, above its max-fallback-epsilon of "
        f"{privacy.fallback_cap:g}"
    )


def library_versions() -> dict[str, str]:
    """What every ledger line records; read once a process (each read of a package's metadata takes milliseconds,
    and a run of one-step rounds writes a line every round). A site upgrades its libraries by restarting."""
    return dict(_installed_versions())


@cache
def _installed_versions() -> tuple[tuple[str, str], ...]:
    return tuple((name, version(name)) for name in ("opacus", "torch", "flwr"))


def _weights(model: SASRec) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
