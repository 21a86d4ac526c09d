"""The ServerApp's run files: what summary.json says about how the kept model was chosen."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.federation import RunSettings
from common.privacy.ledger import Ledger, Spend
from common.recommender.model import SASRec
from server.app import finish_run, run_id_for
from server.evaluator import Evaluator
from simulations.audit import audit

SETTINGS = dict(dataset="synthetic:users=120,items=80,seed=3", rounds=3, epsilon=4.0, delta=1e-4, hidden=16, heads=1,
                blocks=1, max_len=10)


@pytest.mark.parametrize(("selection", "kept_round"), [("best-validation", 2), ("last", None)])
def test_summary_counts_a_best_validation_choice_as_not_covered(
    tmp_path: Path, selection: str, kept_round: int | None
) -> None:
    settings = RunSettings(**SETTINGS, model_selection=selection, out_dir=str(tmp_path))
    evaluator = Evaluator.from_settings(settings)
    rounds = [{"round": r, "valid": {"ndcg@10": 0.1 * r}, "epsilon": r, "seconds": 1.0} for r in (1, 2, 3)]
    (tmp_path / "rounds.jsonl").write_text("".join(json.dumps(line) + "\n" for line in rounds))
    Ledger(tmp_path / "ledgers" / "site-0.jsonl").append(
        Spend(run_id_for(tmp_path), 1, "0", 0.1, 1.1, 1.0, 20, 1e-4, "rdp", {}, users=100)
    )
    model = SASRec(settings.model_config(evaluator.catalog.num_items))
    summary = finish_run(tmp_path, settings, model, evaluator.catalog, evaluator, torch.device("cpu"), {"0": 1.0},
                         kept_round)
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["privacy"] == summary["privacy"]
    not_covered = [text for text in audit([tmp_path]).not_covered if text.startswith("Model selection")]
    if kept_round is None:
        assert "model_selection" not in summary["privacy"] and not not_covered
        return
    selection_record = summary["privacy"]["model_selection"]
    assert selection_record["kept_round"] == 2 and selection_record["candidate_rounds"] == 3
    assert selection_record["validation_users"] == len(evaluator.valid) > 0
    assert not_covered == [selection_record["not_covered"]], "the audit reports the selection with its size too"
    assert f"of {len(evaluator.valid)} users" in not_covered[0] and "among 3 released rounds" in not_covered[0]
