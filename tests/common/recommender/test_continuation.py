"""Continuing a released model: new items get rows without moving any old score; a model of another shape or
catalogue is refused with what differs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.data.catalog import Catalog
from common.errors import ConfigError, DataError
from common.federation import RunSettings
from common.recommender.artifacts import save_model
from common.recommender.continuation import continued_model, grow_items
from common.recommender.model import ModelConfig, SASRec
from server.app import initial_model

CONFIG = ModelConfig(num_items=20, max_len=6, hidden=8, heads=2, blocks=1, dropout=0.0)


def _released(tmp_path: Path) -> tuple[SASRec, Catalog]:
    torch.manual_seed(0)
    model = SASRec(CONFIG)
    with torch.no_grad():  # a "trained" model: rows far from the initial ones
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    catalog = Catalog.from_items([str(i) for i in range(1, 21)])
    save_model(tmp_path, model, catalog, "global_model.pt")
    return model.eval(), catalog


@pytest.mark.parametrize("with_content", [False, True])
def test_a_continued_model_scores_old_items_as_before_when_the_new_rows_are_masked(
    tmp_path: Path, with_content: bool
) -> None:
    released, catalog = _released(tmp_path)
    extended = catalog.extend(["21", "22", "23", "24", "25"])
    vectors = torch.randn(extended.num_items + 1, 8) if with_content else None
    continued = continued_model(tmp_path, extended, ModelConfig(**{**CONFIG.as_dict(), "num_items": 25}), vectors, 3)
    histories = torch.tensor([[0, 0, 3, 7, 1, 12], [5, 6, 7, 8, 9, 10], [0, 0, 0, 0, 0, 20]])
    with torch.no_grad():
        before = released.last_scores(histories)
        after = continued.eval().last_scores(histories)
    assert after.shape == (3, 26)
    torch.testing.assert_close(after[:, : CONFIG.num_items + 1], before, rtol=0, atol=0)
    assert torch.isfinite(after[:, 21:]).all()
    assert not torch.equal(continued.item_embedding.weight[21], continued.item_embedding.weight[22])


def test_content_places_a_new_item_at_the_mean_of_its_most_similar_old_items(tmp_path: Path) -> None:
    released, _ = _released(tmp_path)
    vectors = torch.zeros(23, 8)
    vectors[1:11, 0] = 1.0  # items 1..10 alike
    vectors[11:21, 1] = 1.0  # items 11..20 alike
    vectors[21, 0] = 1.0  # new item 21 like the first group; new item 22 has no content
    grown = grow_items(released, 22, vectors, seed=0)
    torch.testing.assert_close(grown.item_embedding.weight[21], released.item_embedding.weight[1:11].mean(dim=0))
    torch.testing.assert_close(grown.output.bias[21], released.output.bias[1:11].mean())
    torch.testing.assert_close(grown.output.weight[22], released.output.weight[1:].mean(dim=0))


def test_a_released_model_of_another_shape_is_refused_naming_what_differs(tmp_path: Path) -> None:
    _, catalog = _released(tmp_path)
    wanted = ModelConfig(**{**CONFIG.as_dict(), "hidden": 16, "blocks": 2})
    with pytest.raises(ConfigError, match=r"hidden 8 in the released model vs 16 here; blocks 1 in the released"):
        continued_model(tmp_path, catalog, wanted, None, 0)


def test_a_catalogue_that_does_not_extend_the_released_one_is_refused(tmp_path: Path) -> None:
    _, catalog = _released(tmp_path)
    reordered = Catalog(tuple(reversed(catalog.items)))
    with pytest.raises(DataError, match=r"this run's catalogue .* does not extend .* index 1 is '20', was '1'"):
        continued_model(tmp_path, reordered, CONFIG, None, 0)


def test_the_server_continues_from_init_model_and_names_a_mismatch(tmp_path: Path) -> None:
    released, catalog = _released(tmp_path / "released")
    shape = {"max_len": 6, "hidden": 8, "heads": 2, "blocks": 1, "dropout": 0.0, "item_tables": "trained"}
    settings = RunSettings(init_model=str(tmp_path / "released"), **shape)
    grown = initial_model(settings, catalog.extend(["new"]), tmp_path / "run")
    assert grown.config.num_items == 21
    torch.testing.assert_close(grown.output.weight[:21], released.output.weight)
    with pytest.raises(ConfigError, match=r"init-model .*released: .* max-len 6 in the released model vs 50 here"):
        untied = RunSettings(init_model=str(tmp_path / "released"), item_tables="trained")
        initial_model(untied, catalog, tmp_path / "run")
