"""The ServerApp's round loop for many cheap rounds: validation every N rounds and the last, the central statement."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from common.federation import RunSettings
from common.privacy.mechanisms import CENTRAL_STATEMENT
from common.recommender.model import SASRec
from server.app import finish_round, keep_if_best, privacy_summary
from server.central_noise import central_strategy
from server.evaluator import Evaluator
from simulations.report import format_federated_summary

SETTINGS = dict(dataset="synthetic:users=120,items=80,seed=3", rounds=7, epsilon=4.0, delta=1e-4, hidden=16, heads=1,
                blocks=1, max_len=10, noise="central", evaluate_every=3)


def test_rounds_are_validated_every_n_and_the_last_and_the_best_is_chosen_among_them(tmp_path: Path) -> None:
    settings = RunSettings(**SETTINGS, out_dir=str(tmp_path))
    evaluator = Evaluator.from_settings(settings)
    model = SASRec(settings.model_config(evaluator.catalog.num_items))
    strategy = central_strategy(settings)
    strategy.last_round.trained = ["0"]
    best = None
    validated = []
    for number in range(1, 8):
        started = time.perf_counter()
        record = finish_round(number, model, torch.device("cpu"), evaluator, strategy, settings, "r", started)
        validated.append(record.valid is not None)
        best = keep_if_best(best, record, model.state_dict())
    assert validated == [False, False, True, False, False, True, True]
    assert best is not None and best.round in (3, 6, 7)


def test_the_summary_says_that_central_noise_trusts_the_coordinator() -> None:
    summary = privacy_summary(RunSettings(**SETTINGS), {"0": 3.9, "1": 4.0})
    assert summary["noise"] == "central" and summary["trust"] == CENTRAL_STATEMENT
    assert "against the coordinator itself a site's release is NOT private" in summary["guarantee"]
    assert "noise" not in privacy_summary(RunSettings(**{**SETTINGS, "noise": "site"}), {"0": 3.9})


def test_the_printed_summary_names_the_trust() -> None:
    privacy = privacy_summary(RunSettings(**SETTINGS), {"0": 3.9})
    metrics = {"overall": {"users": 1}, "groups": {group: {"users": 0} for group in ("tail", "torso", "head")}}
    assert f"trust: {CENTRAL_STATEMENT}" in format_federated_summary({**metrics, "privacy": privacy})
