"""Empirical privacy audit: plant canary users, train through Flower, measure how much the model gives away.

Canaries are synthetic users whose histories are random sequences of long-tail
items: nothing else in the data predicts them, so a model that ranks a member
canary's items higher than a non-member's has memorised that user. Each
canary is planted with probability 1/2 (the coin flips are the auditor's
secret, kept in ``canaries.json``), the federation trains as usual (real
Simulation Engine, real DP at the sites), and the global model scores every
canary by the log-likelihood of its training items. ``simulations.empirical`` turns
the guesses into an epsilon lower bound valid at the stated confidence.

That bound must stay at or below the accountant's epsilon; a non-private run
is the positive control that shows the attack has teeth.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.data.catalog import Catalog
from common.data.datasets import load_dataset
from common.data.split import item_popularity, training_examples
from common.errors import ConfigError
from common.federation import RunSettings
from common.recommender.artifacts import load_model
from common.recommender.model import per_user_loss
from common.recommender.training import pick_device
from common.run_files import GLOBAL_MODEL_FILE
from common.utils.files import atomic_write_text, write_json
from common.utils.progress import log
from simulations.audit import audit
from simulations.audit.report import write_audit
from simulations.empirical import EmpiricalBound, audit_guesses
from simulations.simulate import Resources, simulate

CANARY_DATA, CANARY_SECRET, EMPIRICAL_JSON, EMPIRICAL_MARKDOWN = (
    "canary-data.txt", "canaries.json", "empirical-audit.json", "empirical-audit.md"
)
RUN_SUBFOLDER = "run"


@dataclass(frozen=True)
class CanaryConfig:
    canaries: int = 1000
    length: int = 20
    tail_share: float = 0.5
    """Canary items come from this least-popular share of the catalogue."""
    confidence: float = 0.95
    seed: int = 12345

    def __post_init__(self) -> None:
        if self.canaries < 10 or self.length < 4 or not 0 < self.tail_share <= 1 or not 0.5 < self.confidence < 1:
            raise ConfigError("need >= 10 canaries of length >= 4, tail share in (0, 1], confidence in (0.5, 1)")


@dataclass(frozen=True)
class Canaries:
    sequences: list[np.ndarray]
    """Catalogue indices, oldest first."""
    members: np.ndarray
    """True where the canary was planted in the training data."""


def draw_canaries(popularity: np.ndarray, config: CanaryConfig) -> Canaries:
    """Random long-tail histories, each a member with probability 1/2 (independent coin flips)."""
    rng = np.random.default_rng(config.seed)
    items = np.argsort(popularity[1:], kind="stable") + 1  # least popular first; index 0 is padding
    pool = items[: max(config.length, int(len(items) * config.tail_share))]
    if len(pool) < config.length:
        raise ConfigError(f"the catalogue has {len(items)} items, fewer than a canary's length {config.length}")
    sequences = [rng.choice(pool, size=config.length, replace=False) for _ in range(config.canaries)]
    return Canaries(sequences, rng.random(config.canaries) < 0.5)


def write_planted_data(path: Path, sequences: list[np.ndarray], canaries: Canaries, catalog: Catalog) -> None:
    """The training data with the member canaries added, in the ``sequences`` format (one user per line)."""
    planted = [seq for seq, member in zip(canaries.sequences, canaries.members, strict=True) if member]
    lines = [
        f"{user} " + " ".join(catalog.raw_id(int(i)) for i in sequence)
        for user, sequence in enumerate([*sequences, *planted], start=1)
    ]
    atomic_write_text(path, "\n".join(lines) + "\n")


def score_canaries(model_dir: Path, canaries: Canaries, max_len: int) -> np.ndarray:
    """Mean log-likelihood of each canary's training items under the global model (higher: more likely seen)."""
    device = pick_device()
    model, _ = load_model(model_dir, GLOBAL_MODEL_FILE, device)
    model.eval()
    examples = training_examples(canaries.sequences, max_len)
    scores = []
    with torch.no_grad():
        for start in range(0, len(examples), 256):
            inputs = examples.inputs[start : start + 256].to(device)
            targets = examples.targets[start : start + 256].to(device)
            scores.append(-per_user_loss(model(inputs), targets, "ce").cpu())
    return torch.cat(scores).numpy()


def run_empirical_audit(settings: RunSettings, resources: Resources, config: CanaryConfig) -> dict[str, Any]:
    """Plant, train through Flower, score, bound; writes the report into ``settings.out_dir``."""
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dataset = load_dataset(settings.dataset, kcore=settings.kcore)
    catalog = dataset.catalog()
    _, sequences = dataset.sequences(catalog)
    canaries = draw_canaries(item_popularity(sequences, catalog.num_items), config)
    write_planted_data(out / CANARY_DATA, sequences, canaries, catalog)
    write_json(
        out / CANARY_SECRET,
        {
            "members": canaries.members.tolist(),
            "sequences": [[catalog.raw_id(int(i)) for i in s] for s in canaries.sequences],
            "config": asdict(config),
        },
    )
    log(f"fedtail: planted {int(canaries.members.sum())} of {config.canaries} canaries; training through Flower")
    run_dir = out / RUN_SUBFOLDER
    summary = simulate(replace(settings, dataset=f"sequences:{out / CANARY_DATA}", out_dir=str(run_dir)), resources)
    scores = score_canaries(run_dir, canaries, settings.max_len)
    delta = settings.delta if settings.dp else 1e-5
    bound = audit_guesses(scores, canaries.members, delta, config.confidence)
    accountant = None
    if settings.dp:
        ledger_audit = audit([run_dir])
        write_audit(ledger_audit, run_dir)
        accountant = ledger_audit.epsilon
    report = empirical_report(bound, accountant, settings, scores, canaries.members, summary)
    write_json(out / EMPIRICAL_JSON, report)
    atomic_write_text(out / EMPIRICAL_MARKDOWN, format_empirical(report))
    return report


def empirical_report(
    bound: EmpiricalBound, accountant_epsilon: float | None, settings: RunSettings, scores: np.ndarray,
    members: np.ndarray, summary: dict[str, Any],
) -> dict[str, Any]:
    if accountant_epsilon is None:
        verdict = (
            "positive control: leakage found, the attack works" if bound.epsilon_lower_bound > 0
            else "POSITIVE CONTROL FOUND NO LEAKAGE: this audit is too weak to mean anything at this setting"
        )
    elif bound.epsilon_lower_bound > accountant_epsilon:
        verdict = "PRIVACY BUG: the empirical lower bound EXCEEDS the accountant's epsilon; the guarantee is false"
    else:
        verdict = "consistent: the empirical lower bound is at or below the accountant's epsilon"
    return {
        "dp": settings.dp,
        "accountant_epsilon": accountant_epsilon,
        "delta": settings.delta if settings.dp else None,
        "empirical_epsilon_lower_bound": bound.epsilon_lower_bound,
        "confidence": bound.confidence,
        "canaries": bound.canaries,
        "members": bound.members,
        "best_guess": asdict(bound.best),
        "guesses": [asdict(outcome) for outcome in bound.outcomes],
        "mean_score": {"members": float(scores[members].mean()), "non_members": float(scores[~members].mean())},
        "verdict": verdict,
        "settings": settings.to_run_config(),
        "test_ndcg@10": summary["overall"]["ndcg@10"],
    }


def format_empirical(report: dict[str, Any]) -> str:
    accountant = report["accountant_epsilon"]
    best = report["best_guess"]
    return "\n".join(
        [
            "# Empirical privacy audit (canaries)",
            "",
            f"**{report['verdict']}.**",
            "",
            "| | value |",
            "|---|---|",
            f"| training | {'DP-SGD' if report['dp'] else 'NON-PRIVATE (control)'} |",
            "| accountant epsilon (ledgers, each site's own accountant) | "
            f"{'none' if accountant is None else f'{accountant:.3f}'} |",
            f"| empirical epsilon lower bound | {report['empirical_epsilon_lower_bound']:.3f} "
            f"at {report['confidence']:.0%} confidence |",
            f"| canaries (planted) | {report['canaries']} ({report['members']}) |",
            f"| best guess set | {best['guesses']} guesses, {best['correct']} correct |",
            f"| mean log-likelihood, members / non-members | {report['mean_score']['members']:.3f} / "
            f"{report['mean_score']['non_members']:.3f} |",
            "",
            "Method: one-run audit (Steinke, Nasr & Jagielski 2023). Each canary user, a random sequence of "
            "long-tail items, was planted with probability 1/2; the global model scored each by the "
            "log-likelihood of its training items; the top and bottom shares of the scores were guessed member "
            "and non-member, at shares fixed in advance, with a Bonferroni correction over them.",
            "",
        ]
    )
