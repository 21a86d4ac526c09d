"""item-tables=tied: one table embeds and scores; each user's gradient of it (both uses added) is clipped exactly.

The trap this guards (../shared/DESIGN.md): a table used twice whose second use Opacus does not see, or whose two
per-user parts are clipped apart, gives a per-user gradient larger than C and a false guarantee. The ground
truth is plain autograd on one user at a time (tests/gradients.py), which adds both uses by itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from client.clipped_sum import clipped_sum
from client.dp_sgd import make_private
from client.site_round import train_site_round
from common.data.catalog import PADDING_INDEX
from common.data.split import training_examples
from common.federation import RunSettings
from common.privacy.accounting import GRAD_SAMPLE_MODES
from common.privacy.ledger import Ledger
from common.protocol.round_plan import LocalTraining, PrivacyPlan, RoundPlan
from common.recommender.content import initialise_items
from common.recommender.continuation import grow_items
from common.recommender.model import ModelConfig, SASRec, TiedItemTable
from tests.gradients import mean_of_clipped, norm, true_per_user_gradients

CONFIG = ModelConfig(num_items=25, max_len=6, hidden=16, heads=2, blocks=1, dropout=0.0, tied_items=True)


def _examples(users: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    sequences = [rng.choice(np.arange(1, 26), size=rng.integers(4, 12), replace=False) for _ in range(users)]
    return training_examples(sequences, CONFIG.max_len)


def _tied_model(seed: int) -> SASRec:
    torch.manual_seed(seed)
    model = SASRec(CONFIG)
    with torch.no_grad():  # a visible bias and larger rows, so both uses carry weight in every gradient
        model.output.weight.mul_(20.0)
        model.output.weight[PADDING_INDEX].zero_()
        model.output.bias.normal_()
    return model


def test_one_table_serves_both_uses_and_the_state_has_no_separate_embedding() -> None:
    model = _tied_model(0)
    assert isinstance(model.output, TiedItemTable) and model.item_embedding is None
    assert "item_embedding.weight" not in model.state_dict()
    assert model.item_tables() == [model.output.weight]
    untied = SASRec(ModelConfig(**{**CONFIG.as_dict(), "tied_items": False}))
    assert sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in model.parameters()) == 26 * 16
    ids = torch.tensor([[0, 3, 7]])
    rows = model.embed_items(ids)
    assert torch.equal(rows[0, 0], torch.zeros(16)) and torch.equal(rows[0, 2], model.output.weight[7])
    hidden = torch.randn(2, 16)
    torch.testing.assert_close(model.output(hidden), hidden @ model.output.weight.T + model.output.bias)


def test_run_config_tied_builds_a_tied_model() -> None:
    assert RunSettings().model_config(10).tied_items, "one tied item table is the default"
    assert not RunSettings(item_tables="trained").model_config(10).tied_items


def test_both_uses_reach_the_true_per_user_gradient() -> None:
    """Without the lookup's part (or the scores') a user's gradient of the table would be wrong; check both exist."""
    examples = _examples(3, seed=4)
    model = _tied_model(4)
    model.output.weight.requires_grad_(True)
    scores_only = true_per_user_gradients(model, examples.inputs, examples.targets)
    for user, gradient in enumerate(scores_only):
        table = gradient["output.weight"]
        seen = examples.inputs[user][examples.inputs[user] != PADDING_INDEX]
        assert float(table[seen].abs().sum()) > 0 and norm(gradient) > 0


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_every_per_user_gradient_of_the_tied_model_is_clipped_exactly(mode: str) -> None:
    examples = _examples(6, seed=1)
    model = _tied_model(1)
    truth = true_per_user_gradients(model, examples.inputs, examples.targets)
    clip = 0.01
    assert min(norm(g) for g in truth) > 10 * clip, "every user is clipped, so a wrong norm shows"
    training = LocalTraining(sample_rate=1.0, batch_size=6, grad_sample_mode=mode)  # type: ignore[arg-type]
    dp = make_private(model, examples, training, PrivacyPlan(max_grad_norm=clip), RoundPlan(1.0, 1, 0.0),
                      torch.Generator().manual_seed(0), torch.Generator().manual_seed(0))
    dp.optimizer.zero_grad()
    dp.loss(examples.inputs, examples.targets).backward()
    dp.optimizer.pre_step()  # clip, add (zero) noise, divide: what step() applies before Adam
    expected = mean_of_clipped(truth, clip, len(truth))
    assert set(expected) == {name for name, _ in model.named_parameters()}
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, expected[name], rtol=1e-3, atol=1e-9, msg=name)


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_the_central_sum_of_a_tied_model_is_the_sum_of_clipped_per_user_gradients(mode: str) -> None:
    examples = _examples(5, seed=2)
    model = _tied_model(2)
    truth = true_per_user_gradients(model, examples.inputs, examples.targets)
    clip = 0.02
    training = LocalTraining(sample_rate=1.0, batch_size=5, grad_sample_mode=mode)  # type: ignore[arg-type]
    summed = clipped_sum(model, examples, training, clip, torch.device("cpu"))
    expected = mean_of_clipped(truth, clip, 1)
    assert set(summed) == set(expected)
    for name, tensor in summed.items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-3, atol=1e-8, msg=name)


def test_a_dp_round_trains_the_tied_table(tmp_path: Path) -> None:
    model = _tied_model(3)
    before = model.output.weight.detach().clone()
    training = LocalTraining(sample_rate=0.5, batch_size=5)
    outcome = train_site_round(model, _examples(10, seed=3), training, PrivacyPlan(target_epsilon=4.0, delta=1e-3),
                               Ledger(tmp_path / "site-1.jsonl"), "run-a", 1, "1", torch.device("cpu"), 0)
    assert outcome.state_dict is not None
    assert set(outcome.state_dict) == set(model.state_dict())
    assert not torch.equal(outcome.state_dict["output.weight"], before)


def test_content_and_new_items_fill_the_one_tied_table() -> None:
    model = _tied_model(5)
    vectors = torch.zeros(26, 16)
    vectors[3] = 1.0
    assert initialise_items(model, vectors) == 1
    assert torch.equal(model.output.weight[3], torch.ones(16))
    grown = grow_items(model, 30, None, seed=0)
    assert grown.output.weight.shape == (31, 16) and grown.output.bias.shape == (31,)
    assert torch.equal(grown.output.weight[:26], model.output.weight)
