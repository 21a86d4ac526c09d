"""Every forward and backward pass of a site's round runs on bounded weights, whatever the run config asks.

The attack: a run config with learning rate 1e30 moved every weight far past the site's ``max-abs-weight`` after
the first local step, so the next steps' forward passes overflowed. In ghost mode a user whose loss was then not
finite got clip coefficient 0, but the clipped backward pass still multiplied that 0 by their infinite
activations: the release was NaN exactly when some user was sampled after step 1, a function of membership that
no ledger accounts for. Three defences, each tested here: the site's range for every run-config value that shapes
its computation (checked before any data is read), the projection onto the box after every local step, and the
removal of a non-finite user before ghost clipping's clipped pass.
"""

from __future__ import annotations

import copy
import math
from contextlib import nullcontext
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

import client.policy
from client.app import train
from client.dp_sgd import make_private
from client.policy import RUN_RANGES, SitePolicy, run_range_problems
from client.site_round import train_site_round
from common.data.catalog import PADDING_INDEX, Catalog
from common.data.split import training_examples
from common.errors import ConfigError
from common.federation import RunSettings
from common.privacy.accounting import GRAD_SAMPLE_MODES
from common.privacy.ledger import Ledger
from common.protocol.round_plan import LocalTraining, PrivacyPlan, RoundPlan, plan_round
from common.recipe import ONE_NOISE_PLACEMENTS, PublicFacts, choose_recipe
from common.recommender.model import ModelConfig, SASRec
from tests.client.test_hostile_coordinator import (  # noqa: F401 (flower_task_identity: an autouse fixture)
    POISONED_ITEM,
    _node,
    _sequences,
    _settings,
    _site,
    _train,
    flower_task_identity,
)

MODES = list(GRAD_SAMPLE_MODES)
LEARNING_RATES = [1e20, 1e30]
CONFIG = ModelConfig(num_items=25, max_len=6, hidden=16, heads=2, blocks=1, dropout=0.3)


def _arrays(reply: Message) -> list[torch.Tensor]:
    return list(reply.content["arrays"].to_torch_state_dict().values())


@pytest.mark.parametrize("learning_rate", LEARNING_RATES)
def test_a_learning_rate_outside_the_sites_range_is_declined_before_any_data_is_read(
    tmp_path: Path, learning_rate: float
) -> None:
    catalog = Catalog.from_items([f"i{i}" for i in range(1, 26)])
    catalog.save(tmp_path / "catalog.json")
    settings = _settings(learning_rate=learning_rate)
    weights = SASRec(settings.model_config(catalog.num_items)).state_dict()
    node = _node(tmp_path, tmp_path / "never-read.txt")  # the data file does not exist: reading it would fail
    reply = _train(settings, node, catalog, weights)
    assert reply.content["metrics"]["declined"] == 1 and "arrays" not in reply.content
    reason = reply.content["site"]["reason"]
    assert f"learning-rate={learning_rate:g}" in reason and "[0, 0.1]" in reason and "max-learning-rate" in reason
    assert not (tmp_path / "ledger").exists()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("learning_rate", LEARNING_RATES)
def test_with_the_range_widened_every_step_stays_in_the_box_and_the_release_is_finite(
    tmp_path: Path, learning_rate: float, mode: str
) -> None:
    """The site's operator may widen a range; the box still holds after every one of the round's steps."""
    data, catalog = _site(tmp_path, 40)
    settings = _settings(learning_rate=learning_rate, grad_sample_mode=mode)
    assert plan_round(LocalTraining.from_settings(settings), PrivacyPlan.from_settings(settings)).steps == 4
    node = _node(tmp_path, data, **{"max-learning-rate": 1e31, "max-abs-weight": 5.0})
    weights = SASRec(settings.model_config(catalog.num_items)).state_dict()
    reply = _train(settings, node, catalog, weights)
    assert reply.content["metrics"]["declined"] == 0
    arrays = _arrays(reply)
    assert all(bool(torch.isfinite(tensor).all()) for tensor in arrays)
    assert max(float(tensor.abs().max()) for tensor in arrays) == 5.0  # pushed to the box's edge, never past it


@pytest.mark.parametrize("mode", [*MODES, "non-private"])
def test_every_forward_pass_of_a_round_runs_on_weights_inside_the_box(tmp_path: Path, mode: str) -> None:
    torch.manual_seed(0)
    model = SASRec(CONFIG)
    largest: list[float] = []
    model.position_embedding.register_forward_pre_hook(  # every forward pass looks positions up
        lambda *_: largest.append(max(float(p.detach().abs().max()) for p in model.parameters()))
    )
    training = LocalTraining(sample_rate=0.5, batch_size=6, local_epochs=2.0, learning_rate=1e4,
                             grad_sample_mode="ghost" if mode == "non-private" else mode)  # type: ignore[arg-type]
    privacy = PrivacyPlan(enabled=mode != "non-private", target_epsilon=8.0, planned_rounds=1)
    examples = training_examples(_sequences(3, 12), CONFIG.max_len)
    with pytest.warns(UserWarning, match="NON-PRIVATE") if mode == "non-private" else nullcontext():
        outcome = train_site_round(model, examples, training, privacy, Ledger(tmp_path / "site-7.jsonl"), "run-a",
                                   1, "7", torch.device("cpu"), seed=0)
    assert outcome.state_dict is not None
    assert len(largest) >= 4, "several steps, each after the weights moved"
    box = SitePolicy().max_abs_weight  # the default box, which LocalTraining takes without a policy
    assert max(largest) == box  # a learning rate of 1e4 reaches the box, and never passes it
    released = outcome.state_dict.values()
    assert all(bool(torch.isfinite(tensor).all()) for tensor in released)
    assert max(float(tensor.abs().max()) for tensor in released) <= box


@pytest.mark.parametrize("mode", MODES)
def test_a_user_whose_forward_pass_is_not_finite_is_removed_before_the_backward(mode: str) -> None:
    """An item row past the box (set here directly; a site refuses it on arrival) makes its holder's forward pass
    infinite. The clipped sum must equal the sum with the holder's history replaced by padding, which adds exactly
    nothing, under the same dropout masks: ghost clipping's clipped pass multiplied the holder's coefficient 0 by
    their infinite activations, and the sum was NaN."""
    torch.manual_seed(0)
    model = SASRec(CONFIG)
    with torch.no_grad():
        model.item_embedding.weight[POISONED_ITEM] = 1e38  # type: ignore[union-attr]
    holder = np.array([3, POISONED_ITEM, 5, 8, 2])
    examples = training_examples([*_sequences(1, 3), holder, *_sequences(2, 4)], CONFIG.max_len)
    padded_inputs, padded_targets = examples.inputs.clone(), examples.targets.clone()
    padded_inputs[3], padded_targets[3] = PADDING_INDEX, PADDING_INDEX
    with_holder = _clipped_sum(copy.deepcopy(model), examples, examples.inputs, examples.targets, mode)
    without = _clipped_sum(copy.deepcopy(model), examples, padded_inputs, padded_targets, mode)
    assert bool(torch.isfinite(with_holder).all())
    assert float(without.abs().max()) > 0
    torch.testing.assert_close(with_holder, without, rtol=1e-5, atol=1e-7)


def _clipped_sum(model: SASRec, examples: object, inputs: torch.Tensor, targets: torch.Tensor, mode: str
                 ) -> torch.Tensor:
    """One batch's sum of clipped per-user gradients (noise 0), with dropout drawn from a fixed seed."""
    training = LocalTraining(sample_rate=1.0, batch_size=1, grad_sample_mode=mode)  # type: ignore[arg-type]
    private = make_private(
        model, examples, training, PrivacyPlan(max_grad_norm=0.05), RoundPlan(1.0, 1, 0.0),  # type: ignore[arg-type]
        torch.Generator().manual_seed(0), torch.Generator().manual_seed(1),
    )
    private.optimizer.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    private.loss(inputs, targets).backward()
    private.optimizer.pre_step()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_every_default_and_recipe_passes_the_default_ranges() -> None:
    """The defaults (pyproject's, by tests/common/test_federation.py) and the recipe rule's choices, from a small
    federation at a small epsilon to a large one at a large epsilon, run unchanged."""
    assert run_range_problems(RunSettings(), RUN_RANGES) == []
    for users, epsilon in ((100, 0.5), (30_000, 16.0)):
        recipe = choose_recipe(PublicFacts(users, 1000, 5, epsilon, 1e-5))
        for placement in ONE_NOISE_PLACEMENTS:
            settings = RunSettings(noise=placement, min_sites=3, **recipe.settings())
            assert run_range_problems(settings, RUN_RANGES) == []


def test_the_module_documents_every_default_range() -> None:
    for key, (lower, upper) in RUN_RANGES.items():
        assert f"``{key}`` [{lower:g}, {upper:g}]" in (client.policy.__doc__ or "")


def test_the_node_config_narrows_or_widens_a_range() -> None:
    settings = _settings(hidden=16, learning_rate=0.5)
    narrow = SitePolicy.from_node_config({"max-hidden": 8, "max-learning-rate": 1.0}, deployed=False)
    reason = narrow.decline_reason(settings)
    assert reason == "declined: the run asks hidden=16, outside this site's range [1, 8] (node config min-hidden, " \
        "max-hidden)"
    assert SitePolicy.from_node_config({"max-learning-rate": 1.0}, deployed=False).decline_reason(settings) == ""
    assert "learning-rate=0.5" in SitePolicy().decline_reason(settings)


@pytest.mark.parametrize(
    ("node", "named"),
    [
        ({"max-learnin-rate": 0.1}, "max-learnin-rate"),
        ({"min-hidden": 64, "max-hidden": 32}, "min-hidden=64, max-hidden=32"),
        ({"max-hidden": "big"}, "max-hidden='big'"),
        ({"min-dropout": math.nan}, "min-dropout=nan"),
    ],
)
def test_a_bad_range_in_the_node_config_is_an_error_naming_the_key(node: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        SitePolicy.from_node_config(node, deployed=False)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"local_epochs": 1.0, "sample_rate": 1e-5}, "local-steps=100000"),
        ({"local_epochs": 100.0, "sample_rate": 5e-324}, "local-steps=inf"),  # the quotient overflows float
        ({"max_grad_norm": 1e30}, "max-grad-norm=1e+30"),
        ({"blocks": 48}, "blocks=48"),
        ({"popularity_share": 0.95}, "popularity-share=0.95"),
    ],
)
def test_each_checked_value_outside_its_range_is_declined_by_name(overrides: dict, named: str) -> None:
    reason = SitePolicy().decline_reason(_settings(**overrides))
    assert reason.startswith("declined: ") and named in reason


@pytest.mark.parametrize(
    ("overrides", "named"),
    [({"user_steps": 10**6}, "user-steps=1e+06"), ({"user_learning_rate": 1e30}, "user-learning-rate=1e+30")],
)
def test_a_user_update_outside_its_range_is_declined_by_name(overrides: dict, named: str) -> None:
    """Each sampled user's local steps bound a round's compute; their step size is the coordinator's to ask only
    within the site's range."""
    settings = _settings(noise="central", user_update="delta", **overrides)
    trusting = SitePolicy(trust_coordinator_noise=True)
    reason = trusting.decline_reason(settings)
    assert reason.startswith("declined: ") and named in reason
    assert trusting.decline_reason(_settings(noise="central", user_update="delta")) == ""


def test_central_noise_takes_one_step_whatever_the_quotient() -> None:
    settings = _settings(local_epochs=100.0, sample_rate=5e-324, noise="central")
    assert run_range_problems(settings, RUN_RANGES) == []


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("learning-rate", "fast", "learning-rate='fast'"),
        ("heads", 0, "heads=0"),
        ("hidden", -16, "hidden=-16"),
        ("learning-rates", 0.1, "learning-rates"),
    ],
)
def test_a_wrong_typed_or_unknown_run_config_value_is_a_config_error_naming_the_key(
    tmp_path: Path, key: str, value: object, named: str
) -> None:
    """Before any data is read (the data file does not exist), and never another exception."""
    catalog = Catalog.from_items([f"i{i}" for i in range(1, 26)])
    catalog.save(tmp_path / "catalog.json")
    weights = SASRec(_settings().model_config(catalog.num_items)).state_dict()
    config = ConfigRecord({"server-round": 1, "run-id": "r1", "catalog-sha256": catalog.fingerprint(),
                           "flwr-version": version("flwr")})
    context = Context(run_id=1, node_id=1, node_config=_node(tmp_path, tmp_path / "never-read.txt"),
                      state=RecordDict(), run_config={**_settings().to_run_config(), key: value})
    message = Message(RecordDict({"arrays": ArrayRecord(weights), "config": config}), dst_node_id=1,
                      message_type="train")
    with pytest.raises(ConfigError, match=named):
        train(message, context)
