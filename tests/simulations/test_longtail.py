"""The long-tail table: every variant evaluated, and short histories really are short."""

from __future__ import annotations

from pathlib import Path

import torch

from common.data.datasets import load_dataset
from common.data.split import evaluation_cases
from common.recommender.artifacts import save_model
from common.recommender.model import PADDING_INDEX, ModelConfig, SASRec
from simulations.longtail import SHORT_HISTORIES, TAIL_PENALTIES, last_items, longtail_table

DATA = "synthetic:users=200,items=90,seed=4"


def test_last_items_keeps_only_the_most_recent_items_and_their_exclusions() -> None:
    dataset = load_dataset(DATA)
    catalog = dataset.catalog()
    _, sequences = dataset.sequences(catalog)
    cases = evaluation_cases(sequences, "test", 10)
    short = last_items(cases, 2)
    assert int((short.inputs != PADDING_INDEX).sum(dim=1).max()) == 2
    assert torch.equal(short.inputs[:, -2:], cases.inputs[:, -2:]) and all(len(h) <= 2 for h in short.histories)


def test_the_table_has_every_variant(tmp_path: Path) -> None:
    dataset = load_dataset(DATA)
    catalog = dataset.catalog()
    torch.manual_seed(0)
    model = SASRec(ModelConfig(num_items=catalog.num_items, max_len=10, hidden=16, heads=1, blocks=1))
    save_model(tmp_path, model, catalog)
    rows = longtail_table(tmp_path, DATA)
    assert len(rows) == 2 + len(TAIL_PENALTIES) + 2 * len(SHORT_HISTORIES)
    assert [r["variant"] for r in rows[:2]] == ["most-popular", "SASRec"]
    assert any("cold-start blend, last 1" in r["variant"] for r in rows)
    assert all(0 <= row["ndcg@10"] <= 1 and 0 < row["coverage@10"] <= 1 for row in rows)
