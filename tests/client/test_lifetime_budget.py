"""Budgets over a lifetime: windows' spend composes in one ledger, and a window that would cross the cap is
declined whole, with the reason, before anything is trained or recorded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from client.policy import DEPLOYED_WINDOW_SHARE, SitePolicy
from client.site_round import RoundOutcome, over_budget, train_site_round
from common.data.split import TrainingExamples, training_examples
from common.errors import ConfigError
from common.federation import RunSettings
from common.privacy.accounting import epsilon_from_history
from common.privacy.ledger import Ledger
from common.privacy.lifetime import lifetime_spend, window_epsilon
from common.protocol.round_plan import LocalTraining, PrivacyPlan, plan_round
from common.recommender.model import ModelConfig, SASRec

CONFIG = ModelConfig(num_items=25, max_len=6, hidden=8, heads=2, blocks=1, dropout=0.0)
TRAINING = LocalTraining(sample_rate=0.5, batch_size=5, local_epochs=1.0)
ROUNDS, DELTA, LIFETIME, WINDOWS = 2, 1e-4, 4.0, 3


def _examples() -> TrainingExamples:
    rng = np.random.default_rng(0)
    return training_examples([rng.choice(np.arange(1, 26), size=6, replace=False) for _ in range(20)], CONFIG.max_len)


def _window(ledger: Ledger, policy: SitePolicy, target: float, run: str) -> list[RoundOutcome]:
    settings = RunSettings(epsilon=target, delta=DELTA, rounds=ROUNDS, sample_rate=TRAINING.sample_rate)
    privacy = PrivacyPlan.from_settings(settings, policy)
    examples = _examples()
    return [
        train_site_round(SASRec(CONFIG), examples, TRAINING, privacy, ledger, run, r, "0", torch.device("cpu"), r)
        for r in range(1, ROUNDS + 1)
    ]


def test_windows_compose_in_one_ledger_and_the_window_crossing_the_lifetime_cap_is_declined(tmp_path: Path) -> None:
    steps = plan_round(TRAINING, PrivacyPlan()).steps * ROUNDS
    target = window_epsilon(LIFETIME, WINDOWS, DELTA, TRAINING.sample_rate, steps)
    assert LIFETIME / WINDOWS < target, "RDP composes sublinearly: more than an even split"
    assert lifetime_spend(target, WINDOWS, DELTA, TRAINING.sample_rate, steps) <= LIFETIME
    policy = SitePolicy(max_epsilon=LIFETIME, delta=DELTA, window_epsilon=target)
    ledger = Ledger(tmp_path / "site-0.jsonl")
    after_window = []
    for window in range(WINDOWS):
        outcomes = _window(ledger, policy, target, f"window-{window + 1}")
        assert all(o.state_dict is not None for o in outcomes)
        after_window.append(outcomes[-1].epsilon)
    entries = ledger.entries()
    assert [e["run_id"] for e in entries] == [f"window-{w}" for w in (1, 2, 3) for _ in range(ROUNDS)]
    steps_of = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries]
    recomputed = epsilon_from_history(steps_of, DELTA)
    assert after_window[-1] == pytest.approx(recomputed, rel=1e-9), "the last reply is the composition of all windows"
    assert after_window[0] < after_window[1] < after_window[2] <= LIFETIME
    first_window_alone = epsilon_from_history(steps_of[:ROUNDS], DELTA)
    assert after_window[0] == pytest.approx(first_window_alone, rel=1e-9)

    ledger_before = ledger.path.read_text()
    fourth = _window(ledger, policy, target, "window-4")
    assert all(o.state_dict is None for o in fourth), "declined whole, not trained in part"
    assert f"this window's remaining {ROUNDS} rounds would raise" in fourth[0].declined_reason
    assert "above its lifetime cap of 4" in fourth[0].declined_reason
    assert fourth[0].epsilon == pytest.approx(after_window[-1])
    assert ledger.path.read_text() == ledger_before, "a declined window records nothing"


def test_a_run_asking_more_than_the_sites_window_epsilon_is_declined_on_public_input() -> None:
    policy = SitePolicy.from_node_config({"max-epsilon": 8.0, "window-epsilon": "3"}, deployed=True)
    assert policy.window_epsilon == 3.0
    assert "window-epsilon=3" in policy.decline_reason(RunSettings(epsilon=4.0))
    assert policy.decline_reason(RunSettings(epsilon=3.0)) == ""
    with pytest.raises(ConfigError, match="window-epsilon=9"):
        SitePolicy(max_epsilon=8.0, window_epsilon=9.0)


def test_a_deployed_site_caps_every_run_at_half_its_budget_unless_it_says_otherwise() -> None:
    """Whoever can submit a run chooses its epsilon; by default no single run may spend a deployed site's whole
    budget. Simulated sites keep no cap, so simulations are unchanged; a site's own node config decides."""
    deployed = SitePolicy.from_node_config({"max-epsilon": 8.0}, deployed=True)
    assert deployed.window_epsilon == 8.0 * DEPLOYED_WINDOW_SHARE == 4.0
    whole_budget = RunSettings(epsilon=8.0, delta=deployed.delta)
    assert "at most window-epsilon=4 per run" in deployed.decline_reason(whole_budget)
    assert deployed.decline_reason(RunSettings(epsilon=4.0, delta=deployed.delta)) == ""
    assert PrivacyPlan.from_settings(whole_budget, deployed).whole_run, "a run crossing the budget is declined whole"
    simulated = SitePolicy.from_node_config({"partition-id": 0, "max-epsilon": 8.0}, deployed=False)
    assert simulated.window_epsilon == 0.0 and simulated.decline_reason(whole_budget) == ""
    for chosen, cap in ((0, 0.0), (8.0, 8.0), (1.5, 1.5)):
        policy = SitePolicy.from_node_config({"max-epsilon": 8.0, "window-epsilon": chosen}, deployed=True)
        assert policy.window_epsilon == cap


def test_a_site_checks_its_budget_with_the_accountant_it_calibrates_and_records_with(tmp_path: Path) -> None:
    """PLD throughout: the run is calibrated to its target under PLD (RDP would put it above), every round fits a
    budget of exactly that target, and each ledger line names PLD and composes with it."""
    target = 4.0
    settings = RunSettings(epsilon=target, delta=DELTA, rounds=ROUNDS, sample_rate=TRAINING.sample_rate)
    plan = plan_round(TRAINING, PrivacyPlan.from_settings(settings))
    run_steps = [(plan.noise_multiplier, plan.sample_rate, plan.steps)] * ROUNDS
    pld, rdp = epsilon_from_history(run_steps, DELTA, "pld"), epsilon_from_history(run_steps, DELTA, "rdp")
    assert pld <= target < rdp
    ledger = Ledger(tmp_path / "site-0.jsonl")
    outcomes = _window(ledger, SitePolicy(max_epsilon=target, delta=DELTA), target, "run")
    assert all(o.state_dict is not None for o in outcomes), [o.declined_reason for o in outcomes]
    assert [e["accountant"] for e in ledger.entries()] == ["pld"] * ROUNDS
    assert outcomes[-1].epsilon == pytest.approx(pld)
    # The check itself: a budget between PLD's and RDP's epsilon of one more round admits it.
    privacy = PrivacyPlan(target_epsilon=target, delta=DELTA, max_epsilon=(pld + rdp) / 2)
    assert over_budget(run_steps[:-1], run_steps[-1], privacy, "round") == ""
    assert "declined" in over_budget(run_steps, run_steps[-1], privacy, "round")
