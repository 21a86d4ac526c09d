"""The lifelong evaluation without Flower: windows written, released models scored on every window so far,
forgetting, the summary files; and a model never updated cannot recommend items that entered after it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from client.catalog_memory import trained_catalog_path
from common.data.catalog import Catalog
from common.errors import ConfigError
from common.federation import RunSettings
from common.privacy.accounting import epsilon_from_history
from common.privacy.ledger import Ledger, Spend
from common.privacy.lifetime import window_epsilon
from common.recommender.artifacts import load_model, save_model
from common.recommender.continuation import grow_items
from common.recommender.model import SASRec
from common.run_files import RunRecord, read_run_record, write_run_record
from simulations.lifelong import (
    DRIFTING_SYNTHETIC,
    STRATEGIES,
    RunResult,
    continue_epsilons,
    drifting_dataset,
    evaluate_strategies,
    restricted_scorer,
    run_lifelong,
    strategy_epsilons,
    write_summary,
    write_windows,
)
from simulations.simulate import Resources, continued_catalog

SETTINGS = RunSettings(dataset="synthetic:users=300,items=100,topics=10,seed=2,drift=1.0,new_items=0.3",
                       max_len=8, hidden=8, heads=2, blocks=1)


def test_windows_models_evaluation_and_summary(tmp_path: Path) -> None:
    data = write_windows(SETTINGS, sites=2, windows=3, folder=tmp_path / "data")
    assert [Catalog.load(w.catalog).version for w in data] == [1, 2, 3]
    runs = {}
    for window in data:  # stand-ins for the released models: untrained, on each window's catalogue
        catalog = Catalog.load(window.catalog)
        torch.manual_seed(window.number)
        for strategy in ("continue", "retrain"):
            folder = tmp_path / strategy / f"window-{window.number}"
            save_model(folder, SASRec(SETTINGS.model_config(catalog.num_items)), catalog, "global_model.pt")
            runs[(strategy, window.number)] = RunResult(folder, 10.0, 1.0, folder / "ledgers")
        runs[("never", window.number)] = runs[("continue", 1)]
    summary = evaluate_strategies(data, runs, STRATEGIES, SETTINGS)
    [first, second, third] = summary["windows"]
    assert first["strategies"]["continue"]["forgetting"] is None
    assert third["strategies"]["never"]["forgetting"] == 0.0, "the model released then is the same model"
    assert isinstance(third["strategies"]["continue"]["forgetting"], float)
    assert third["strategies"]["continue"]["seconds"]["total_wall"] == 30.0
    assert third["strategies"]["never"]["seconds"] == {
        "window_wall": 0.0, "window_training": 0.0, "total_wall": 10.0, "total_training": 1.0}
    for entry in summary["windows"]:
        assert set(entry["strategies"]) == set(STRATEGIES)
        assert entry["strategies"]["continue"]["new_window"]["overall"]["users"] == entry["held_out_users"] > 0
    summary["epsilon_per_strategy"] = {s: [None] * 3 for s in STRATEGIES}
    write_summary(tmp_path, summary)
    assert json.loads((tmp_path / "lifelong.json").read_text())["windows"][2]["window"] == 3
    assert "| 3 | never |" in (tmp_path / "lifelong.md").read_text()
    assert "| 3 | most-popular (reference) |" in (tmp_path / "lifelong.md").read_text()
    assert (tmp_path / "lifelong.svg").read_text().startswith("<svg")


def test_an_older_model_scores_newer_items_minus_infinity_and_a_newer_one_is_cut_to_the_old_catalogue(
    tmp_path: Path,
) -> None:
    old = Catalog.from_items([str(i) for i in range(1, 11)])
    new = old.extend(["11", "12"])
    torch.manual_seed(0)
    model = SASRec(SETTINGS.model_config(10))
    save_model(tmp_path / "old", model, old, "global_model.pt")
    save_model(tmp_path / "new", grow_items(model, 12, None, seed=1), new, "global_model.pt")
    inputs = torch.tensor([[0, 0, 0, 0, 0, 1, 2, 11]])
    old_on_new = restricted_scorer(tmp_path / "old", new, torch.device("cpu"))(inputs)
    assert old_on_new.shape == (1, 13) and torch.isneginf(old_on_new[0, 11:]).all()
    new_on_old = restricted_scorer(tmp_path / "new", old, torch.device("cpu"))(inputs[:, :7])
    old_on_old = restricted_scorer(tmp_path / "old", old, torch.device("cpu"))(inputs[:, :7])
    torch.testing.assert_close(new_on_old, old_on_old)


@pytest.mark.slow
def test_two_windows_through_flower_compose_in_shared_ledgers_under_the_lifetime_cap(tmp_path: Path) -> None:
    settings = RunSettings(
        dataset="synthetic:users=600,items=90,topics=10,seed=2,drift=1.0,new_items=0.3", rounds=2, epsilon=4.0,
        delta=1e-4, hidden=16, heads=1, blocks=1, max_len=12, batch_size=32,
    )
    summary = run_lifelong(settings, Resources(sites=2, cpus_per_site=1), 2, tmp_path, ("continue", "never"))
    ledgers = sorted((tmp_path / "ledgers").glob("site-*.jsonl"))
    assert len(ledgers) == 2
    run_ids = [read_run_record(tmp_path / "continue" / f"window-{k}").run_id for k in (1, 2)]
    for ledger in ledgers:
        assert [e["run_id"] for e in Ledger(ledger).entries()] == [run_ids[0]] * 2 + [run_ids[1]] * 2
        assert Catalog.load(trained_catalog_path(ledger)).version == 2, "the site remembers the catalogue it trained"
    lifetime = summary["epsilon"]["lifetime"]
    assert summary["epsilon"]["window"][0] < lifetime[1] <= 4.0
    assert summary["audit"]["passed"] and summary["audit"]["epsilon"] == pytest.approx(lifetime[1])
    first, _ = load_model(tmp_path / "continue" / "window-1")
    second, catalog = load_model(tmp_path / "continue" / "window-2")
    assert catalog.version == 2 and second.config.num_items > first.config.num_items


@pytest.mark.slow
def test_windows_under_central_noise_spend_one_step_a_round_and_compose_under_the_lifetime_cap(tmp_path: Path) -> None:
    settings = RunSettings(
        dataset="synthetic:users=600,items=90,topics=10,seed=2,drift=1.0,new_items=0.3", rounds=3, epsilon=4.0,
        delta=1e-4, hidden=16, heads=1, blocks=1, max_len=12, batch_size=150, sample_rate=0.5, noise="central",
    )
    summary = run_lifelong(settings, Resources(sites=2, cpus_per_site=1), 2, tmp_path, ("continue", "never"))
    ledgers = sorted((tmp_path / "ledgers").glob("site-*.jsonl"))
    assert len(ledgers) == 2
    for ledger in ledgers:
        entries = Ledger(ledger).entries()
        assert len(entries) == 6, "3 one-step rounds in each of 2 windows"
        assert {(e["noise_placement"], e["steps"], e["sample_rate"]) for e in entries} == {("central", 1, 0.5)}
    lifetime = summary["epsilon"]["lifetime"]
    assert summary["epsilon"]["window"][0] < lifetime[1] <= 4.0
    assert summary["settings"]["window_epsilon"] == pytest.approx(window_epsilon(4.0, 2, 1e-4, 0.5, 3)), (
        "the per-window target is sized for 3 one-step rounds, not 3 rounds of local epochs"
    )
    assert lifetime[1] > 0.98 * 4.0, "so the two windows use nearly all of the lifetime cap"
    assert summary["audit"]["passed"] and summary["audit"]["epsilon"] == pytest.approx(lifetime[1])
    second, catalog = load_model(tmp_path / "continue" / "window-2")
    assert catalog.version == 2
    assert "one noise per step added by the coordinator" in json.loads(
        (tmp_path / "continue" / "window-2" / "summary.json").read_text()
    )["run"]["kind"]


def test_windows_on_the_builtin_data_use_its_drifting_clock_and_refuse_a_synthetic_spec_without_one() -> None:
    assert drifting_dataset("synthetic") == DRIFTING_SYNTHETIC
    assert drifting_dataset("synthetic:users=50,drift=0.5") == "synthetic:users=50,drift=0.5"
    assert drifting_dataset("/data/ml-100k") == "/data/ml-100k"
    with pytest.raises(ConfigError, match="no shared clock"):
        drifting_dataset("synthetic:users=500")


def test_retraining_every_window_composes_its_runs_including_window_one_in_the_shared_ledgers(tmp_path: Path) -> None:
    def spend(path: Path, run_id: str, sigma: float) -> None:
        ledger = Ledger(path)
        ledger.append(Spend(run_id=run_id, round=1, site="0", sample_rate=0.1, noise_multiplier=sigma,
                            max_grad_norm=1.0, steps=10, delta=1e-5, accountant="rdp", library_versions={}, users=5))

    runs = {}
    for name, folder, ledgers, sigma in (("continue", "c1", "shared", 1.0), ("continue", "c2", "shared", 1.1),
                                         ("retrain", "r2", "r2/ledgers", 0.9)):
        (tmp_path / folder).mkdir()
        write_run_record(tmp_path / folder, RunRecord.new())
        spend(tmp_path / ledgers / "site-0.jsonl", read_run_record(tmp_path / folder).run_id, sigma)
        runs[(name, int(folder[1]))] = RunResult(tmp_path / folder, 1.0, 1.0, tmp_path / ledgers)
    runs[("retrain", 1)] = runs[("continue", 1)]
    spent = continue_epsilons(runs, 2, 1e-5)
    alone = [epsilon_from_history([(s, 0.1, 10)], 1e-5) for s in (1.0, 1.1, 0.9)]
    assert spent["window"] == pytest.approx(alone[:2])
    assert spent["lifetime"][1] == pytest.approx(epsilon_from_history([(1.0, 0.1, 10), (1.1, 0.1, 10)], 1e-5))
    epsilons = strategy_epsilons(runs, 2, STRATEGIES, spent, 1e-5)
    assert epsilons["retrain"] == pytest.approx([alone[0], alone[2]])
    assert epsilons["retrain_every_window"][1] == pytest.approx(
        epsilon_from_history([(1.0, 0.1, 10), (0.9, 0.1, 10)], 1e-5)
    )


def test_a_simulation_continuing_a_released_model_gets_the_released_catalogue_extended_by_its_data(
    tmp_path: Path,
) -> None:
    released = Catalog.from_items(["5", "3", "999"])
    save_model(tmp_path / "released", SASRec(SETTINGS.model_config(3)), released, "global_model.pt")
    settings = RunSettings(dataset="synthetic:users=50,items=100,seed=1", init_model=str(tmp_path / "released"))
    continued = continued_catalog(settings, tmp_path)
    catalog = Catalog.load(continued.catalog_path)
    catalog.check_extends(released)
    assert catalog.version == 2 and catalog.items[:3] == released.items and "1" in catalog.items
    assert continued_catalog(continued, tmp_path) is continued, "a run with a catalogue keeps it"
