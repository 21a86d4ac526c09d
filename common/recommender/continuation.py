"""Continue a released model: check that it fits the run, and give items new to the catalogue their rows.

A lifelong run starts from the global model an earlier run released (``global_model.pt`` + ``catalog.json``).
Everything here is post-processing of a released model and of public input (the catalogue, public item
metadata), so it costs no privacy.

New items (a catalogue that ``extend``\\ s the released one) get new rows at the end of the item table and of the
output layer; old rows are copied unchanged, so for histories of old items the old items' scores are exactly
the released model's (tests/common/recommender/test_continuation.py). A new row starts as:

- with public content vectors (``item-text``): the mean of the learned rows of the ``CONTENT_NEIGHBOURS`` old
  items whose content is most similar, so a new item lands where similar items already are;
- otherwise (the documented default): the mean of the old items' learned rows, plus the model's initial noise
  (``INIT_STD``, from the run's seed): an average item, neither favoured nor buried, that training moves.
"""

from __future__ import annotations

from pathlib import Path

import torch

from common.data.catalog import PADDING_INDEX, Catalog
from common.errors import ConfigError
from common.recommender.artifacts import load_model
from common.recommender.model import INIT_STD, ModelConfig, SASRec
from common.recommender.ranking import unit_rows

CONTENT_NEIGHBOURS = 10
ITEM_INDEXED_PARAMETERS = ("item_embedding.weight", "output.weight", "output.bias")
"""The state-dict entries with one row per catalogue index."""


def check_same_shape(released: ModelConfig, wanted: ModelConfig, where: str) -> None:
    """Raise naming every model option that differs (the catalogue size may grow, nothing else may change)."""
    differ = [
        f"{name.replace('_', '-')} {getattr(released, name)} in the released model vs {getattr(wanted, name)} here"
        for name in released.as_dict()
        if name != "num_items" and getattr(released, name) != getattr(wanted, name)
    ]
    if differ:
        raise ConfigError(f"{where}: the model cannot be continued with another shape: {'; '.join(differ)}")


def continued_model(
    released_dir: str | Path, catalog: Catalog, wanted: ModelConfig, item_vectors: torch.Tensor | None, seed: int
) -> SASRec:
    """The model released in ``released_dir``, checked against this run and grown to ``catalog``.

    ``wanted`` is this run's model config (for ``catalog``); ``item_vectors`` ([N + 1, d] public content vectors
    over ``catalog``, or None) place the new items.
    """
    where = f"init-model {released_dir}"
    released, released_catalog = load_model(released_dir)
    check_same_shape(released.config, wanted, where)
    catalog.check_extends(released_catalog, f"{where}: this run's catalogue")
    return grow_items(released, catalog.num_items, item_vectors, seed)


def grow_items(model: SASRec, num_items: int, item_vectors: torch.Tensor | None, seed: int) -> SASRec:
    """A copy of ``model`` for a catalogue of ``num_items`` (the first ``model.config.num_items`` unchanged)."""
    old = model.config.num_items
    if num_items < old:
        raise ConfigError(f"cannot shrink the model's catalogue from {old} to {num_items} items")
    config = ModelConfig(**{**model.config.as_dict(), "num_items": num_items})
    grown = SASRec(config)
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    if num_items > old:
        generator = torch.Generator().manual_seed(seed)
        for name in [name for name in ITEM_INDEXED_PARAMETERS if name in state]:  # a tied model has no embedding
            state[name] = torch.cat([state[name], _new_rows(state[name], num_items - old, item_vectors, generator)])
    grown.load_state_dict(state)
    grown.train(model.training)
    return grown


def _new_rows(
    table: torch.Tensor, count: int, item_vectors: torch.Tensor | None, generator: torch.Generator
) -> torch.Tensor:
    """``count`` rows for the items after the table's last one (see the module docstring)."""
    old = table.shape[0] - 1  # real items; row 0 is padding
    learned = table[PADDING_INDEX + 1 :]
    if item_vectors is not None:
        unit = unit_rows(item_vectors)
        new_items = unit[old + 1 : old + 1 + count]
        similarity = new_items @ unit[PADDING_INDEX + 1 : old + 1].T  # [count, old]
        neighbours = similarity.topk(min(CONTENT_NEIGHBOURS, old), dim=1).indices
        rows = learned[neighbours].mean(dim=1)
        has_content = new_items.abs().sum(dim=1) > 0
        average = learned.mean(dim=0).expand(count, *learned.shape[1:])
        return torch.where(has_content.view(-1, *[1] * (table.dim() - 1)), rows, average).clone()
    rows = learned.mean(dim=0).expand(count, *learned.shape[1:]).clone()
    if table.dim() > 1:  # weights get the initial noise; an output bias stays the average
        rows += torch.randn(rows.shape, generator=generator) * INIT_STD
    return rows
