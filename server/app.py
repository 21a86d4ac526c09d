"""fedtail's ServerApp: FedAvg rounds over the sites, with per-round evaluation, checkpoints and resume.

Run folder (``out-dir`` in the run config)::

    run.json              the run id (sites' ledgers are keyed by it); from `fedtail simulate`, also the settings,
                          sites and partition a resume must keep (common.run_files.RunRecord)
    checkpoint.pt         global weights after the last finished round (resume point), and the best round's
    rounds.jsonl          one line per finished round: validation metrics, sites, epsilons, sites' ledger heads
    item_vectors.pt       (with item-text) the public content vectors, for the content cold-start prior
    global_model.pt       the kept global model    \\  loadable together with
    catalog.json          its item catalogue       /   common.artifacts.load_model
    summary.json          test metrics (metrics.json layout) + "privacy"
    rounds.svg            validation NDCG@10 and epsilon per round
    ledgers/site-<id>.jsonl   (simulation) each site's own privacy ledger, written by the site

The kept model is the round with the best validation NDCG@10 (``model-selection``,
the default) or the last round; summary.json's "run" names which round it is. A
best-validation choice is made on held-out items of the same users, outside any
ledger: summary.json's "privacy" counts it ("model_selection", with its size).

Evaluation uses the held-out validation / test users, which only a simulation's
server has; the sites never send local metrics (they would be unaccounted releases).
"""

from __future__ import annotations

import json
import time
from importlib.metadata import version
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from common.artifacts import save_model
from common.catalog import Catalog
from common.content import initialise_from_text, save_item_vectors
from common.datasets import load_dataset
from common.evaluation import evaluate, evaluate_with_baselines, model_scorer
from common.federation import RunSettings
from common.files import write_json
from common.model import SASRec
from common.processes import die_with_parent, lock_run_folder
from common.plot import write_round_plot
from common.privacy import model_selection_statement
from common.progress import log
from common.run_files import (
    GLOBAL_MODEL_FILE,
    ROUND_PLOT_FILE,
    ROUNDS_FILE,
    SUMMARY_FILE,
    RunRecord,
    read_run_record,
    write_run_record,
)
from common.split import EvaluationCases, evaluation_cases, item_popularity
from common.training import pick_device
from server.checkpoint import BestRound, Checkpoint, load_checkpoint
from server.strategy import private_strategy

app = ServerApp()


@dataclass(frozen=True)
class Evaluator:
    """The server's held-out view of users: validation per round, test at the end.

    A simulation's server holds every user's last items; a deployed
    coordinator evaluates on its own held-out users when it has some
    (``dataset``, mapped onto ``catalog-path``), and otherwise not at all.
    """

    catalog: Catalog
    valid: EvaluationCases
    test: EvaluationCases
    popularity: np.ndarray
    num_users: int

    @classmethod
    def from_settings(cls, settings: RunSettings) -> Evaluator:
        dataset = load_dataset(settings.dataset, kcore=settings.kcore)
        if settings.catalog_path:
            catalog = Catalog.load(settings.catalog_path)
            dataset, unknown = dataset.restricted_to(catalog)
            if unknown:
                log(f"fedtail: {unknown} evaluation interactions name items outside the catalogue; ignored")
        else:
            catalog = dataset.catalog()
        _, sequences = dataset.sequences(catalog)
        return cls(
            catalog,
            evaluation_cases(sequences, "valid", settings.max_len),
            evaluation_cases(sequences, "test", settings.max_len),
            item_popularity(sequences, catalog.num_items),
            len(sequences),
        )


def server_catalog(settings: RunSettings) -> tuple[Catalog, Evaluator | None]:
    if not settings.dataset:
        return Catalog.load(settings.catalog_path), None
    evaluator = Evaluator.from_settings(settings)
    return evaluator.catalog, evaluator


def run_id_for(out_dir: Path) -> str:
    """The run's id: made once (by `fedtail simulate`, or here), kept in run.json so a resumed run continues the
    same ledger entries."""
    record = read_run_record(out_dir)
    if record is None:
        record = RunRecord.new()
        write_run_record(out_dir, record)
    return record.run_id


def read_rounds(out_dir: Path, up_to: int | None = None) -> list[dict[str, Any]]:
    path = out_dir / ROUNDS_FILE
    if not path.exists():
        return []
    rounds = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rounds if up_to is None or r["round"] <= up_to]


def truncate_rounds(out_dir: Path, up_to: int) -> None:
    """Drop lines of rounds after the checkpoint: a run killed between the two writes redoes that round."""
    kept = read_rounds(out_dir, up_to)
    (out_dir / ROUNDS_FILE).write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")


def privacy_summary(settings: RunSettings, site_epsilon: dict[str, float]) -> dict[str, Any]:
    if not settings.dp:
        return {"dp": False, "epsilon": None, "delta": None, "per_site": {}, "guarantee": "NONE: trained without DP"}
    epsilon = max(site_epsilon.values(), default=0.0)
    return {
        "dp": True,
        "epsilon": epsilon,
        "delta": settings.delta,
        "per_site": dict(sorted(site_epsilon.items(), key=lambda item: int(item[0]) if item[0].isdigit() else item[0])),
        "unit": "user",
        "guarantee": (
            f"({epsilon:.3f}, {settings.delta:g})-DP for every user: users are disjoint across sites, so the global "
            "model's guarantee is the maximum over sites (site epsilons as reported by the sites; recompute them "
            "from the sites' ledgers)"
        ),
    }


def run_federation(grid: Grid, settings: RunSettings) -> dict[str, Any]:
    """Run (or resume) the federation to ``settings.rounds`` rounds; returns the summary."""
    out_dir = Path(settings.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with lock_run_folder(out_dir):
        return _federate(grid, settings, out_dir)


def _federate(grid: Grid, settings: RunSettings, out_dir: Path) -> dict[str, Any]:
    device = pick_device()
    catalog, evaluator = server_catalog(settings)
    torch.manual_seed(settings.seed)
    model = SASRec(settings.model_config(catalog.num_items))
    if settings.item_text:  # public metadata only: the initial model costs no privacy
        save_item_vectors(out_dir, initialise_from_text(model, catalog, Path(settings.item_text)))
    model.to(device)

    run_config = settings.to_run_config()
    checkpoint = load_checkpoint(out_dir, run_config)
    run_id = run_id_for(out_dir)
    done = 0
    site_epsilon: dict[str, float] = {}
    best: BestRound | None = None
    if checkpoint is not None:
        model.load_state_dict(checkpoint.state_dict)
        done, site_epsilon, best = checkpoint.round, checkpoint.site_epsilon, checkpoint.best
        truncate_rounds(out_dir, done)
        log(f"fedtail: resuming run {run_id} after round {done} of {settings.rounds}")
    elif (out_dir / ROUNDS_FILE).exists():
        truncate_rounds(out_dir, 0)
    if not settings.dp:
        log("fedtail: WARNING: dp = false: sites train WITHOUT differential privacy; the model has no privacy guarantee")

    strategy = private_strategy(
        settings.server_optimizer,
        settings.fraction_sites,
        settings.min_sites,
        round_offset=done,
        site_epsilon=site_epsilon,
        server_learning_rate=settings.server_learning_rate,
        server_momentum=settings.server_momentum,
    )
    round_started = [time.perf_counter()]

    def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        nonlocal best
        if server_round == 0:
            return None
        number = server_round + done
        if strategy.last_round.everyone_failed:
            raise RuntimeError(
                f"round {number}: every sampled site failed, so the run stops here. First error: "
                f"{strategy.last_round.failures[0][:2000]}"
            )
        evaluation_started = time.perf_counter()
        model.load_state_dict(arrays.to_torch_state_dict())
        valid = None if evaluator is None else validation_line(model, device, evaluator)
        evaluation_seconds = time.perf_counter() - evaluation_started
        replies = strategy.last_round
        line = {
            "round": number,
            "valid": valid,
            "sites_trained": sorted(replies.trained),
            "sites_declined": replies.declined,
            "sites_failed": len(replies.failures),
            "failures": replies.failures,  # each failed site's error reply, e.g. a refused app bundle
            "site_epsilon": dict(strategy.site_epsilon),
            "site_ledger_head": replies.ledger_heads,
            "run_id": run_id,
            "epsilon": max(strategy.site_epsilon.values(), default=0.0) if settings.dp else None,
            "seconds": time.perf_counter() - round_started[0],
            "evaluation_seconds": evaluation_seconds,  # the server's validation pass, included in "seconds"
        }
        with (out_dir / ROUNDS_FILE).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")
        weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        if valid is not None and (best is None or valid["ndcg@10"] > best.valid_ndcg):
            # A copy: on the CPU ``weights`` share memory with the model, which the next round overwrites.
            best = BestRound(number, valid["ndcg@10"], {k: v.clone() for k, v in weights.items()})
        Checkpoint(run_id, number, weights, run_config, line["site_epsilon"], best).save(out_dir)
        epsilon_note = f"  epsilon {line['epsilon']:.3f}" if settings.dp else "  NON-PRIVATE"
        declined_note = f"  declined: {', '.join(replies.declined)}" if replies.declined else ""
        valid_note = "" if valid is None else f"  valid NDCG@10 {valid['ndcg@10']:.4f}"
        log(
            f"fedtail: round {number}/{settings.rounds}{valid_note}  "
            f"sites {len(replies.trained)}{epsilon_note}{declined_note}  {line['seconds']:.1f}s"
        )
        round_started[0] = time.perf_counter()
        return None if valid is None else MetricRecord({"valid-ndcg@10": valid["ndcg@10"]})

    if settings.rounds > done:
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord({k: v.detach().cpu() for k, v in model.state_dict().items()}),
            num_rounds=settings.rounds - done,
            train_config=ConfigRecord(
                {"run-id": run_id, "catalog-sha256": catalog.fingerprint(), "flwr-version": version("flwr")}
            ),
            evaluate_fn=after_round,
        )
    kept = best if settings.model_selection == "best-validation" else None
    if kept is not None:
        model.load_state_dict(kept.state_dict)
        log(
            f"fedtail: keeping round {kept.round}'s model (best validation NDCG@10 {kept.valid_ndcg:.4f}); "
            "the last round's weights stay in checkpoint.pt"
        )
    kept_round = None if kept is None else kept.round
    return finish_run(out_dir, settings, model, catalog, evaluator, device, strategy.site_epsilon, kept_round)


def validation_line(model: SASRec, device: torch.device, evaluator: Evaluator) -> dict[str, float]:
    metrics = evaluate(model_scorer(model, device), evaluator.valid, evaluator.popularity, evaluator.num_users)
    return {
        "ndcg@10": metrics["overall"]["ndcg@10"],
        "hr@10": metrics["overall"]["hr@10"],
        **{f"{g}_ndcg@10": metrics["groups"][g]["ndcg@10"] for g in ("tail", "torso", "head")},
    }


def finish_run(
    out_dir: Path,
    settings: RunSettings,
    model: SASRec,
    catalog: Catalog,
    evaluator: Evaluator | None,
    device: torch.device,
    site_epsilon: dict[str, float],
    kept_round: int | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` (the kept one) on the test users and write the run's final files."""
    summary: dict[str, Any] = {}
    if evaluator is not None:
        summary = evaluate_with_baselines(
            model_scorer(model, device), evaluator.test, evaluator.popularity, evaluator.num_users
        )
    summary["privacy"] = privacy_summary(settings, site_epsilon)
    rounds = read_rounds(out_dir)
    if kept_round is not None and evaluator is not None:
        candidates = sum(r["valid"] is not None for r in rounds)
        summary["privacy"]["model_selection"] = {
            "rule": settings.model_selection,
            "kept_round": kept_round,
            "candidate_rounds": candidates,
            "validation_users": len(evaluator.valid),
            "not_covered": model_selection_statement(kept_round, candidates, len(evaluator.valid)),
        }
    summary["run"] = {
        "kind": "federated, " + ("DP-SGD at every site" if settings.dp else "NON-PRIVATE"),
        "stage": "test" if evaluator is not None else "not evaluated: the coordinator holds no held-out users",
        "run_id": run_id_for(out_dir),
        "settings": settings.to_run_config(),
        "catalog": settings.catalog_path or "built from the whole dataset (simulation)",
        "rounds_completed": len(rounds),
        "model_selection": settings.model_selection if kept_round is not None else "last",
        "model_round": kept_round if kept_round is not None else len(rounds),
        "seconds_per_round": [r["seconds"] for r in rounds],
    }
    save_model(out_dir, model, catalog, GLOBAL_MODEL_FILE)
    write_json(out_dir / SUMMARY_FILE, summary)
    write_round_plot(
        out_dir / ROUND_PLOT_FILE,
        [r["round"] for r in rounds],
        None if evaluator is None else [r["valid"]["ndcg@10"] for r in rounds],
        [r["epsilon"] for r in rounds] if settings.dp else None,
    )
    log(f"fedtail: run finished; wrote {out_dir / SUMMARY_FILE}")
    return summary


@app.main()
def main(grid: Grid, context: Context) -> None:
    die_with_parent()  # if whoever launched the run dies, the run stops instead of writing on alone
    run_federation(grid, RunSettings.from_run_config(context.run_config))
