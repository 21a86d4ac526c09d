"""fedtail's ServerApp: FedAvg rounds over the sites, with per-round evaluation, checkpoints and resume.

Run folder (``out-dir`` in the run config)::

    run.json              the run id (sites' ledgers are keyed by it); from `fedtail simulate`, also the settings,
                          sites and partition a resume must keep (common.run_files.RunRecord)
    checkpoint.pt         global weights after the last finished round (resume point), and the best round's
    rounds.jsonl          one line per finished round: validation metrics, sites, epsilons, sites' ledger heads
    item_vectors.pt       (with item-text) the public content vectors, for the content cold-start prior
    popularity.json, popularity_prior.pt   (with popularity-share) the sites' DP popularity releases, summed
    global_model.pt       the kept global model    \\  loadable together with
    catalog.json          its item catalogue       /   common.recommender.artifacts.load_model
    summary.json          test metrics (metrics.json layout) + "privacy"
    rounds.svg            validation NDCG@10 and epsilon per round
    ledgers/site-<id>.jsonl   (simulation) each site's own privacy ledger, written by the site

The kept model is the round with the best validation NDCG@10 (``model-selection``,
the default) or the last round; summary.json's "run" names which round it is.
A round in which fewer sites trained than ``min-sites`` is a failed round: the
global model stays as it was and rounds.jsonl says why ("failed"). A run in
which no round trained fails with the reasons and writes no model; a
non-finite aggregate stops the run at once (``server.strategy``). A
best-validation choice is made on held-out items of the same users, outside any
ledger: summary.json's "privacy" counts it ("model_selection", with its size).

Evaluation uses the held-out validation / test users, which only a simulation's
server has; the sites never send local metrics (they would be unaccounted releases).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from common.data.catalog import Catalog
from common.federation import RunSettings
from common.flower.polling_grid import PollingGrid
from common.privacy.accounting import model_selection_statement
from common.privacy.mechanisms import PLACEMENT_STATEMENTS
from common.protocol.records import trainable_names
from common.recommender.artifacts import save_model
from common.recommender.content import initialise_from_text, item_content_vectors, save_item_vectors
from common.recommender.continuation import continued_model
from common.recommender.evaluation import evaluate_with_baselines, model_scorer
from common.recommender.item_tables import frozen_parameters
from common.recommender.model import SASRec
from common.recommender.training import pick_device
from common.run_files import (
    GLOBAL_MODEL_FILE,
    ROUND_PLOT_FILE,
    ROUNDS_FILE,
    SUMMARY_FILE,
    RoundRecord,
    RunRecord,
    append_round,
    read_rounds,
    read_run_record,
    site_order,
    truncate_rounds,
    write_run_record,
)
from common.utils import timeline
from common.utils.files import write_json
from common.utils.plot import write_round_plot
from common.utils.processes import die_with_parent, lock_run_folder
from common.utils.progress import log
from server.central_noise import central_strategy
from server.checkpoint import BestRound, Checkpoint, load_checkpoint
from server.distributed_noise import distributed_strategy
from server.evaluator import Evaluator, server_catalog, validation_line
from server.popularity import (
    PopularityFloor,
    initialise_output_bias,
    load_popularity,
    request_popularity,
    save_popularity,
)
from server.strategy import PrivateAggregation, private_strategy

ONE_NOISE_KINDS = {
    "gradient": "DP-FedSGD (each sampled user's clipped gradient)",
    "delta": "user-level DP-FedAvg (each sampled user's clipped model delta after user-steps local steps)",
}
"""The summary's words for a one-noise round, by ``user-update``."""

app = ServerApp()


def run_id_for(out_dir: Path) -> str:
    """The run's id: made once (by `fedtail simulate`, or here), kept in run.json so a resumed run continues the
    same ledger entries."""
    record = read_run_record(out_dir)
    if record is None:
        record = RunRecord.new()
        write_run_record(out_dir, record)
    return record.run_id


def privacy_summary(settings: RunSettings, site_epsilon: dict[str, float]) -> dict[str, Any]:
    if not settings.dp:
        return {"dp": False, "epsilon": None, "delta": None, "per_site": {}, "guarantee": "NONE: trained without DP"}
    epsilon = max(site_epsilon.values(), default=0.0)
    statement = PLACEMENT_STATEMENTS.get(settings.noise)
    central = {"noise": settings.noise, "trust": statement} if statement else {}
    return {
        **central,
        "dp": True,
        "epsilon": epsilon,
        "delta": settings.delta,
        "per_site": dict(sorted(site_epsilon.items(), key=lambda item: site_order(item[0]))),
        "unit": "user",
        "guarantee": (
            f"({epsilon:.3f}, {settings.delta:g})-DP for every user: users are disjoint across sites, so the global "
            "model's guarantee is the maximum over sites (site epsilons as reported by the sites; recompute them "
            "from the sites' ledgers)" + (f". {statement}" if statement else "")
        ),
    }


@dataclass
class RunState:
    """Where a run stands at the server: the rounds finished, each site's epsilon, the best round so far."""

    done: int = 0
    site_epsilon: dict[str, float] = field(default_factory=dict)
    best: BestRound | None = None


def run_federation(grid: Grid, settings: RunSettings) -> dict[str, Any]:
    """Run (or resume) the federation to ``settings.rounds`` rounds; returns the summary."""
    out_dir = Path(settings.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with lock_run_folder(out_dir):
        return _federate(grid, settings, out_dir)


def _federate(grid: Grid, settings: RunSettings, out_dir: Path) -> dict[str, Any]:
    device = pick_device()
    catalog, evaluator = server_catalog(settings)
    model = initial_model(settings, catalog, out_dir).to(device)
    run_id = run_id_for(out_dir)
    floor = popularity_floor(grid, settings, run_id, catalog, out_dir)
    if floor is not None:
        initialise_output_bias(model, floor.prior())
    state = resume(out_dir, settings, model, run_id)
    if floor is not None and state.done == 0:
        state.best = floor_candidate(model, device, evaluator, settings)
    for site, epsilon in ({} if floor is None else floor.site_epsilon).items():
        state.site_epsilon.setdefault(site, epsilon)  # a resumed run's later totals stay
    if not settings.dp:
        log(
            "fedtail: WARNING: dp = false: sites train WITHOUT differential privacy; "
            "the model has no privacy guarantee"
        )
    frozen = frozen_parameters(settings.item_tables)
    summed_names = [name for name in trainable_names(model) if name not in frozen]  # what the sites sum and send
    strategy = (
        distributed_strategy(settings, summed_names, state.done, state.site_epsilon)
        if settings.noise == "distributed"
        else central_strategy(settings, state.done, state.site_epsilon, device)
        if settings.noise == "central"
        else private_strategy(
            settings.server_optimizer,
            settings.fraction_sites,
            settings.min_sites,
            round_offset=state.done,
            site_epsilon=state.site_epsilon,
            server_learning_rate=settings.server_learning_rate,
            server_momentum=settings.server_momentum,
            frozen=frozen,
        )
    )
    round_started = [time.perf_counter()]

    def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower calls this with each round's new global weights (and once with the initial ones, round 0)."""
        if server_round == 0:
            return None
        latest = arrays.to_torch_state_dict()
        model.load_state_dict(latest)
        record = finish_round(
            server_round + state.done, model, device, evaluator, strategy, settings, run_id, round_started[0]
        )
        with timeline.stage("records"):
            append_round(out_dir, record)
            weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            state.best = keep_if_best(state.best, record, weights)
            Checkpoint(
                run_id, record.round, latest, settings.to_run_config(), record.site_epsilon, state.best
            ).save(out_dir)
        log_round(record, settings)
        timeline.emit("coordinator-round", round=record.round, **timeline.durations())
        timeline.reset()
        round_started[0] = time.perf_counter()
        return None if record.valid is None else MetricRecord({"valid-ndcg@10": record.valid["ndcg@10"]})

    if settings.rounds > state.done:
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord({k: v.detach().cpu() for k, v in model.state_dict().items()}),
            num_rounds=settings.rounds - state.done,
            train_config=ConfigRecord(
                {"run-id": run_id, "catalog-sha256": catalog.fingerprint(), "flwr-version": version("flwr")}
            ),
            evaluate_fn=after_round,
        )
    rounds = read_rounds(out_dir)
    if not any(r.failed is None for r in rounds):
        raise RuntimeError(no_trained_round(rounds))
    kept = state.best if settings.model_selection == "best-validation" else None
    if kept is not None:
        model.load_state_dict(kept.state_dict)
        log(
            f"fedtail: keeping round {kept.round}'s model (best validation NDCG@10 {kept.valid_ndcg:.4f}); "
            "the last round's weights stay in checkpoint.pt"
        )
    kept_round = None if kept is None else kept.round
    return finish_run(out_dir, settings, model, catalog, evaluator, device, strategy.site_epsilon, kept_round, floor)


def popularity_floor(
    grid: Grid, settings: RunSettings, run_id: str, catalog: Catalog, out_dir: Path
) -> PopularityFloor | None:
    """The sites' DP popularity releases, asked once per run before round 1 (``server.popularity``); None when off."""
    if not (settings.dp and settings.popularity_share > 0):
        return None
    floor = load_popularity(out_dir)
    if floor is None:
        floor = request_popularity(grid, settings, run_id, catalog)
        if floor.failures and not floor.sites and not floor.declined:
            raise RuntimeError(f"popularity release: every site failed. First error: {floor.failures[0][:2000]}")
        save_popularity(out_dir, floor, settings)
    return floor


def floor_candidate(
    model: SASRec, device: torch.device, evaluator: Evaluator | None, settings: RunSettings
) -> BestRound | None:
    """Round 0, the starting model with the popularity floor's output bias, as a candidate for the kept model.

    Why: the floor alone ranks close to most-popular, and at a small epsilon no trained round may beat it; it is
    post-processing of the sites' popularity releases, so keeping it releases nothing more than keeping any round.
    """
    if evaluator is None or settings.model_selection != "best-validation":
        return None
    valid = validation_line(model, device, evaluator)
    log(f"fedtail: round 0 (the popularity floor)  valid NDCG@10 {valid['ndcg@10']:.4f}")
    return BestRound(0, valid["ndcg@10"], {k: v.detach().cpu().clone() for k, v in model.state_dict().items()})


def initial_model(settings: RunSettings, catalog: Catalog, out_dir: Path) -> SASRec:
    """Round 0's global model: seeded from the run's seed, items from public metadata when the run names some;
    with ``init-model``, the released model continued (``common.recommender.continuation``)."""
    torch.manual_seed(settings.seed)
    if settings.init_model:
        vectors = None
        if settings.item_text:
            vectors = item_content_vectors(catalog, Path(settings.item_text), settings.hidden)
            save_item_vectors(out_dir, vectors)
        model = continued_model(settings.init_model, catalog, settings.model_config(catalog.num_items), vectors,
                                settings.seed)
        log(f"fedtail: continuing the model released in {settings.init_model} ({model.config.num_items} items)")
        return model
    model = SASRec(settings.model_config(catalog.num_items))
    if settings.item_text:  # public metadata only: the initial model costs no privacy
        save_item_vectors(out_dir, initialise_from_text(model, catalog, Path(settings.item_text)))
    return model


def resume(out_dir: Path, settings: RunSettings, model: SASRec, run_id: str) -> RunState:
    """Load the checkpoint into ``model`` when there is one; drop round records the checkpoint does not cover."""
    checkpoint = load_checkpoint(out_dir, settings.to_run_config())
    if checkpoint is None:
        if (out_dir / ROUNDS_FILE).exists():
            truncate_rounds(out_dir, 0)
        return RunState()
    model.load_state_dict(checkpoint.state_dict)
    truncate_rounds(out_dir, checkpoint.round)
    log(f"fedtail: resuming run {run_id} after round {checkpoint.round} of {settings.rounds}")
    return RunState(checkpoint.round, checkpoint.site_epsilon, checkpoint.best)


def finish_round(
    number: int,
    model: SASRec,
    device: torch.device,
    evaluator: Evaluator | None,
    strategy: PrivateAggregation,
    settings: RunSettings,
    run_id: str,
    started: float,
) -> RoundRecord:
    """Validate the round's global model (already in ``model``) when due, and record what the round's replies said.

    Validation is due every ``evaluate-every`` rounds and after the last one: a one-step round (``noise = central``)
    would otherwise spend most of its time on a full validation pass."""
    replies = strategy.last_round
    if replies.everyone_failed:
        raise RuntimeError(
            f"round {number}: every sampled site failed, so the run stops here. "
            f"First error: {replies.failures[0][:2000]}"
        )
    evaluation_started = time.perf_counter()
    due = number % settings.evaluate_every == 0 or number == settings.rounds
    with timeline.stage("validation"):
        valid = None if evaluator is None or not due else validation_line(model, device, evaluator)
    evaluation_seconds = time.perf_counter() - evaluation_started
    return RoundRecord(
        round=number,
        run_id=run_id,
        valid=valid,
        sites_trained=sorted(replies.trained, key=site_order),
        sites_declined=replies.declined,
        failures=replies.failures,
        failed=replies.failed or None,
        site_epsilon=dict(strategy.site_epsilon),
        site_ledger_head=replies.ledger_heads,
        epsilon=max(strategy.site_epsilon.values(), default=0.0) if settings.dp else None,
        seconds=time.perf_counter() - started,
        evaluation_seconds=evaluation_seconds,
    )


def no_trained_round(rounds: list[RoundRecord]) -> str:
    """Why a run whose every round failed keeps nothing: the last round's reason, with each site's decline or error.

    Without this the run would end as completed and release its initial weights as the global model."""
    if not rounds:
        return "no round ran, so the run keeps no model"
    last = rounds[-1]
    declined = sorted(last.sites_declined.items(), key=lambda item: site_order(item[0]))
    sites = [*(f"site {site}: {reason}" for site, reason in declined), *last.failures]
    return (
        f"no site's update was applied in any of the {len(rounds)} round(s), so the run keeps no model. "
        f"Round {last.round}: {last.failed}" + (f" ({'; '.join(sites)})" if sites else "")
    )[:2000]


def keep_if_best(best: BestRound | None, record: RoundRecord, weights: dict[str, torch.Tensor]) -> BestRound | None:
    """The best round so far by validation NDCG@10, with a copy of its weights (the model is overwritten next round)."""
    if record.valid is None or (best is not None and record.valid["ndcg@10"] <= best.valid_ndcg):
        return best
    return BestRound(record.round, record.valid["ndcg@10"], {k: v.clone() for k, v in weights.items()})


def log_round(record: RoundRecord, settings: RunSettings) -> None:
    epsilon_note = f"  epsilon {record.epsilon:.3f}" if record.epsilon is not None else "  NON-PRIVATE"
    declined_note = f"  declined: {', '.join(record.sites_declined)}" if record.sites_declined else ""
    failed_note = f"  failed: {len(record.failures)}" if record.failures else ""
    valid_note = "" if record.valid is None else f"  valid NDCG@10 {record.valid['ndcg@10']:.4f}"
    round_failed = "" if record.failed is None else f"  ROUND FAILED: {record.failed}"
    log(
        f"fedtail: round {record.round}/{settings.rounds}{valid_note}  sites {len(record.sites_trained)}"
        f"{epsilon_note}{declined_note}{failed_note}{round_failed}  {record.seconds:.1f}s"
    )


def finish_run(
    out_dir: Path,
    settings: RunSettings,
    model: SASRec,
    catalog: Catalog,
    evaluator: Evaluator | None,
    device: torch.device,
    site_epsilon: dict[str, float],
    kept_round: int | None = None,
    floor: PopularityFloor | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` (the kept one) on the test users and write the run's final files."""
    summary: dict[str, Any] = {}
    if evaluator is not None:
        summary = evaluate_with_baselines(
            model_scorer(model, device), evaluator.test, evaluator.popularity, evaluator.num_users
        )
    summary["privacy"] = privacy_summary(settings, site_epsilon)
    if floor is not None:
        summary["privacy"]["popularity_floor"] = floor.report(settings)
    rounds = read_rounds(out_dir)
    if kept_round is not None and evaluator is not None:
        candidates = sum(r.valid is not None for r in rounds) + (floor is not None)  # round 0: the floor
        summary["privacy"]["model_selection"] = {
            "rule": settings.model_selection,
            "kept_round": kept_round,
            "candidate_rounds": candidates,
            "validation_users": len(evaluator.valid),
            "not_covered": model_selection_statement(kept_round, candidates, len(evaluator.valid)),
        }
    summary["run"] = {
        "kind": "federated, "
        + ("NON-PRIVATE" if not settings.dp else
           f"{ONE_NOISE_KINDS[settings.user_update]}, one noise per step added by the coordinator"
           if settings.noise == "central" else
           f"{ONE_NOISE_KINDS[settings.user_update]}, one noise per step added in shares by the sites, summed by "
           "SecAgg+" if settings.noise == "distributed" else
           "DP-SGD at every site"),
        "stage": "test" if evaluator is not None else "not evaluated: the coordinator holds no held-out users",
        "run_id": run_id_for(out_dir),
        "settings": settings.to_run_config(),
        "catalog": settings.catalog_path or "built from the whole dataset (simulation)",
        "rounds_completed": len(rounds),
        "rounds_failed": [r.round for r in rounds if r.failed is not None],
        "model_selection": settings.model_selection if kept_round is not None else "last",
        "model_round": kept_round if kept_round is not None else max(
            (r.round for r in rounds if r.failed is None), default=0
        ),
        "seconds_per_round": [r.seconds for r in rounds],
    }
    save_model(out_dir, model, catalog, GLOBAL_MODEL_FILE)
    write_json(out_dir / SUMMARY_FILE, summary)
    write_round_plot(
        out_dir / ROUND_PLOT_FILE,
        [r.round for r in rounds],
        None if evaluator is None else [r.valid["ndcg@10"] if r.valid else 0.0 for r in rounds],
        [r.epsilon or 0.0 for r in rounds] if settings.dp else None,
        kept_round,
    )
    log(f"fedtail: run finished; wrote {out_dir / SUMMARY_FILE}")
    return summary


@app.main()
def main(grid: Grid, context: Context) -> None:
    die_with_parent()  # if whoever launched the run dies, the run stops instead of writing on alone
    run_federation(PollingGrid(grid), RunSettings.from_run_config(context.run_config))
