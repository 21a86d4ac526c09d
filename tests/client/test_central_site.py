"""noise = central at the site: the exact clipped sum it sends, its trust setting, its ledger line, its public reply."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.supercore.task_identity import TaskIdentity

from client.app import popularity
from client.clipped_sum import clipped_sum
from client.popularity import clipped_popularity_sum
from client.shard import deployed_shard, simulated_shard
from common.data.catalog import Catalog
from common.data.split import training_examples
from common.federation import RunSettings
from common.privacy.accounting import GRAD_SAMPLE_MODES, calibrate_noise, epsilon_from_history
from common.privacy.ledger import Ledger
from common.privacy.mechanisms import CENTRAL_TRUST
from common.privacy.popularity import POPULARITY_ARRAY, popularity_mechanism, popularity_step
from common.protocol.records import trainable_names
from common.protocol.round_plan import LocalTraining
from common.recommender.model import ModelConfig, SASRec
from server.central_noise import reply_problem, sum_replies
from tests.client.test_hostile_coordinator import _node, _public_reply, _settings, _site, _train
from tests.gradients import mean_of_clipped, true_per_user_gradients

CONFIG = ModelConfig(num_items=25, max_len=6, hidden=16, heads=2, blocks=1, dropout=0.0)


@pytest.fixture(autouse=True)
def flower_task_identity() -> None:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


def _examples(users: int, seed: int):
    rng = np.random.default_rng(seed)
    return training_examples(
        [rng.choice(np.arange(1, 26), size=rng.integers(3, 12), replace=False) for _ in range(users)], CONFIG.max_len
    )


def _reply(site: str, sums: dict[str, torch.Tensor], noise_multiplier: float = 1.0) -> Message:
    metrics = MetricRecord({"weight": 1.0, "dp": 1, "declined": 0, "epsilon": 0.5, "ledger-lines": 1,
                            "noise-multiplier": noise_multiplier})
    content = RecordDict({"metrics": metrics, "site": ConfigRecord({"site-id": site, "ledger-hash": "ab" * 32}),
                          "arrays": ArrayRecord(sums)})
    return Message(content=content, dst_node_id=1, message_type="train")


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_the_central_sum_equals_the_sum_of_clipped_per_user_gradients_over_all_sites(mode: str) -> None:
    """Every user sampled (rate 1): the server's sum of the sites' replies is each user's clipped gradient, summed."""
    torch.manual_seed(3)
    model = SASRec(CONFIG)
    sites = [_examples(7, seed=1), _examples(20, seed=2), _examples(0, seed=3)]  # a site with no users sends zeros
    clip = 0.01  # below every user's norm, so clipping is exercised
    truth = [g for site in sites if len(site) for g in true_per_user_gradients(model, site.inputs, site.targets)]
    expected = mean_of_clipped(truth, clip, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    training = LocalTraining(sample_rate=1.0, batch_size=64, grad_sample_mode=mode)
    replies = [_reply(str(i), clipped_sum(model, site, training, clip, torch.device("cpu"), piece_users=5))
               for i, site in enumerate(sites)]
    assert all(reply_problem(reply, model.state_dict()) == "" for reply in replies)
    total, required = sum_replies(replies)
    assert required == [1.0, 1.0, 1.0]
    assert set(total) == set(trainable_names(model)) == set(expected)
    for name in expected:
        torch.testing.assert_close(total[name].float(), expected[name], rtol=1e-3, atol=1e-9, msg=name)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), f"{name}: computing the sum changed the weights"


def test_a_site_without_the_trust_setting_declines_central_before_reading_its_data(tmp_path: Path) -> None:
    data, catalog = _site(tmp_path, 40)
    settings = _settings(noise="central")
    weights = SASRec(settings.model_config(catalog.num_items)).state_dict()
    node = _node(tmp_path, data, **{"data-path": str(tmp_path / "no-such-file.txt")})  # never opened
    reply = _train(settings, node, catalog, weights)
    assert reply.content["metrics"]["declined"] == 1 and "arrays" not in reply.content
    assert "trust-coordinator-noise = false" in reply.content["site"]["reason"]
    assert not (tmp_path / "ledger" / "site-north.jsonl").exists()


def test_a_trusting_site_sends_its_clipped_sum_states_the_total_noise_and_records_the_mechanism(
    tmp_path: Path,
) -> None:
    data, catalog = _site(tmp_path, 40)
    settings = _settings(noise="central", rounds=3, epsilon=4.0, sample_rate=0.25)
    model = SASRec(settings.model_config(catalog.num_items))
    node = _node(tmp_path, data, **{"trust-coordinator-noise": "true"})
    reply = _train(settings, node, catalog, model.state_dict())
    sigma = calibrate_noise(4.0, 1e-5, 0.25, 3)  # the TOTAL noise: 3 rounds of one step each
    metrics = reply.content["metrics"]
    assert metrics["declined"] == 0 and metrics["noise-multiplier"] == pytest.approx(sigma)
    assert sorted(reply.content["arrays"].keys()) == sorted(trainable_names(model))
    (line,) = Ledger(tmp_path / "ledger" / "site-north.jsonl").entries()
    assert (line["noise_placement"], line["steps"], line["sample_rate"], line["max_grad_norm"]) == ("central", 1,
                                                                                                     0.25, 1.0)
    assert line["noise_multiplier"] == pytest.approx(sigma) and line["trust"] == CENTRAL_TRUST
    assert "NOT private" in line["trust"]
    assert line["epsilon_so_far"] == pytest.approx(epsilon_from_history([(sigma, 0.25, 1)], 1e-5))
    assert metrics["epsilon"] == pytest.approx(line["epsilon_so_far"])


@pytest.mark.parametrize("max_epsilon", [8.0, 3.5])
def test_two_central_sites_that_differ_by_one_user_reply_identically_outside_the_sum(
    tmp_path: Path, max_epsilon: float
) -> None:
    replies = []
    for users in (64, 65):
        data, catalog = _site(tmp_path / str(users), users)
        settings = _settings(noise="central", rounds=3, epsilon=4.0, sample_rate=0.5)
        node = _node(tmp_path / str(users), data,  # no per-run cap: the budget runs out round by round
                     **{"max-epsilon": max_epsilon, "trust-coordinator-noise": True, "window-epsilon": 0})
        weights = SASRec(settings.model_config(catalog.num_items)).state_dict()
        state = RecordDict()
        replies.append([_public_reply(_train(settings, node, catalog, weights, r, state)) for r in (1, 2, 3)])
    assert replies[0] == replies[1]
    declined = [reply["metrics"]["declined"] for reply in replies[0]]
    assert declined == ([0, 0, 0] if max_epsilon == 8.0 else [0, 0, 1]), declined


def test_a_sites_examples_are_read_and_split_once_per_process() -> None:
    """A one-step round must not pay for reading and splitting the site's data again."""
    spec = ("synthetic:users=60,items=90,seed=4", 0, "uniform", 0)
    first = simulated_shard(*spec, 1, 3, 8)
    assert simulated_shard(*spec, 1, 3, 8) is first
    assert simulated_shard(*spec, 2, 3, 8) is not first


def _popularity_query(settings: RunSettings, node: dict, catalog: Catalog) -> Message:
    config = ConfigRecord({"run-id": "r1", "catalog-sha256": catalog.fingerprint(), "flwr-version": version("flwr")})
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=settings.to_run_config())
    query = Message(content=RecordDict({"config": config}), dst_node_id=1, message_type=MessageType.QUERY)
    return popularity(query, context)


def test_the_popularity_release_under_central_noise_needs_the_trust_and_states_the_noise_to_add(
    tmp_path: Path,
) -> None:
    data, catalog = _site(tmp_path, 40)
    settings = _settings(noise="central", popularity_share=0.3)
    declined = _popularity_query(settings, _node(tmp_path, data), catalog)
    assert declined.content["metrics"]["declined"] == 1 and "arrays" not in declined.content
    assert "trust-coordinator-noise = false" in declined.content["site"]["reason"]
    assert not (tmp_path / "ledger" / "site-north.jsonl").exists(), "declined before anything was spent"
    reply = _popularity_query(settings, _node(tmp_path, data, **{"trust-coordinator-noise": "true"}), catalog)
    sigma = popularity_step(settings.epsilon, settings.delta, settings.popularity_share)[0]
    assert reply.content["metrics"]["declined"] == 0 and reply.content["metrics"]["noise-multiplier"] == sigma
    shard = deployed_shard(str(data), str(tmp_path / "catalog.json"), settings.max_len)
    bounded = popularity_mechanism(settings.epsilon, settings.delta, settings.popularity_share, "central")
    exact = clipped_popularity_sum(shard.examples, catalog.num_items, bounded).float()
    assert torch.equal(reply.content["arrays"].to_torch_state_dict()[POPULARITY_ARRAY], exact)
    (line,) = Ledger(tmp_path / "ledger" / "site-north.jsonl").entries()
    assert (line["round"], line["noise_placement"], line["noise_multiplier"]) == (0, "central", sigma)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_the_clipped_sum_on_the_gpu_is_the_cpus_and_comes_back_to_the_cpu() -> None:
    """The same users sampled (sample rate 1), so the same sum up to floating-point order."""
    torch.manual_seed(3)
    model, site, clip = SASRec(CONFIG), _examples(12, seed=1), 0.01
    training = LocalTraining(sample_rate=1.0, batch_size=64)
    on_cpu = clipped_sum(model, site, training, clip, torch.device("cpu"))
    on_gpu = clipped_sum(model, site, training, clip, torch.device("cuda"))
    for name, tensor in on_cpu.items():
        assert on_gpu[name].device.type == "cpu"
        assert torch.allclose(on_gpu[name], tensor, atol=1e-5)
