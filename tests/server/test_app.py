"""The ServerApp's run files: what summary.json says about how the kept model was chosen; what rounds.jsonl says
about failed sites and failed rounds; a run in which no round trained keeps nothing."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import cast

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from common.federation import RunSettings
from common.privacy.ledger import Ledger, Spend
from common.recommender.model import SASRec
from common.run_files import read_rounds
from server.app import finish_run, run_federation, run_id_for
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


Answer = Callable[[int, int, ArrayRecord], RecordDict | Error]
"""What the site on a node answers in a round, given the global weights it was sent."""


class _Sites:
    """Flower's Grid as the ServerApp uses it, with sites that answer at once (``answer``), node ids 1, 2, ..."""

    def __init__(self, nodes: int, answer: Answer) -> None:
        self.nodes, self.answer, self.round = list(range(1, nodes + 1)), answer, 0

    def get_node_ids(self) -> list[int]:
        return self.nodes

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        self.round += bool(messages)
        return [Message(self.answer(self.round, m.metadata.dst_node_id, m.content.array_records["arrays"]),
                        reply_to=m) for m in messages]


def trained(site: str, arrays: ArrayRecord) -> RecordDict:
    """A site's reply as client.app builds it, its update the weights it was sent, moved a little."""
    moved = ArrayRecord({name: value + 0.01 for name, value in arrays.to_torch_state_dict().items()})
    return RecordDict({
        "arrays": moved,
        "metrics": MetricRecord({"weight": 1.0, "dp": 1, "declined": 0, "epsilon": 0.5}),
        "site": ConfigRecord({"site-id": site}),
    })


def declined(site: str) -> RecordDict:
    return RecordDict({
        "metrics": MetricRecord({"weight": 1.0, "dp": 1, "declined": 1, "epsilon": 0.0}),
        "site": ConfigRecord({"site-id": site, "reason": "declined: dp = false is not allowed by this site"}),
    })


@pytest.fixture
def flower_task(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("_task_id", "_run_id", "_node_id"):  # Flower stamps messages with the running task's identity
        monkeypatch.setattr(TaskIdentity, name, 1)


def _run(tmp_path: Path, sites: _Sites, **settings: object) -> dict[str, object]:
    run_settings = RunSettings(**{**SETTINGS, "rounds": 2, **settings}, out_dir=str(tmp_path))  # type: ignore[arg-type]
    return run_federation(cast(Grid, sites), run_settings)


def test_a_run_in_which_no_site_ever_trained_fails_with_the_reasons_and_keeps_no_model(
    tmp_path: Path, flower_task: None
) -> None:
    sites = _Sites(2, lambda _, node, __: declined(f"site-{node}"))
    with pytest.raises(RuntimeError, match=(
        r"no site's update was applied in any of the 2 round\(s\), so the run keeps no model. Round 2: no site "
        r"trained; the global model is unchanged \(site site-1: declined: dp = false is not allowed by this site; "
        r"site site-2: declined: .*\)"
    )):
        _run(tmp_path, sites, min_sites=2)
    assert not (tmp_path / "global_model.pt").exists() and not (tmp_path / "summary.json").exists()
    assert [r.failed for r in read_rounds(tmp_path)] == ["no site trained; the global model is unchanged"] * 2


def test_a_round_with_fewer_trained_sites_than_min_sites_fails_and_the_run_goes_on(
    tmp_path: Path, flower_task: None
) -> None:
    """Round 1: only north trains (min-sites 2), so the model stays as it was; round 2: both train."""
    sites = _Sites(2, lambda r, node, arrays: (
        trained("north" if node == 1 else "south", arrays) if node == 1 or r == 2 else declined("south")
    ))
    summary = _run(tmp_path, sites, min_sites=2, model_selection="last")
    first, second = read_rounds(tmp_path)
    assert first.failed == "only 1 site(s) trained (north), fewer than min-sites = 2; the global model is unchanged"
    assert second.failed is None and second.sites_trained == ["north", "south"]
    assert summary["run"] == summary["run"] | {"rounds_failed": [1], "model_round": 2}  # type: ignore[operator]


def test_failed_and_non_finite_sites_are_named_by_site_id_and_left_out(tmp_path: Path, flower_task: None) -> None:
    """Round 1: node 2 fails before it ever said which site it is, so it is named by its node; round 2 it trains as
    south, and north sends NaN weights: named north, left out, and the run keeps south's finite update."""

    def answer(round_number: int, node: int, arrays: ArrayRecord) -> RecordDict | Error:
        if round_number == 1:
            return trained("north", arrays) if node == 1 else Error(code=0, reason="ValueError: site broke")
        if node == 2:
            return trained("south", arrays)
        poisoned = trained("north", arrays)
        poisoned["arrays"] = ArrayRecord({name: value * float("nan") for name, value in
                                          arrays.to_torch_state_dict().items()})
        return poisoned

    _run(tmp_path, _Sites(2, answer))
    first, second = read_rounds(tmp_path)
    assert first.failures == ["node 2: ValueError: site broke"] and first.sites_trained == ["north"]
    assert second.sites_trained == ["south"] and len(second.failures) == 1
    assert second.failures[0].startswith("site north: its update holds NaN or infinity in '")
    checkpoint_weights = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["state_dict"]
    assert all(bool(torch.isfinite(v).all()) for v in checkpoint_weights.values() if v.is_floating_point())
