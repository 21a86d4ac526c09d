"""``fedtail engagement`` on a tiny saved model: every table, per group, and the trade-off chart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.data.datasets import load_dataset
from common.recommender.artifacts import save_model
from common.recommender.augment import AugmentOptions
from common.recommender.model import ModelConfig, SASRec
from common.recommender.rerank import DiversityOptions
from simulations.centralized import evaluate_saved
from simulations.cli import main
from simulations.engagement import engagement_tables

DATA = "synthetic:users=80,items=100,seed=2"


def test_engagement_writes_the_curve_the_augmentation_and_the_replay(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(0)
    catalog = load_dataset(DATA).catalog()
    save_model(tmp_path / "model", SASRec(ModelConfig(num_items=catalog.num_items, max_len=8, hidden=8, heads=2,
                                                      blocks=1)), catalog)
    out = tmp_path / "out"
    assert main(["engagement", str(tmp_path / "model"), DATA, "--out", str(out), "--weights", "0", "0.5",
                 "--tail-penalties", "0", "--augment-to", "0", "4", "--diversity", "0.5", "--repeat-penalty", "0.2",
                 "--augment", "4", "--steps", "3"]) == 0
    result = json.loads((out / "engagement.json").read_text())
    assert [row["diversity"] for row in result["tradeoff"]] == ["most-popular", 0.0, 0.5]
    assert {"tail ndcg@10", "tail ild@10", "head tail_share@10"} <= set(result["tradeoff"][1])
    plain, diverse = result["tradeoff"][1:]
    assert diverse["overall ild@10"] >= plain["overall ild@10"], "the re-ranked lists are more varied"
    assert {(row["histories"], row["augment_to"]) for row in result["augmentation"]} == {
        (h, a) for h in ("test", "last 1", "last 3") for a in (0, 4)}
    replay = result["replay"]
    assert set(replay) == {"plain", "MMR", "repetition", "MMR + repetition", "augmented", "all"}
    assert len(replay["plain"]["overall"]["cumulative_hits"]) == 3
    assert replay["repetition"]["overall"]["repeat_rate"] <= replay["plain"]["overall"]["repeat_rate"]
    assert (out / "tradeoff.svg").read_text().startswith("<svg")
    assert "cumulative hits@10 per step" in capsys.readouterr().out


def test_the_most_popular_row_is_the_evaluation_baseline(tmp_path: Path) -> None:
    """Popularity counts the training histories once: the row equals ``fedtail evaluate``'s most-popular."""
    torch.manual_seed(0)
    catalog = load_dataset(DATA).catalog()
    save_model(tmp_path / "model", SASRec(ModelConfig(num_items=catalog.num_items, max_len=8, hidden=8, heads=2,
                                                      blocks=1)), catalog)
    result = engagement_tables(tmp_path / "model", DATA, (0.0,), (0.0,), (0,), DiversityOptions(), AugmentOptions(),
                               steps=1)
    baseline = evaluate_saved(tmp_path / "model", load_dataset(DATA), torch.device("cpu"))["baselines"]["most_popular"]
    row = result["tradeoff"][0]
    assert row["overall ndcg@10"] == pytest.approx(baseline["overall"]["ndcg@10"])
    assert row["overall tail_share@10"] == pytest.approx(baseline["items"]["tail_share@10"])
