"""The fedtail command end to end on small generated data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.data.datasets import load_dataset
from common.recommender.artifacts import save_model
from common.recommender.model import ModelConfig, SASRec
from common.run_files import CHECKPOINT_FILE, FLOWER_LOG_FILE, GLOBAL_MODEL_FILE, ROUNDS_FILE, RUN_FILE, SUMMARY_FILE
from common.utils.processes import free_loopback_port
from server.serving import Recommender
from simulations.cli import main

SMALL = "synthetic:users=300,items=120,seed=3"
TINY_MODEL = ["--hidden", "16", "--heads", "1", "--blocks", "1", "--max-len", "20"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "simulations.cli", *args], capture_output=True, text=True, timeout=300, check=False
    )


def test_data_stats_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "stats", SMALL, "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["users"] == 300
    assert stats["interactions"] > 300 * 3
    assert 0 < stats["top20_item_share"] <= 1


def test_train_then_evaluate_writes_the_documented_files_and_layout(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["train", SMALL, "--out", str(out), "--epochs", "2", "--eval-every", "1", *TINY_MODEL]) == 0
    assert {p.name for p in out.iterdir()} >= {"model.pt", "catalog.json", "metrics.json"}
    metrics = json.loads((out / "metrics.json").read_text())
    for section in (metrics, metrics["baselines"]["most_popular"]):
        assert set(section["overall"]) >= {"ndcg@10", "hr@10", "mrr@10", "ndcg@20", "hr@20", "users"}
        assert set(section["groups"]) == {"tail", "torso", "head"}
        assert sum(section["groups"][g]["users"] for g in ("tail", "torso", "head")) == section["overall"]["users"]
        assert set(section["items"]) == {"coverage@10", "gini@10", "tail_share@10", "novelty@10", "ild@10",
                                         "miscalibration@10"}
        assert {"ild@10", "coverage@10"} <= set(section["groups"]["tail"])
    evaluated = tmp_path / "eval.json"
    assert main(["evaluate", str(out), SMALL, "--out", str(evaluated)]) == 0
    again = json.loads(evaluated.read_text())
    assert again["overall"] == pytest.approx(metrics["overall"]), "evaluating the saved model reproduces its metrics"


def test_malformed_input_exits_non_zero_with_file_and_line_and_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "u.data"
    bad.write_text("1\t2\t5\t100\n1\tthree\t5\t101\n")
    result = run_cli("data", "stats", str(bad))
    assert result.returncode == 2
    assert f"{bad}, line 2" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["data", "stats", "nosuchformat:x.txt"], "unknown format"),
        (["data", "stats", "synthetic:users=abc"], "not a"),
        (["train", SMALL, "--out", "unused", "--heads", "3"], "not divisible"),
        (["train", SMALL, "--out", "unused", "--lr", "0"], "learning rate"),
        (["train", SMALL, "--out", "unused", "--lr", "nan"], "learning rate must be a positive finite number"),
        (["train", SMALL, "--out", "unused", "--item-tables", "frozen"], "item-tables=frozen needs item-text"),
        (["evaluate", "no-such-model-dir", SMALL], "no-such-model-dir: no such folder"),
    ],
)
def test_wrong_options_are_one_clear_line(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "named"),
    [
        (["--epsilon", "inf"], "epsilon=inf"),
        (["--epsilon", "nan"], "epsilon=nan"),
        (["--delta", "nan"], "delta=nan"),
        (["--clip", "inf"], "max-grad-norm=inf"),
        (["--lr", "nan"], "learning-rate=nan"),
        (["--local-epochs", "inf"], "local-epochs=inf"),
        (["--server-lr", "inf"], "server-learning-rate=inf"),
        (["--server-momentum", "nan"], "server-momentum=nan"),
        (["--fraction-sites", "nan"], "fraction-sites=nan"),
        (["--dropout", "nan"], "dropout=nan"),
        (["--gpus-per-site", "inf"], "--gpus-per-site inf"),
        (["--delta", "1"], "delta=1.0: must be in (0, 1)"),
        (["--fraction-sites", "1.5"], "fraction-sites=1.5: must be in (0, 1]"),
    ],
)
def test_non_finite_or_out_of_range_settings_are_refused_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: list[str], named: str
) -> None:
    out = tmp_path / "run"
    assert main(["simulate", SMALL, "--out", str(out), *option]) == 2
    error = capsys.readouterr().err
    assert named in error and error.count("\n") == 1, error
    assert not out.exists(), "refused before a run folder, a ledger or Flower existed"


@pytest.mark.parametrize("command", ["simulate", "train"])
def test_out_naming_a_file_is_one_line_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    taken = tmp_path / "notes.txt"
    taken.write_text("not a folder")
    for out in (taken, taken / "run"):
        assert main([command, SMALL, "--out", str(out), "--epochs" if command == "train" else "--rounds", "1"]) == 2
        assert capsys.readouterr().err == f"fedtail: error: --out {out}: {taken} is a file, not a folder\n"
    assert taken.read_text() == "not a folder"


def test_evaluate_ignores_and_counts_items_unknown_to_the_catalogue(tmp_path: Path) -> None:
    out = tmp_path / "run"
    data = tmp_path / "pairs.txt"
    data.write_text("".join(f"u{u} i{(u + k) % 7}\n" for u in range(20) for k in range(5)))
    assert main(["train", str(data), "--out", str(out), "--epochs", "1", *TINY_MODEL]) == 0
    with data.open("a") as handle:
        handle.write("u1 brand-new-item\n")
    report_path = tmp_path / "e.json"
    assert main(["evaluate", str(out), str(data), "--out", str(report_path)]) == 0
    assert json.loads(report_path.read_text())["run"]["unknown_item_interactions_ignored"] == 1


def test_evaluate_and_serve_load_a_federated_run_folders_global_model(tmp_path: Path) -> None:
    """The README's promise: a finished run folder's global_model.pt loads with fedtail evaluate (and serve)."""
    catalog = load_dataset(SMALL).catalog()
    model = SASRec(ModelConfig(num_items=catalog.num_items, max_len=20, hidden=16, heads=1, blocks=1))
    trained, federated = tmp_path / "trained", tmp_path / "federated"
    save_model(trained, model, catalog)
    save_model(federated, model, catalog, GLOBAL_MODEL_FILE)  # as server/app.py's finish_run does
    (federated / RUN_FILE).write_text('{"run_id": "r1"}')
    (federated / SUMMARY_FILE).write_text('{"run": {"run_id": "r1"}}')
    reports = {}
    for folder in (trained, federated):
        assert main(["evaluate", str(folder), SMALL, "--out", str(folder / "eval.json")]) == 0
        reports[folder] = json.loads((folder / "eval.json").read_text())
    assert reports[federated]["run"]["model_file"] == GLOBAL_MODEL_FILE
    assert reports[federated]["overall"] == reports[trained]["overall"], "the same model, whichever file holds it"
    assert Recommender.load(federated, torch.device("cpu")).info.run_id == "r1"


@pytest.mark.parametrize("command", ["evaluate", "serve"])
def test_a_non_finite_model_is_refused_in_one_line_naming_the_file_and_the_parameter(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An all-NaN global model, as a run whose sites' updates were all NaN used to keep: evaluate used to report
    NDCG@10 = 1.0 for it, and serve to serve it."""
    catalog = load_dataset(SMALL).catalog()
    model = SASRec(ModelConfig(num_items=catalog.num_items, max_len=20, hidden=16, heads=1, blocks=1))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(float("nan"))
    save_model(tmp_path, model, catalog, GLOBAL_MODEL_FILE)
    args = [str(tmp_path), SMALL] if command == "evaluate" else [str(tmp_path), "--port", str(free_loopback_port())]
    assert main([command, *args]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1, error
    assert f"{tmp_path / GLOBAL_MODEL_FILE}: parameter 'item_embedding.weight' holds NaN or infinity" in error


@pytest.mark.parametrize("command", ["evaluate", "serve"])
def test_an_unfinished_run_folder_is_told_so_and_pointed_at_its_log_and_checkpoint(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for name in (RUN_FILE, ROUNDS_FILE, CHECKPOINT_FILE, FLOWER_LOG_FILE):  # what a run that failed in round 3 leaves
        (run / name).write_text("")
    args = [str(run), SMALL] if command == "evaluate" else [str(run), "--port", str(free_loopback_port())]
    assert main([command, *args]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "this federated run has not finished" in error, error
    assert f"its log is {run / FLOWER_LOG_FILE}" in error
    assert f"{CHECKPOINT_FILE} holds its last finished round" in error
    assert "train a model first" not in error
    (run / CHECKPOINT_FILE).unlink()  # failed before its first round ended
    assert main([command, *args]) == 2
    assert "it finished no round" in capsys.readouterr().err


def test_a_folder_without_any_model_is_told_how_to_make_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", str(tmp_path), SMALL]) == 2
    error = capsys.readouterr().err
    assert "no model.pt or global_model.pt here; train a model first" in error and "fedtail simulate" in error


def test_audit_help_sets_the_empirical_only_options_apart(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["audit", "--help"])
    general, _, empirical = capsys.readouterr().out.partition("options for --empirical only:")
    assert empirical, "a group titled for --empirical"
    for option in ("--out", "--empirical"):
        assert option in general
    for option in ("--canaries", "--canary-length", "--kcore", "--sites", "--rounds", "--epsilon", "--lr", "--hidden"):
        assert f"  {option} " in empirical and f"  {option} " not in general, option


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "fedtail"  # the venv's bin, activated or not
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "train" in result.stdout
