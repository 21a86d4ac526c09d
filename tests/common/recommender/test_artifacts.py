"""A model is saved with its catalogue and refuses to load with another."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.data.catalog import Catalog
from common.errors import DataError
from common.recommender.artifacts import CATALOG_FILE, MODEL_FILE, load_model, save_model
from common.recommender.model import ModelConfig, SASRec


def test_round_trip_keeps_weights_config_and_catalogue(tmp_path: Path) -> None:
    catalog = Catalog.from_items(["10", "2", "b", "a"], source="test")
    assert catalog.items == ("2", "10", "a", "b"), "numeric ids in numeric order, then text"
    assert catalog.index_of("2") == 1 and catalog.index_of("zzz") is None
    model = SASRec(ModelConfig(num_items=catalog.num_items, max_len=5, hidden=8, heads=2, blocks=1))
    save_model(tmp_path, model, catalog)
    loaded, loaded_catalog = load_model(tmp_path)
    assert loaded_catalog == catalog
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor)


def test_mismatched_or_corrupt_files_are_clear_errors(tmp_path: Path) -> None:
    catalog = Catalog.from_items(["a", "b"])
    save_model(tmp_path, SASRec(ModelConfig(num_items=2, max_len=4, hidden=8, heads=2, blocks=1)), catalog)
    Catalog.from_items(["a", "c"]).save(tmp_path / CATALOG_FILE)
    with pytest.raises(DataError, match="different catalogue"):
        load_model(tmp_path)
    (tmp_path / MODEL_FILE).write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot read the model file"):
        load_model(tmp_path)
    (tmp_path / CATALOG_FILE).write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_model(tmp_path)
    with pytest.raises(DataError, match="elsewhere: no such folder"):
        load_model(tmp_path / "elsewhere")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_model_is_refused_at_load_naming_the_file_and_the_parameter(tmp_path: Path, bad: float) -> None:
    catalog = Catalog.from_items(["a", "b", "c"])
    model = SASRec(ModelConfig(num_items=catalog.num_items, max_len=4, hidden=8, heads=2, blocks=1))
    with torch.no_grad():
        model.position_embedding.weight[2, 3] = bad
    save_model(tmp_path, model, catalog)
    with pytest.raises(DataError, match=r"model.pt: parameter 'position_embedding.weight' holds NaN or infinity") as e:
        load_model(tmp_path)
    assert "\n" not in str(e.value)
