"""DP-SGD at a site: clipping, noise, accounting from the ledger, budgets. Privacy claims are tested here."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from client.dp_sgd import make_private, physical_batches, private_step
from client.ghost_clipping import embedding_norm_sample, linear_norm_sample
from client.replay import ReleasedUpdate
from client.site_round import train_site_round
from common.data.split import training_examples
from common.errors import ConfigError
from common.privacy.accounting import GRAD_SAMPLE_MODES, check_delta
from common.privacy.ledger import Ledger
from common.privacy.mechanisms import SITE
from common.privacy.mechanisms.gaussian import gaussian_noise
from common.protocol.round_plan import LocalTraining, PrivacyPlan, RoundPlan, plan_round, round_mechanism
from common.recommender.model import ModelConfig, SASRec, sequence_loss
from tests.gradients import mean_of_clipped, true_per_user_gradients
from tests.ledgers import fresh_pld_epsilon

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
"""The privacy tests run on every device present: on a GPU machine they run twice."""
MODES = list(GRAD_SAMPLE_MODES)
"""... and in every grad-sample mode a site may choose."""

CONFIG = ModelConfig(num_items=25, max_len=6, hidden=16, heads=2, blocks=1, dropout=0.0)


def _examples(users: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    sequences = [rng.choice(np.arange(1, 26), size=rng.integers(4, 12), replace=False) for _ in range(users)]
    return training_examples(sequences, CONFIG.max_len)


def _round(model, examples, training, privacy, ledger, round_number=1, seed=0, device="cpu"):
    return train_site_round(
        model, examples, training, privacy, ledger, "run-a", round_number, "7", torch.device(device), seed
    )


@pytest.mark.parametrize("mode", MODES)
def test_noise_zero_and_huge_clip_make_one_dp_step_equal_the_non_private_step(mode: str) -> None:
    torch.manual_seed(0)
    examples = _examples(8)
    training = LocalTraining(sample_rate=1.0, batch_size=8, learning_rate=0.01, grad_sample_mode=mode)
    privacy = PrivacyPlan(max_grad_norm=1e6)
    plan = plan_round(training, privacy)
    assert plan.sample_rate == 1.0
    private = SASRec(CONFIG)
    plain = copy.deepcopy(private)
    dp = make_private(private, examples, training, privacy, RoundPlan(plan.sample_rate, 1, 0.0), *_generators("cpu", 0))
    dp.optimizer.zero_grad()
    dp.loss(examples.inputs, examples.targets).backward()
    dp.optimizer.pre_step()  # what DP-SGD hands to Adam
    sequence_loss(plain(examples.inputs), examples.targets).backward()
    for (name, a), b in zip(private.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7, msg=name)


def _generators(device: str, seed: int) -> tuple[torch.Generator, torch.Generator]:
    """Sampling (CPU, like the data loader) and noise (on the model's device) generators, seeded for the test."""
    return torch.Generator().manual_seed(seed), torch.Generator(device=device).manual_seed(seed)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device", DEVICES)
def test_every_per_user_gradient_entering_the_sum_has_norm_at_most_c(device: str, mode: str) -> None:
    torch.manual_seed(1)
    examples = _examples(6, seed=1)
    training = LocalTraining(sample_rate=1.0, batch_size=6, grad_sample_mode=mode)
    clip = 0.01
    privacy = PrivacyPlan(max_grad_norm=clip)
    model = SASRec(CONFIG)
    truth = true_per_user_gradients(model, examples.inputs, examples.targets)
    model.to(device)
    dp = make_private(model, examples, training, privacy, RoundPlan(1.0, 1, 0.0), *_generators(device, 0))
    dp.optimizer.zero_grad()
    dp.loss(examples.inputs.to(device), examples.targets.to(device)).backward()
    dp.optimizer.pre_step()  # clip, add (zero) noise, scale: exactly what step() applies before Adam
    expected = mean_of_clipped(truth, clip, len(truth))
    assert set(expected) >= {"output.weight", "item_embedding.weight"}
    for name, p in model.named_parameters():
        assert p.grad.device.type == device
        torch.testing.assert_close(p.grad.cpu(), expected[name], rtol=1e-3, atol=1e-9, msg=name)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device", DEVICES)
def test_added_noise_has_std_noise_multiplier_times_c(device: str, mode: str) -> None:
    torch.manual_seed(2)
    examples = _examples(10, seed=2)
    training = LocalTraining(sample_rate=1.0, batch_size=10, grad_sample_mode=mode)
    sigma, clip = 1.7, 0.3
    privacy = PrivacyPlan(max_grad_norm=clip)
    wide = ModelConfig(num_items=400, max_len=6, hidden=32, heads=2, blocks=1, dropout=0.0)
    initial = SASRec(wide).state_dict()
    grads = []
    for noise in (0.0, sigma):  # same model, same batch: the difference is the noise alone
        model = SASRec(wide)
        model.load_state_dict(initial)
        model.to(device)
        dp = make_private(model, examples, training, privacy, RoundPlan(1.0, 1, noise), *_generators(device, 5))
        dp.optimizer.zero_grad()
        dp.loss(examples.inputs.to(device), examples.targets.to(device)).backward()
        dp.optimizer.pre_step()
        grads.append(torch.cat([p.grad.flatten().cpu() for p in model.parameters()]))
    noise_sum = (grads[1] - grads[0]) * dp.optimizer.expected_batch_size  # undo the division by the batch size
    expected_std = sigma * clip
    count = noise_sum.numel()
    assert count > 10_000
    assert float(noise_sum.std()) == pytest.approx(expected_std, rel=4 * math.sqrt(1 / (2 * count)) + 0.005)
    assert abs(float(noise_sum.mean())) < 5 * expected_std / math.sqrt(count)


@pytest.mark.parametrize("device", DEVICES)
def test_epsilon_after_r_rounds_equals_a_fresh_accountant_on_the_ledger_alone(tmp_path: Path, device: str) -> None:
    torch.manual_seed(3)
    examples = _examples(40, seed=3)
    training = LocalTraining(sample_rate=0.25, batch_size=10, local_epochs=1.0)
    privacy = PrivacyPlan(target_epsilon=3.0, delta=1e-4, planned_rounds=3)
    ledger = Ledger(tmp_path / "site-7.jsonl")
    model = SASRec(CONFIG)
    outcomes = [_round(model, examples, training, privacy, ledger, r, seed=r, device=device) for r in (1, 2, 3)]
    assert all(o.state_dict is not None and next(iter(o.state_dict.values())).device.type == "cpu" for o in outcomes)
    assert next(model.parameters()).device.type == device, "the site trains on its accelerator when it has one"
    reported = [o.epsilon for o in outcomes]
    lines = [json.loads(line) for line in (tmp_path / "site-7.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [1, 2, 3]
    recomputed = fresh_pld_epsilon(lines, lines[-1]["delta"])
    assert reported[-1] == pytest.approx(recomputed, rel=1e-6)
    assert reported[0] < reported[1] < reported[2], "epsilon composes across rounds"
    assert recomputed <= 3.0 and recomputed == pytest.approx(3.0, abs=0.05), "noise calibrated on all planned rounds"
    assert lines[0]["sample_rate"] == pytest.approx(10 / 40) and lines[0]["steps"] == 4


@pytest.mark.parametrize("batches_per_epoch", [98, 99])
def test_the_ledger_records_the_rate_users_are_sampled_at(tmp_path: Path, batches_per_epoch: int) -> None:
    """Rate 1/99: Opacus alone would account 1/98 (its loader length is int(1 / (1/99)) = 98)."""
    examples = _examples(batches_per_epoch)
    training = LocalTraining(sample_rate=1 / batches_per_epoch, batch_size=1, local_epochs=0.02)
    privacy = PrivacyPlan(target_epsilon=8.0, delta=1e-3, planned_rounds=1)
    ledger = Ledger(tmp_path / "site-7.jsonl")
    outcome = _round(SASRec(CONFIG), examples, training, privacy, ledger)
    assert outcome.state_dict is not None
    [entry] = ledger.entries()
    assert entry["sample_rate"] == 1 / batches_per_epoch and entry["steps"] == 2


def test_a_site_over_budget_declines_trains_nothing_and_spends_nothing(tmp_path: Path) -> None:
    torch.manual_seed(4)
    examples = _examples(30, seed=4)
    training = LocalTraining(sample_rate=1.0, batch_size=10)
    privacy = PrivacyPlan(target_epsilon=4.0, delta=1e-4, planned_rounds=2, max_epsilon=3.5)
    ledger = Ledger(tmp_path / "site-7.jsonl")
    model = SASRec(CONFIG)
    first = _round(model, examples, training, privacy, ledger, 1)
    assert first.state_dict is not None and first.epsilon < 3.5
    before = copy.deepcopy(model.state_dict())
    ledger_before = ledger.path.read_text()
    second = _round(model, examples, training, privacy, ledger, 2)
    assert second.state_dict is None
    assert "above its budget of 3.5" in second.declined_reason
    assert second.epsilon == pytest.approx(first.epsilon)
    assert ledger.path.read_text() == ledger_before
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, before[name])


def test_budget_spans_runs_a_second_run_on_the_same_users_is_declined(tmp_path: Path) -> None:
    examples = _examples(30, seed=5)
    training = LocalTraining(sample_rate=1.0, batch_size=10)
    privacy = PrivacyPlan(target_epsilon=2.0, delta=1e-4, planned_rounds=1)
    ledger = Ledger(tmp_path / "site-7.jsonl")
    assert _round(SASRec(CONFIG), examples, training, privacy, ledger, 1).state_dict is not None
    again = train_site_round(
        SASRec(CONFIG), examples, training, privacy, ledger, "run-b", 1, "7", torch.device("cpu"), 0
    )
    assert again.state_dict is None and "budget" in again.declined_reason


def test_the_operators_delta_rule_is_below_one_over_users() -> None:
    check_delta(9, 0.1)
    with pytest.raises(ConfigError, match="1/users"):
        check_delta(10, 0.1)


def test_non_private_mode_says_so_and_writes_no_ledger(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "site-7.jsonl")
    with pytest.warns(UserWarning, match="NON-PRIVATE"):
        outcome = _round(SASRec(CONFIG), _examples(12), LocalTraining(), PrivacyPlan(enabled=False), ledger)
    assert outcome.state_dict is not None and math.isinf(outcome.epsilon)
    assert not ledger.path.exists()


def test_a_non_private_step_in_length_sorted_pieces_equals_one_step_on_the_whole_batch(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    sequences = [rng.choice(np.arange(1, 26), size=size, replace=False) for size in rng.integers(4, 10, size=40)]
    examples = training_examples(sequences, CONFIG.max_len)
    assert len(set(examples.lengths())) > 3  # pieces of different widths
    training = LocalTraining(sample_rate=1.0, batch_size=len(examples), learning_rate=0.01)  # one step on every user
    torch.manual_seed(3)
    model = SASRec(CONFIG)
    whole = copy.deepcopy(model)
    optimizer = torch.optim.Adam(whole.parameters(), lr=0.01)
    sequence_loss(whole(examples.inputs), examples.targets).backward()
    optimizer.step()
    with pytest.warns(UserWarning, match="NON-PRIVATE"):
        outcome = _round(model, examples, training, PrivacyPlan(enabled=False), ledger=None)
    for name, weight in whole.state_dict().items():
        torch.testing.assert_close(outcome.state_dict[name], weight, rtol=1e-4, atol=1e-6, msg=name)


def test_a_retried_round_resends_the_released_update_without_charging_again(tmp_path: Path) -> None:
    examples = _examples(30, seed=6)
    training = LocalTraining(sample_rate=1.0, batch_size=10)
    privacy = PrivacyPlan(target_epsilon=4.0, delta=1e-4, planned_rounds=3)
    ledger = Ledger(tmp_path / "site-7.jsonl")
    torch.manual_seed(6)
    global_weights = SASRec(CONFIG).state_dict()

    def attempt(run_id: str, round_number: int, weights: dict) -> object:
        model = SASRec(CONFIG)
        model.load_state_dict(weights)
        return train_site_round(
            model, examples, training, privacy, ledger, run_id, round_number, "7", torch.device("cpu"), round_number
        )

    first = attempt("run-a", 1, global_weights)
    retried = attempt("run-a", 1, global_weights)  # the server died before saving round 1 and asks again
    assert len(ledger.entries()) == 1, "the same release sent twice is charged once"
    assert retried.epsilon == first.epsilon
    for name, tensor in first.state_dict.items():
        torch.testing.assert_close(retried.state_dict[name], tensor)
    attempt("run-a", 2, first.state_dict)
    attempt("run-a", 2, global_weights)  # same round, different global model: a new release, charged
    assert len(ledger.entries()) == 3


def test_a_round_the_ledger_has_no_line_for_never_loads_the_last_released_update(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It is saved after its ledger line, so only a round the ledger records can be re-sent; loading it on every
    round cost a one-step round ~20 ms per site."""
    examples = _examples(10, seed=6)
    training = LocalTraining(sample_rate=1.0, batch_size=10)
    privacy = PrivacyPlan(target_epsilon=4.0, delta=1e-4, planned_rounds=3)
    ledger = Ledger(tmp_path / "site-7.jsonl")
    torch.manual_seed(6)
    model = SASRec(CONFIG)
    train_site_round(model, examples, training, privacy, ledger, "run-a", 1, "7", torch.device("cpu"), 1)
    monkeypatch.setattr(ReleasedUpdate, "find", lambda *_: pytest.fail("loaded the released update of round 1"))
    train_site_round(model, examples, training, privacy, ledger, "run-a", 2, "7", torch.device("cpu"), 2)
    assert [entry["round"] for entry in ledger.entries()] == [1, 2]


def test_noise_and_sampling_cannot_be_reproduced_from_the_public_run_parameters(tmp_path: Path) -> None:
    """Same global model, same data, same run seed and round: a server that could predict the noise could remove it."""
    examples = _examples(40, seed=6)
    training = LocalTraining(sample_rate=1.0, batch_size=10)
    privacy = PrivacyPlan(target_epsilon=3.0, delta=1e-4, planned_rounds=3)
    initial = SASRec(CONFIG).state_dict()
    released = []
    for attempt in range(2):
        model = SASRec(CONFIG)
        model.load_state_dict(initial)
        ledger = Ledger(tmp_path / f"attempt-{attempt}" / "site-7.jsonl")
        released.append(_round(model, examples, training, privacy, ledger, 1, seed=0).state_dict)
    differences = [float((released[0][name] - released[1][name]).abs().max()) for name in released[0]]
    assert max(differences) > 1e-4


@pytest.mark.parametrize("mode", MODES)
def test_physical_batch_splitting_gives_the_same_clipped_sum_as_one_batch(mode: str) -> None:
    """BatchMemoryManager: a logical batch of 9 users in pieces of 4, 4 and 1: one optimizer step, one accounted."""
    torch.manual_seed(7)
    examples = _examples(9, seed=7)
    clip = 0.01
    truth = true_per_user_gradients(SASRec(CONFIG), examples.inputs, examples.targets)
    torch.manual_seed(7)
    model = SASRec(CONFIG)
    training = LocalTraining(sample_rate=1.0, batch_size=9, grad_sample_mode=mode, max_physical_batch_size=4)
    privacy = PrivacyPlan(max_grad_norm=clip)
    dp = make_private(model, examples, training, privacy, RoundPlan(1.0, 1, 0.0), *_generators("cpu", 0))
    ended = []
    with physical_batches(dp, training) as loader:
        for inputs, targets in loader:
            ended.append(private_step(dp, inputs, targets))
    assert ended[-1] and sum(ended) == 1 and len(ended) >= 2, ended
    expected = mean_of_clipped(truth, clip, 9)
    for name, p in model.named_parameters():  # after step(), .grad still holds what Adam was given
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-3, atol=1e-9, msg=name)
    assert dp.engine.accountant.history == [(0.0, 1.0, 1)]


@pytest.mark.parametrize("piece_users", [1, 3, 4, 9])
def test_length_sorted_pieces_give_the_same_clipped_sum_and_one_accounted_step(piece_users: int) -> None:
    """Ghost clipping cuts each batch into length-sorted pieces: the clipped sum must not depend on the cut."""
    rng = np.random.default_rng(11)
    sequences = [rng.choice(np.arange(1, 26), size=size, replace=False) for size in (4, 9, 5, 4, 7, 9, 6, 4, 8)]
    examples = training_examples(sequences, CONFIG.max_len)
    assert sorted(examples.lengths()) == [1, 1, 1, 2, 3, 4, 5, 6, 6]
    clip = 0.01
    torch.manual_seed(7)
    model = SASRec(CONFIG)
    truth = true_per_user_gradients(model, examples.inputs, examples.targets)
    training = LocalTraining(sample_rate=1.0, batch_size=9, grad_sample_mode="ghost")
    privacy = PrivacyPlan(max_grad_norm=clip)
    dp = make_private(model, examples, training, privacy, RoundPlan(1.0, 1, 0.0), *_generators("cpu", 0))
    assert dp.sums_over_pieces
    assert private_step(dp, examples.inputs, examples.targets, piece_users)
    expected = mean_of_clipped(truth, clip, 9)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-3, atol=1e-9, msg=name)
    assert dp.engine.accountant.history == [(0.0, 1.0, 1)]


@pytest.mark.parametrize("mode", MODES)
def test_an_empty_poisson_batch_is_pure_noise(mode: str) -> None:
    examples = _examples(6)
    training = LocalTraining(sample_rate=1.0, batch_size=6, grad_sample_mode=mode)
    model = SASRec(CONFIG)
    privacy = PrivacyPlan(max_grad_norm=0.5)
    dp = make_private(model, examples, training, privacy, RoundPlan(1.0, 1, 1.0), *_generators("cpu", 3))
    dp.optimizer.zero_grad()
    dp.loss(examples.inputs[:0], examples.targets[:0]).backward()
    dp.optimizer.pre_step()
    noise = torch.cat([p.grad.flatten() for p in model.parameters()]) * dp.optimizer.expected_batch_size
    assert torch.isfinite(noise).all()
    assert float(noise.std()) == pytest.approx(0.5, rel=0.1)


@pytest.mark.parametrize("mode", MODES)
def test_a_step_after_an_empty_poisson_batch_still_clips_every_user(mode: str) -> None:
    examples = _examples(6, seed=2)
    clip = 0.01
    torch.manual_seed(4)
    model = SASRec(CONFIG)
    truth = true_per_user_gradients(model, examples.inputs, examples.targets)
    training = LocalTraining(sample_rate=1.0, batch_size=6, grad_sample_mode=mode)
    dp = make_private(model, examples, training, PrivacyPlan(max_grad_norm=clip), RoundPlan(1.0, 2, 0.0),
                      *_generators("cpu", 0))
    assert private_step(dp, examples.inputs[:0], examples.targets[:0])
    assert private_step(dp, examples.inputs, examples.targets)
    expected = mean_of_clipped(truth, clip, 6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-3, atol=1e-9, msg=name)
    assert dp.engine.accountant.history == [(0.0, 1.0, 2)]


def test_fast_norm_samplers_agree_with_explicit_per_user_gradients() -> None:
    """The embedding and linear norm formulas that replace Opacus' own, against per-user gradients built by hand."""
    generator = torch.Generator().manual_seed(8)
    embedding = torch.nn.Embedding(12, 5, padding_idx=0)
    ids = torch.randint(0, 12, (7, 9), generator=generator)
    ids[:, :2] = 0  # left padding, and repeated items within a user
    ids[0, 3:6] = 4
    backprops = torch.randn(7, 9, 5, generator=generator)
    explicit = torch.zeros(7, 12, 5).index_put_(
        (torch.arange(7).repeat_interleave(9), ids.flatten()), backprops.reshape(-1, 5), accumulate=True
    )
    explicit[:, 0] = 0  # the padding row gets no gradient
    norms = embedding_norm_sample(embedding, [ids], backprops)[embedding.weight]
    torch.testing.assert_close(norms, explicit.flatten(1).norm(dim=1))

    linear = torch.nn.Linear(5, 6)
    inputs = torch.randn(7, 9, 5, generator=generator)
    grads = torch.randn(7, 9, 6, generator=generator)
    norms = linear_norm_sample(linear, [inputs], grads)
    torch.testing.assert_close(norms[linear.weight], torch.einsum("bto,bti->boi", grads, inputs).flatten(1).norm(dim=1))
    torch.testing.assert_close(norms[linear.bias], grads.sum(dim=1).norm(dim=1))


@pytest.mark.parametrize(("mode", "physical"), [(mode, physical) for mode in MODES for physical in (0, 2)])
def test_a_site_with_no_users_trains_and_replies_as_any_site_with_pure_noise(
    tmp_path: Path, mode: str, physical: int
) -> None:
    """Failing instead (Opacus' sampler refuses zero users) would tell the coordinator the site is empty."""
    training = LocalTraining(sample_rate=0.5, batch_size=4, grad_sample_mode=mode, max_physical_batch_size=physical)
    privacy = PrivacyPlan(target_epsilon=4.0, max_grad_norm=0.5, planned_rounds=2)
    replies = []
    for users in (0, 5):
        torch.manual_seed(0)
        model = SASRec(CONFIG)
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        ledger = Ledger(tmp_path / f"{mode}-{physical}-{users}.jsonl")
        outcome = _round(model, _examples(users), training, privacy, ledger)
        assert outcome.state_dict is not None and not outcome.declined_reason
        moved = [name for name, p in before.items() if not torch.equal(p, outcome.state_dict[name])]
        assert len(moved) == len(before)  # the noise moves every parameter, users or not
        replies.append((outcome.epsilon, sorted(outcome.state_dict)))
    assert replies[0] == replies[1]


@pytest.mark.parametrize("mode", MODES)
def test_no_noise_value_is_a_single_floating_point_gaussian_draw(mode: str) -> None:
    """One draw of a floating-point Gaussian takes a sparse set of values, which the attacks of Mironov (2012) and
    Jin et al. (2022) read; every site noise (DP-SGD, the popularity release, a distributed share) is the sum of
    four draws over 2 (``gaussian_noise``), with the same N(0, std^2)."""
    examples = _examples(6)
    training = LocalTraining(sample_rate=1.0, batch_size=6, grad_sample_mode=mode)
    model = SASRec(CONFIG)
    dp = make_private(model, examples, training, PrivacyPlan(max_grad_norm=0.5), RoundPlan(1.0, 1, 1.0),
                      *_generators("cpu", 3))
    dp.optimizer.zero_grad()
    dp.loss(examples.inputs[:0], examples.targets[:0]).backward()
    dp.optimizer.pre_step()
    first = next(model.parameters())
    noise = first.grad * dp.optimizer.expected_batch_size
    one_draw = torch.normal(0.0, 0.5, first.shape, generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(noise, one_draw), "the noise is one plain draw from the noise generator"
    four = gaussian_noise(0.5, first.shape, torch.Generator().manual_seed(3))
    assert torch.allclose(noise, four, atol=1e-6)
    draws = gaussian_noise(2.0, (200_000,), torch.Generator().manual_seed(4), torch.float64)
    assert float(draws.std()) == pytest.approx(2.0, rel=0.01) and abs(float(draws.mean())) < 0.02


@pytest.mark.parametrize("placement", ["site", "central"])
def test_opacus_adds_the_noise_of_the_rounds_mechanism_at_the_site(placement: str) -> None:
    """Under ``site`` Opacus' DPOptimizer is the mechanism's aggregate half: its noise std (multiplier x clip, and
    the noise it draws on an empty batch) is the mechanism's at the site; under ``central`` the site adds none."""
    examples = _examples(6)
    training = LocalTraining(sample_rate=1.0, batch_size=6, grad_sample_mode="ghost")
    privacy = PrivacyPlan(max_grad_norm=0.3, noise_placement=placement)
    plan = RoundPlan(1.0, 1, 2.5)
    mechanism = round_mechanism(privacy, plan)
    model = SASRec(CONFIG)
    dp = make_private(model, examples, training, privacy, plan, *_generators("cpu", 6))
    assert dp.optimizer.noise_multiplier * dp.optimizer.max_grad_norm == mechanism.noise_std(SITE)
    assert dp.optimizer.max_grad_norm == mechanism.clip
    dp.optimizer.zero_grad()
    dp.loss(examples.inputs[:0], examples.targets[:0]).backward()
    dp.optimizer.pre_step()
    noise = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    noise = noise * dp.optimizer.expected_batch_size
    if placement == "site":
        assert mechanism.noise_std(SITE) == pytest.approx(2.5 * 0.3)
        four_errors = 4 / math.sqrt(2 * noise.numel())  # relative standard error of a sample std, times 4
        assert float(noise.std()) == pytest.approx(mechanism.noise_std(SITE), rel=four_errors)
    else:
        assert mechanism.noise_std(SITE) == 0.0 and bool((noise == 0).all())
