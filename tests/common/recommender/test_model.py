"""SASRec is DP-ready: Opacus sees, and clips, every per-user gradient, output layer included."""

from __future__ import annotations

import pytest
import torch
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader, TensorDataset

from common.data.catalog import PADDING_INDEX
from common.recommender.model import ModelConfig, SASRec, sequence_loss
from tests.gradients import mean_of_clipped, norm, true_per_user_gradients

CONFIG = ModelConfig(num_items=30, max_len=8, hidden=16, heads=2, blocks=2, dropout=0.0)


class TiedMatmulSASRec(SASRec):
    """The known trap: scores as hidden @ item_embedding.weight.T escape Opacus' per-sample hooks."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.output.requires_grad_(False)  # unused here

    def forward(self, item_ids: torch.Tensor) -> torch.Tensor:
        return self.hidden_states(item_ids) @ self.item_embedding.weight.T


def _batch(seed: int = 0, users: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randint(1, CONFIG.num_items + 1, (users, CONFIG.max_len), generator=generator)
    targets = torch.randint(1, CONFIG.num_items + 1, (users, CONFIG.max_len), generator=generator)
    for user in range(users):  # different history lengths, left-padded
        pad = user % CONFIG.max_len
        inputs[user, :pad] = PADDING_INDEX
        targets[user, :pad] = PADDING_INDEX
    return inputs, targets


def _private_step(model: SASRec, inputs: torch.Tensor, targets: torch.Tensor, clip: float):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=len(inputs))
    private_model, private_optimizer, _ = PrivacyEngine().make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm=clip,
        poisson_sampling=False,
    )
    private_optimizer.zero_grad()
    sequence_loss(private_model(inputs), targets).backward()
    per_sample = {
        name.removeprefix("_module."): p.grad_sample.detach().clone()
        for name, p in private_model.named_parameters()
        if p.requires_grad and p.grad_sample is not None
    }
    private_optimizer.step()  # lr 0: parameters stay; p.grad now holds the clipped, averaged gradient
    averaged = {
        name.removeprefix("_module."): p.grad.detach().clone()
        for name, p in private_model.named_parameters()
        if p.grad is not None
    }
    return per_sample, averaged


def test_opacus_validator_accepts_the_model() -> None:
    assert ModuleValidator.validate(SASRec(CONFIG), strict=False) == []


def test_output_scores_come_from_a_module_opacus_hooks() -> None:
    model = SASRec(CONFIG)
    assert isinstance(model.output, torch.nn.Linear)
    assert model.output.weight.data_ptr() != model.item_embedding.weight.data_ptr()


def test_opacus_per_user_gradients_equal_true_gradients_for_every_parameter() -> None:
    torch.manual_seed(0)
    model = SASRec(CONFIG)
    inputs, targets = _batch()
    truth = true_per_user_gradients(model, inputs, targets)
    per_sample, _ = _private_step(model, inputs, targets, clip=1e6)
    assert set(per_sample) == set(truth[0]), "every parameter must have per-sample gradients"
    for user, gradient in enumerate(truth):
        for name, value in gradient.items():
            torch.testing.assert_close(per_sample[name][user], value, rtol=1e-4, atol=1e-6, msg=f"user {user}, {name}")


@pytest.mark.parametrize("clip", [1e-3, 0.05])
def test_every_per_user_gradient_is_clipped_to_at_most_c_output_layer_included(clip: float) -> None:
    torch.manual_seed(1)
    model = SASRec(CONFIG)
    inputs, targets = _batch(seed=1)
    truth = true_per_user_gradients(model, inputs, targets)
    assert all(norm(g) > clip for g in truth), "the test needs gradients larger than C to mean anything"
    _, averaged = _private_step(model, inputs, targets, clip=clip)
    expected = mean_of_clipped(truth, clip, len(truth))
    for name, value in expected.items():
        torch.testing.assert_close(averaged[name], value, rtol=1e-3, atol=1e-9, msg=name)
    assert norm(averaged) <= clip * (1 + 1e-4)


def test_single_user_private_gradient_has_norm_c_and_the_true_direction() -> None:
    torch.manual_seed(2)
    model = SASRec(CONFIG)
    inputs, targets = _batch(seed=2, users=1)
    truth = true_per_user_gradients(model, inputs, targets)[0]
    clip = 1e-3
    _, clipped = _private_step(model, inputs, targets, clip=clip)
    assert norm(clipped) == pytest.approx(clip, rel=1e-4)
    assert clipped["output.weight"].norm() > 0, "the output layer's gradient must be inside the clipped sum"
    for name, value in truth.items():
        torch.testing.assert_close(clipped[name], value * clip / norm(truth), rtol=1e-3, atol=1e-10, msg=name)


def test_the_gradient_check_catches_matmul_scoring_with_the_embedding() -> None:
    """Negative control: the check above must fail on the known trap, or it proves nothing."""
    torch.manual_seed(3)
    model = TiedMatmulSASRec(CONFIG)
    inputs, targets = _batch(seed=3)
    truth = true_per_user_gradients(model, inputs, targets)
    per_sample, _ = _private_step(model, inputs, targets, clip=1e6)
    mismatch = any(
        name not in per_sample or not torch.allclose(per_sample[name][user], value, rtol=1e-4, atol=1e-6)
        for user, gradient in enumerate(truth)
        for name, value in gradient.items()
    )
    assert mismatch, "matmul scoring escaped per-sample gradients, and the comparison must notice"


def test_scores_cover_the_catalogue_and_ignore_padding_positions() -> None:
    torch.manual_seed(4)
    model = SASRec(CONFIG).eval()
    inputs, _ = _batch(seed=4)
    scores = model(inputs)
    assert scores.shape == (len(inputs), CONFIG.max_len, CONFIG.num_items + 1)
    assert torch.isfinite(scores).all()
    # Causality: changing the last item must not change the scores at earlier positions.
    changed = inputs.clone()
    changed[:, -1] = (changed[:, -1] % CONFIG.num_items) + 1
    torch.testing.assert_close(model(changed)[:, :-1], scores[:, :-1])


def test_padding_does_not_change_the_last_position_scores() -> None:
    """A left-padded short history scores exactly as the same history given without padding."""
    torch.manual_seed(5)
    model = SASRec(CONFIG).eval()
    history = torch.tensor([[3, 7, 9]])
    padded = torch.cat([torch.zeros(1, CONFIG.max_len - 3, dtype=torch.long), history], dim=1)
    torch.testing.assert_close(model.last_scores(padded), model.last_scores(history))


@pytest.mark.parametrize("loss", ["ce", "bce"])
def test_losses_are_finite_and_differentiable(loss: str) -> None:
    model = SASRec(CONFIG)
    inputs, targets = _batch(seed=6)
    value = sequence_loss(model(inputs), targets, loss, torch.Generator().manual_seed(0))  # type: ignore[arg-type]
    value.backward()
    assert torch.isfinite(value)
    assert model.output.weight.grad is not None and model.output.weight.grad.abs().sum() > 0
