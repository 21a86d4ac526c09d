"""A site's guarantee against a malicious coordinator: every attack of issue 16 that reaches a site, as a test.

The coordinator writes the run config and the global weights. Whatever it
sends, a site must not release anything whose distribution depends on one
user beyond what DP allows, and nothing outside the noisy weights may depend
on the site's exact user count.
"""

from __future__ import annotations

import copy
import math
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from torch import nn

from client.app import train
from client.dp_sgd import make_private, physical_batches, private_step
from client.policy import SitePolicy, incoming_weights_problem
from common.data.catalog import Catalog
from common.data.split import training_examples
from common.federation import RunSettings
from common.privacy.accounting import GRAD_SAMPLE_MODES
from common.protocol.round_plan import LocalTraining, PrivacyPlan, RoundPlan
from common.recommender.model import ModelConfig, SASRec

CONFIG = ModelConfig(num_items=25, max_len=6, hidden=16, heads=2, blocks=1, dropout=0.0)
POISONED_ITEM = 13


@pytest.fixture(autouse=True)
def flower_task_identity() -> None:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


class _OverflowingBackward(torch.autograd.Function):
    """Identity forward; a backward that overflows to inf for the marked users, unless their gradient is zero.

    Stands in for what hostile weights can do to a user whose history holds a
    given item: a finite forward pass whose gradient is not finite.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, marked: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(marked)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (marked,) = ctx.saved_tensors
        blown = grad * 1e30 * 1e30  # 0 stays 0, anything else becomes +-inf
        return torch.where(marked.view(-1, 1, 1), blown, grad), None


class _PoisonedEmbedding(nn.Module):
    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.embedding = embedding

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return _OverflowingBackward.apply(self.embedding(ids), (ids == POISONED_ITEM).any(dim=1))


def _poisoned_model(initial: dict[str, torch.Tensor]) -> SASRec:
    model = SASRec(CONFIG)
    model.load_state_dict(initial)
    model.item_embedding = _PoisonedEmbedding(model.item_embedding)  # type: ignore[assignment]
    return model


def _sequences(seed: int, users: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    others = np.array([i for i in range(1, 26) if i != POISONED_ITEM])
    return [rng.choice(others, size=rng.integers(4, 9), replace=False) for _ in range(users)]


def _clipped_mean(model: SASRec, sequences: list[np.ndarray], mode: str, noise: float, split: str) -> torch.Tensor:
    """One DP step over every user (sample rate 1); returns the noisy clipped mean DP-SGD hands to Adam."""
    examples = training_examples(sequences, CONFIG.max_len)
    physical = 3 if split == "physical" else 0
    training = LocalTraining(sample_rate=1.0, batch_size=8, grad_sample_mode=mode, max_physical_batch_size=physical)
    private = make_private(
        model, examples, training, PrivacyPlan(max_grad_norm=0.05), RoundPlan(1.0, 1, noise),
        torch.Generator().manual_seed(0), torch.Generator().manual_seed(1),
    )
    pieces = 2 if split == "pieces" else 16
    with physical_batches(private, training) as loader:
        for inputs, targets in loader:
            private_step(private, inputs, targets, pieces)
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("split", ["whole", "pieces", "physical"])
@pytest.mark.parametrize("mode", list(GRAD_SAMPLE_MODES))
def test_a_user_whose_gradient_is_not_finite_adds_exactly_nothing(mode: str, split: str) -> None:
    """Issue 16, attack 1: one non-finite user made the whole release NaN, and so told whether they were sampled."""
    if mode == "ghost" and split == "physical":
        pytest.skip("ghost clipping splits batches into pieces itself")
    torch.manual_seed(0)
    initial = SASRec(CONFIG).state_dict()
    others = _sequences(1, 7)
    holder = np.array([3, POISONED_ITEM, 5, 8, 2])
    without = _clipped_mean(_poisoned_model(initial), others, mode, 0.0, split)
    with_holder = _clipped_mean(_poisoned_model(initial), [*others[:3], holder, *others[3:]], mode, 0.0, split)
    assert torch.isfinite(with_holder).all()
    assert float(without.abs().max()) > 0
    torch.testing.assert_close(with_holder, without, rtol=1e-5, atol=1e-8)
    noisy = _clipped_mean(_poisoned_model(initial), [*others, holder], mode, 1.0, split)
    assert torch.isfinite(noisy).all()


def _hostile(weights: dict[str, torch.Tensor], value: float, name: str = "output.weight") -> dict:
    weights = copy.deepcopy(weights)
    weights[name][POISONED_ITEM % len(weights[name])] = value
    return weights


@pytest.mark.parametrize(
    ("value", "tensor", "reason"),
    [
        (1e38, "output.weight", "above this site's max-abs-weight"),  # the tied item table: input and output
        (math.inf, "output.weight", "non-finite"),
        (math.nan, "position_embedding.weight", "non-finite"),
        (1e4, "blocks.0.attention_norm.weight", "above this site's max-abs-weight"),
    ],
)
def test_non_finite_or_overflowing_weights_are_refused_before_any_data_is_read(
    tmp_path: Path, value: float, tensor: str, reason: str
) -> None:
    """The coordinator's 1e38 embedding row overflowed only for users holding the item (issue 16, attack 1)."""
    catalog = Catalog.from_items([f"i{i}" for i in range(1, 26)])
    catalog.save(tmp_path / "catalog.json")
    settings = _settings()
    weights = _hostile(SASRec(settings.model_config(catalog.num_items)).state_dict(), value, tensor)
    node = _node(tmp_path, tmp_path / "never-read.txt")  # the data file does not exist: reading it would fail
    reply = _train(settings, node, catalog, weights)
    assert reply.content["metrics"]["declined"] == 1 and "arrays" not in reply.content
    assert reason in reply.content["site"]["reason"] and tensor in reply.content["site"]["reason"]
    assert not (tmp_path / "ledger").exists()


def test_the_site_bound_keeps_every_forward_pass_finite() -> None:
    """Weights at the site's bound, arranged to grow activations as fast as possible, stay finite and bounded."""
    from common.recommender.model import activation_bound

    policy = SitePolicy()
    config = ModelConfig(num_items=30, max_len=8, hidden=64, heads=2, blocks=2, dropout=0.2)
    model = SASRec(config).train()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(policy.max_abs_weight)
    assert incoming_weights_problem(model.state_dict(), policy) == ""
    ids = torch.tensor([[0, 0, 3, 3, 7, 9, 30, 1], [5] * 8])
    scores = model(ids)
    assert torch.isfinite(scores).all()
    assert float(scores.detach().abs().max()) <= activation_bound(config, policy.max_abs_weight)


def test_a_model_too_large_for_the_weight_bound_is_declined() -> None:
    assert SitePolicy().decline_reason(_settings()) == ""
    huge = RunSettings(**{**_settings().__dict__, "hidden": 4096, "heads": 4, "blocks": 48})
    assert "could overflow" in SitePolicy().decline_reason(huge)


def _settings(**overrides: object) -> RunSettings:
    base = RunSettings(dataset="", catalog_path="x", rounds=3, epsilon=4.0, delta=1e-5, hidden=16, heads=2,
                       blocks=1, max_len=6, batch_size=8, sample_rate=0.25)
    return RunSettings(**{**base.__dict__, **overrides})


def _node(tmp_path: Path, data: Path, **overrides: object) -> dict:
    return {"data-path": str(data), "catalog-path": str(tmp_path / "catalog.json"),
            "ledger-dir": str(tmp_path / "ledger"), "max-epsilon": 8.0, "delta": 1e-5, "site-id": "north",
            **overrides}


def _train(settings: RunSettings, node: dict, catalog: Catalog, weights: dict, round_number: int = 1,
           state: RecordDict | None = None) -> Message:
    config = ConfigRecord({"server-round": round_number, "run-id": "r1", "catalog-sha256": catalog.fingerprint(),
                           "flwr-version": version("flwr")})
    content = RecordDict({"arrays": ArrayRecord(weights), "config": config})
    context = Context(run_id=1, node_id=1, node_config=node, state=state if state is not None else RecordDict(),
                      run_config=settings.to_run_config())
    return train(Message(content=content, dst_node_id=1, message_type="train"), context)


def _site(tmp_path: Path, users: int) -> tuple[Path, Catalog]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    catalog = Catalog.from_items([f"i{i}" for i in range(1, 26)])
    catalog.save(tmp_path / "catalog.json")
    data = tmp_path / "site.txt"
    data.write_text("".join(f"u{u} " + " ".join(f"i{(u * 7 + k) % 25 + 1}" for k in range(5)) + "\n"
                            for u in range(users)))
    return data, catalog


def test_dp_false_is_declined_unless_the_sites_node_config_allows_it(tmp_path: Path) -> None:
    """Issue 16, attack 2: a run config with dp = false made a deployed site send un-noised weights."""
    data, catalog = _site(tmp_path, 40)
    settings = _settings(dp=False)
    weights = SASRec(settings.model_config(catalog.num_items)).state_dict()
    reply = _train(settings, _node(tmp_path, data), catalog, weights)
    assert reply.content["metrics"]["declined"] == 1 and "arrays" not in reply.content
    assert "allow-non-private = false" in reply.content["site"]["reason"]
    with pytest.warns(UserWarning, match="NON-PRIVATE"):
        allowed = _train(settings, _node(tmp_path, data, **{"allow-non-private": True}), catalog, weights)
    assert allowed.content["metrics"]["declined"] == 0 and "arrays" in allowed.content


def test_a_run_asking_another_delta_is_declined_and_the_budget_holds_at_the_sites_delta(tmp_path: Path) -> None:
    """Issue 16, attack 3: raising delta recomputed past spending smaller, and the site trained over its budget."""
    data, catalog = _site(tmp_path, 40)
    settings = _settings(epsilon=4.0)
    node = _node(tmp_path, data, **{"max-epsilon": 4.0, "window-epsilon": 0})  # no per-run cap: the budget alone
    weights = SASRec(settings.model_config(catalog.num_items)).state_dict()
    for round_number in (1, 2, 3):
        assert _train(settings, node, catalog, weights, round_number).content["metrics"]["declined"] == 0
    ledger_before = (tmp_path / "ledger" / "site-north.jsonl").read_text()
    raised = _settings(epsilon=4.0, delta=0.9 / 40)
    reply = _train(raised, node, catalog, weights, 4)
    assert reply.content["metrics"]["declined"] == 1
    assert "at its own delta=1e-05" in reply.content["site"]["reason"]
    smaller = _train(_settings(epsilon=4.0, delta=1e-7), node, catalog, weights, 4)
    assert smaller.content["metrics"]["declined"] == 1, "one delta per site: ledger, replies and audit agree"
    more = _train(_settings(epsilon=4.0, rounds=4), node, catalog, weights, 4)
    assert more.content["metrics"]["declined"] == 1 and "above its budget of 4" in more.content["site"]["reason"]
    assert (tmp_path / "ledger" / "site-north.jsonl").read_text() == ledger_before


def _public_reply(reply: Message) -> dict:
    """Everything in a reply but the noisy weights' values and the ledger head's hash.

    The hash covers a secret random nonce in the ledger line (``common.privacy.ledger``), so it is a fresh random
    string for every line: it differs between any two sites, whatever their users, and hides the count.
    """
    content = reply.content
    site = dict(content["site"])
    assert len(site.pop("ledger-hash")) == 64
    return {
        "keys": sorted(content.keys()),
        "metrics": dict(content["metrics"]),
        "site": site,
        "arrays": sorted(content["arrays"].keys()) if "arrays" in content else None,
        "shapes": {k: tuple(v.shape) for k, v in content["arrays"].items()} if "arrays" in content else None,
    }


@pytest.mark.parametrize("max_epsilon", [8.0, 3.5])
def test_two_sites_that_differ_by_one_user_reply_identically_outside_the_noisy_weights(
    tmp_path: Path, max_epsilon: float
) -> None:
    """Issue 16, attack 4: the sampling rate was 1/ceil(n/B), so epsilon in every reply revealed the user count."""
    replies = []
    for users in (128, 129):
        data, catalog = _site(tmp_path / str(users), users)
        settings = _settings()
        # no per-run cap: the budget runs out round by round
        node = _node(tmp_path / str(users), data, **{"max-epsilon": max_epsilon, "window-epsilon": 0})
        weights = SASRec(settings.model_config(catalog.num_items)).state_dict()
        state = RecordDict()
        replies.append([_public_reply(_train(settings, node, catalog, weights, r, state)) for r in (1, 2, 3)])
    assert replies[0] == replies[1]
    declined = [reply["metrics"]["declined"] for reply in replies[0]]
    assert declined == ([0, 0, 0] if max_epsilon == 8.0 else [0, 0, 1]), "the budget declines the same round at both"
