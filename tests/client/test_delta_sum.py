"""User-level DP-FedAvg at a site: each sampled user's clipped model delta, vectorised over users, summed."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from client.delta_sum import clip_factors, clipped_delta_sum, user_deltas
from client.site_round import train_site_round
from common.data.split import training_examples
from common.privacy.ledger import Ledger
from common.protocol.round_plan import LocalTraining, PrivacyPlan
from common.recommender.item_tables import apply_item_tables
from common.recommender.model import ModelConfig, SASRec, per_user_loss
from tests.client.test_hostile_coordinator import POISONED_ITEM, _sequences

CONFIG = ModelConfig(num_items=25, max_len=6, hidden=16, heads=2, blocks=1, dropout=0.0, tied_items=True)
CPU = torch.device("cpu")


def _examples(users: int, seed: int = 0):
    return training_examples(_sequences(seed, users), CONFIG.max_len)


def _model(item_tables: str = "tied", seed: int = 0, dropout: float = 0.0) -> SASRec:
    torch.manual_seed(seed)
    config = ModelConfig(**{**CONFIG.as_dict(), "tied_items": item_tables == "tied", "dropout": dropout})
    model = SASRec(config)
    apply_item_tables(model, item_tables)
    return model


def _looped_delta(model: SASRec, inputs: torch.Tensor, targets: torch.Tensor, steps: int, rate: float
                  ) -> dict[str, torch.Tensor]:
    """One user's theta_K - theta_0, trained alone with torch.optim.SGD: the reference the vectorised code must
    match."""
    alone = copy.deepcopy(model)
    optimizer = torch.optim.SGD([p for p in alone.parameters() if p.requires_grad], lr=rate)
    for _ in range(steps):
        optimizer.zero_grad()
        per_user_loss(alone(inputs.unsqueeze(0)), targets.unsqueeze(0)).sum().backward()
        optimizer.step()
    before = dict(model.named_parameters())
    return {name: (p - before[name]).detach() for name, p in alone.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("item_tables", ["tied", "trained", "frozen"])
def test_the_vectorised_deltas_equal_each_user_trained_alone(item_tables: str) -> None:
    model = _model(item_tables).eval()
    examples = _examples(7)
    training = LocalTraining(user_steps=3, user_learning_rate=0.5)
    deltas, finite = user_deltas(model, examples.inputs, examples.targets, training)
    assert bool(finite.all())
    assert set(deltas) == {name for name, p in model.named_parameters() if p.requires_grad}
    if item_tables == "frozen":
        assert "output.weight" not in deltas and "item_embedding.weight" not in deltas
    for user in range(len(examples)):
        alone = _looped_delta(model, examples.inputs[user], examples.targets[user], 3, 0.5)
        for name, delta in alone.items():
            torch.testing.assert_close(deltas[name][user], delta, rtol=1e-4, atol=1e-6, msg=f"user {user}: {name}")
    assert max(float(d.abs().max()) for d in deltas.values()) > 1e-3, "the users' training moved the weights"


def test_every_clipped_delta_has_norm_at_most_c_and_the_site_sends_their_sum() -> None:
    """Recomputed from a plain per-user loop: each user's delta clipped to C, summed over every user (rate 1)."""
    model = _model().eval()
    examples = _examples(11, seed=1)
    clip = 0.05
    training = LocalTraining(sample_rate=1.0, user_steps=2, user_learning_rate=0.5)
    deltas, finite = user_deltas(model, examples.inputs, examples.targets, training)
    kept, factors = clip_factors(deltas, finite, clip)
    assert bool(kept.all())
    norms = torch.stack([d.flatten(1).norm(dim=1) for d in deltas.values()]).norm(dim=0)
    assert float(norms.min()) > clip, "every user's delta is clipped here"
    clipped_norms = factors * norms
    assert float(clipped_norms.max()) <= clip * (1 + 1e-5)
    expected: dict[str, torch.Tensor] = {}
    for user in range(len(examples)):
        alone = _looped_delta(model, examples.inputs[user], examples.targets[user], 2, 0.5)
        norm = torch.stack([d.norm() for d in alone.values()]).norm()
        assert float(norm * min(1.0, clip / float(norm))) <= clip * (1 + 1e-5)
        for name, delta in alone.items():
            expected[name] = expected.get(name, 0) + delta * min(1.0, clip / float(norm))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    summed = _eval_sum(model, examples, training, clip)
    assert set(summed) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(summed[name], value, rtol=1e-4, atol=1e-7, msg=name)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "the global weights are kept"


def _eval_sum(model: SASRec, examples: object, training: LocalTraining, clip: float) -> dict[str, torch.Tensor]:
    """``clipped_delta_sum`` with dropout off (it puts the model in training mode; dropout 0 makes that moot)."""
    assert model.config.dropout == 0.0
    return clipped_delta_sum(model, examples, training, clip, CPU, chunk_users=3)  # type: ignore[arg-type]


def test_a_user_whose_training_is_not_finite_adds_exactly_nothing() -> None:
    """An item row past the box (a site refuses it on arrival; set here directly) makes its holder's forward pass
    overflow. The sum with the holder must be the sum without them, and finite."""
    model = _model("trained")  # the input table alone: a poisoned tied row would score every user's positions
    with torch.no_grad():
        model.item_embedding.weight[POISONED_ITEM] = 1e38  # type: ignore[union-attr]
    holder = np.array([3, POISONED_ITEM, 5, 8, 2])
    others = _sequences(2, 6)
    # A box wide enough to hold the row: the site's own box would clamp it for every user after the first step.
    training = LocalTraining(sample_rate=1.0, user_steps=2, user_learning_rate=0.5, max_abs_weight=3e38)
    with_holder = training_examples([*others[:3], holder, *others[3:]], CONFIG.max_len)
    deltas, finite = user_deltas(model, with_holder.inputs, with_holder.targets, training)
    kept, factors = clip_factors(deltas, finite, 0.05)
    assert kept.tolist() == [True, True, True, False, True, True, True] and float(factors[3]) == 0.0
    summed = _eval_sum(model, with_holder, training, 0.05)
    without = _eval_sum(model, training_examples(others, CONFIG.max_len), training, 0.05)
    assert all(bool(torch.isfinite(value).all()) for value in summed.values())
    assert max(float(value.abs().max()) for value in without.values()) > 0
    for name, value in without.items():
        torch.testing.assert_close(summed[name], value, rtol=1e-5, atol=1e-7, msg=name)


def test_a_huge_user_learning_rate_keeps_every_weight_in_the_box_and_every_delta_clipped() -> None:
    """A coordinator's 1e30 (beyond the site's range, which declines it first) moves every weight to the box's end
    after one step; every later forward pass still runs on bounded weights, and the sum stays finite and clipped."""
    model = _model()
    examples = _examples(5, seed=3)
    training = LocalTraining(sample_rate=1.0, user_steps=3, user_learning_rate=1e30, max_abs_weight=2.0)
    deltas, finite = user_deltas(model, examples.inputs, examples.targets, training)
    start = dict(model.named_parameters())
    for name, delta in deltas.items():
        assert float((start[name].detach() + delta).abs().max()) <= 2.0 + 1e-6, name
    kept, factors = clip_factors(deltas, finite, 1.0)
    summed = _eval_sum(model, examples, training, 1.0)
    total = torch.stack([value.norm() for value in summed.values()]).norm()
    assert bool(torch.isfinite(total)) and float(total) <= int(kept.sum()) * (1 + 1e-5)


def test_dropout_masks_are_drawn_per_user() -> None:
    """Two users with the same history, dropout on: their deltas differ (one mask for all would make them equal)."""
    model = _model(dropout=0.5).train()
    examples = training_examples([np.array([3, 4, 5, 6, 7])] * 2, CONFIG.max_len)
    deltas, _ = user_deltas(model, examples.inputs, examples.targets, LocalTraining(user_steps=1))
    assert not torch.allclose(deltas["final_norm.weight"][0], deltas["final_norm.weight"][1])


@pytest.mark.parametrize("placement", ["central", "distributed"])
def test_a_delta_round_is_accounted_exactly_as_a_gradient_round(tmp_path: Path, placement: str) -> None:
    """Same mechanism in the ledger (noise, rate, one step, clip, placement, epsilon): the sensitivity is C either
    way; the site sends a sum of the trainable parameters' shape (under distributed, with its noise share)."""
    examples = _examples(30, seed=4)
    privacy = PrivacyPlan(target_epsilon=4.0, planned_rounds=3, noise_placement=placement, noise_shares=3,
                          max_fallback_epsilon=float("inf"))
    lines = {}
    for update in ("gradient", "delta"):
        model = _model()
        training = LocalTraining(sample_rate=0.5, batch_size=15, user_update=update)
        ledger = Ledger(tmp_path / f"site-{update}.jsonl")
        outcome = train_site_round(model, examples, training, privacy, ledger, "run", 1, "north", CPU, seed=0)
        assert outcome.state_dict is not None
        assert {k: v.shape for k, v in outcome.state_dict.items()} == {
            name: p.shape for name, p in model.named_parameters() if p.requires_grad}
        (lines[update],) = ledger.entries()
    mechanism = ("noise_placement", "noise_multiplier", "sample_rate", "steps", "max_grad_norm", "epsilon_so_far")
    assert [lines["delta"][key] for key in mechanism] == [lines["gradient"][key] for key in mechanism]
    assert lines["delta"]["noise_placement"] == placement and lines["delta"]["steps"] == 1


def test_no_local_step_is_an_error_naming_the_setting_and_leaves_the_weights_alone() -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    examples = _examples(2)
    with pytest.raises(ValueError, match="user-steps=0: must be at least 1"):
        user_deltas(model, examples.inputs, examples.targets, LocalTraining(user_steps=0))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
