"""item-tables=frozen: the item tables stay out of DP training (never clipped, noised or updated) and come back, and
stay at the server, exactly as they were; the rest is clipped per user exactly as before."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.dp_sgd import make_private
from client.site_round import train_site_round
from common.data.split import training_examples
from common.errors import ConfigError
from common.federation import RunSettings
from common.privacy.accounting import GRAD_SAMPLE_MODES
from common.privacy.ledger import Ledger
from common.protocol.round_plan import LocalTraining, PrivacyPlan, RoundPlan
from common.recommender.item_tables import ITEM_TABLE_PARAMETERS, apply_item_tables, frozen_parameters
from common.recommender.model import ModelConfig, SASRec
from server.strategy import private_strategy
from tests.gradients import mean_of_clipped, true_per_user_gradients

CONFIG = ModelConfig(num_items=25, max_len=6, hidden=16, heads=2, blocks=1, dropout=0.0)


def _examples(users: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    sequences = [rng.choice(np.arange(1, 26), size=rng.integers(4, 12), replace=False) for _ in range(users)]
    return training_examples(sequences, CONFIG.max_len)


def _frozen_model(seed: int = 0) -> SASRec:
    torch.manual_seed(seed)
    model = SASRec(CONFIG)
    apply_item_tables(model, "frozen")
    return model


def test_frozen_names_the_two_item_tables_and_trained_names_none() -> None:
    assert frozen_parameters("frozen") == ("item_embedding.weight", "output.weight")
    assert frozen_parameters("trained") == ()
    assert frozen_parameters("tied") == ()
    with pytest.raises(ConfigError, match="item-tables='shared'"):
        frozen_parameters("shared")


def test_a_run_asking_frozen_tables_without_public_content_is_refused() -> None:
    with pytest.raises(ConfigError, match="item-tables=frozen needs item-text"):
        RunSettings(item_tables="frozen")
    assert RunSettings(item_tables="frozen", item_text="items.csv").item_tables == "frozen"


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_frozen_tables_are_not_in_the_clipped_and_noised_set_and_the_rest_is_clipped_exactly(mode: str) -> None:
    examples = _examples(6, seed=1)
    model = _frozen_model(1)
    clip = 0.01
    truth = true_per_user_gradients(model, examples.inputs, examples.targets)  # autograd: trainable parameters only
    assert not set(ITEM_TABLE_PARAMETERS) & set(truth[0]), "ground truth has no gradient for a frozen table"
    training = LocalTraining(sample_rate=1.0, batch_size=6, grad_sample_mode=mode)  # type: ignore[arg-type]
    dp = make_private(model, examples, training, PrivacyPlan(max_grad_norm=clip), RoundPlan(1.0, 1, 0.0),
                      torch.Generator().manual_seed(0), torch.Generator().manual_seed(0))
    noised = {id(p) for p in dp.optimizer.params}
    assert not any(id(p) in noised for name, p in model.named_parameters() if name in ITEM_TABLE_PARAMETERS)
    assert len(noised) == sum(p.requires_grad for p in model.parameters())
    dp.optimizer.zero_grad()
    dp.loss(examples.inputs, examples.targets).backward()
    dp.optimizer.pre_step()
    expected = mean_of_clipped(truth, clip, len(truth))  # clipped on the trainable parameters' norm alone
    for name, parameter in model.named_parameters():
        if name in ITEM_TABLE_PARAMETERS:
            assert parameter.grad is None, name
        else:
            torch.testing.assert_close(parameter.grad, expected[name], rtol=1e-3, atol=1e-9, msg=name)


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_frozen_tables_come_back_unchanged_after_a_dp_round_and_the_rest_moves(tmp_path: Path, mode: str) -> None:
    model = _frozen_model(2)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    training = LocalTraining(sample_rate=0.5, batch_size=5, grad_sample_mode=mode)  # type: ignore[arg-type]
    outcome = train_site_round(model, _examples(10, seed=2), training, PrivacyPlan(target_epsilon=4.0, delta=1e-3),
                               Ledger(tmp_path / "site-1.jsonl"), "run-a", 1, "1", torch.device("cpu"), 0)
    assert outcome.state_dict is not None
    for name in ITEM_TABLE_PARAMETERS:
        assert torch.equal(outcome.state_dict[name], before[name]), name
    assert not torch.equal(outcome.state_dict["output.bias"], before["output.bias"]), "the output bias trains"
    assert not torch.equal(outcome.state_dict["final_norm.weight"], before["final_norm.weight"])


def test_frozen_tables_stay_unchanged_in_a_non_private_round(tmp_path: Path) -> None:
    model = _frozen_model(3)
    before = {name: model.state_dict()[name].clone() for name in ITEM_TABLE_PARAMETERS}
    with pytest.warns(UserWarning, match="NON-PRIVATE"):
        outcome = train_site_round(model, _examples(10), LocalTraining(batch_size=5), PrivacyPlan(enabled=False),
                                   None, "run-a", 1, "1", torch.device("cpu"), 0)
    assert outcome.state_dict is not None
    for name, tensor in before.items():
        assert torch.equal(outcome.state_dict[name], tensor), name


def _reply(weights: dict[str, torch.Tensor], site: str) -> Message:
    metrics = MetricRecord({"weight": 1.0, "dp": 1, "declined": 0, "epsilon": 0.5, "ledger-lines": 1})
    content = RecordDict({"metrics": metrics, "site": ConfigRecord({"site-id": site, "ledger-hash": ""}),
                          "arrays": ArrayRecord(weights)})
    return Message(content=content, dst_node_id=1, message_type="train")


@pytest.mark.parametrize("optimizer", ["fedavg", "fedavgm", "fedadam"])
def test_the_server_keeps_frozen_tables_exactly_whatever_its_optimizer(
    monkeypatch: pytest.MonkeyPatch, optimizer: str
) -> None:
    """Three equal float32 values do not always average back to themselves; FedAdam would turn that into a step."""
    for name in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
    torch.manual_seed(4)
    frozen = torch.randn(50, 8) * 0.1
    global_weights = {"output.weight": frozen, "output.bias": torch.zeros(50)}
    strategy = private_strategy(optimizer, 1.0, 1, frozen=("output.weight",))
    arrays = ArrayRecord(global_weights)
    for round_number in (1, 2):
        strategy.configure_train(round_number, arrays, ConfigRecord(), grid=_OneNode())  # type: ignore[arg-type]
        sent = arrays.to_torch_state_dict()
        replies = [_reply({"output.weight": sent["output.weight"].clone(), "output.bias": torch.randn(50)}, str(site))
                   for site in range(3)]
        aggregated, _ = strategy.aggregate_train(round_number, replies)
        assert aggregated is not None
        result = aggregated.to_torch_state_dict()
        assert torch.equal(result["output.weight"], frozen), f"round {round_number}"
        assert not torch.equal(result["output.bias"], sent["output.bias"])
        arrays = aggregated


class _OneNode:
    """The part of Flower's Grid that ``configure_train`` uses."""

    def get_node_ids(self) -> list[int]:
        return [1]
