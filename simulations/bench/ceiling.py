"""``ceiling``: the non-private model trained centrally (``fedtail train``'s defaults, max-len 50), per seed, beside
a peer's SASRec on the same MovieLens-100K leave-one-out split.

Every federated and private number is built on this model, so its ceiling is
compared with an outside implementation: RecTools' SASRec (its defaults: one
item table for input and output, Xavier initialisation, Adam betas (0.9,
0.98), softmax over the whole catalogue, max-len 50) scored with this project's
metric code on the same split. RecTools is not a dependency: its numbers are
``PEER``, measured once. The long version also trains the earlier default,
separate input and output item tables, to show what tying them is worth.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

from common.data.datasets import DEFAULT_DATASET, load_dataset
from common.federation import RunSettings
from common.recommender.training import TrainConfig
from simulations.bench.core import ML_100K, Benchmark, Context
from simulations.centralized import train_centralized
from simulations.report import markdown_table

PEER = "RecTools SASRec"
PEER_NDCG10 = {0: 0.0826, 1: 0.0823, 2: 0.0780}
"""Test NDCG@10 per seed on MovieLens-100K, leave-one-out, max-len 50 (mean 0.0810)."""
SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class CeilingRun:
    dataset: str
    model: str
    """Which model and item tables: this project's with ``item-tables`` named, or the peer's."""
    seed: int
    ndcg10: float
    tail_ndcg10: float | None
    hr10: float | None
    best_epoch: int | None
    epochs_run: int | None
    seconds: float | None


def bench_ceiling(
    dataset: str, item_tables: tuple[str, ...], seeds: tuple[int, ...], out: Path, config: TrainConfig | None = None
) -> list[CeilingRun]:
    """``fedtail train DATASET`` with its defaults but ``item-tables``, once per seed; the peer's rows when the data
    is MovieLens-100K."""
    data = load_dataset(dataset)
    config = config or TrainConfig()
    name = Path(dataset).name
    runs = []
    for tables in item_tables:
        settings = replace(RunSettings(), item_tables=tables)
        for seed in seeds:
            started = time.perf_counter()
            report = train_centralized(
                data, out / f"ceiling-{name}-{tables}-seed{seed}", settings.model_options(), replace(config, seed=seed),
                item_tables=tables,
            )
            fit = report["run"]["fit"]
            runs.append(CeilingRun(
                name, f"fedtail, item-tables {tables}", seed, report["overall"]["ndcg@10"],
                report["groups"]["tail"]["ndcg@10"], report["overall"]["hr@10"], fit["best_epoch"],
                fit["epochs_run"], time.perf_counter() - started,
            ))
            print(f"  ceiling {name} item-tables {tables} seed {seed}: NDCG@10 {runs[-1].ndcg10:.4f}", flush=True)
    if Path(dataset) == ML_100K:
        runs += [CeilingRun(name, PEER, seed, PEER_NDCG10[seed], None, None, None, None, None) for seed in seeds]
    return runs


def run(context: Context) -> list[CeilingRun]:
    dataset = str(ML_100K) if ML_100K.exists() else DEFAULT_DATASET
    item_tables = (RunSettings.item_tables, "trained") if context.full else (RunSettings.item_tables,)
    return bench_ceiling(dataset, item_tables, SEEDS if context.full else SEEDS[:1], context.out)


def format_table(runs: list[CeilingRun]) -> str:
    def number(value: float | None, digits: str = ".4f") -> str:
        return "" if value is None else format(value, digits)

    rows = [[r.dataset, r.model, str(r.seed), number(r.ndcg10), number(r.tail_ndcg10), number(r.hr10),
             number(r.best_epoch, "d"), number(r.epochs_run, "d"), number(r.seconds, ".0f")] for r in runs]
    for dataset, model in dict.fromkeys((r.dataset, r.model) for r in runs):
        scores = [r.ndcg10 for r in runs if (r.dataset, r.model) == (dataset, model)]
        rows.append([dataset, f"**{model}, mean of {len(scores)}**", "", f"**{statistics.fmean(scores):.4f}**",
                     "", "", "", "", ""])
    return markdown_table(
        ["dataset", "model", "seed", "test NDCG@10", "tail NDCG@10", "HR@10", "best epoch", "epochs run",
         "wall s"], rows,
    )


BENCHMARK = Benchmark(
    name="ceiling",
    help="the non-private central model (fedtail train's defaults, max-len 50) per seed, beside RecTools' SASRec "
    "on MovieLens-100K (--full: 3 seeds, and separate item tables too)",
    description="`fedtail train` with its defaults (max-len 50, early stopping on validation NDCG@10) on "
    "MovieLens-100K leave-one-out when the data is present (else the synthetic default), test NDCG@10 per seed, "
    f"beside {PEER} (its defaults: shared item embeddings, Xavier initialisation, Adam betas (0.9, 0.98), "
    "max-len 50), scored with the same metric code on the same split. The quick version trains seed 0 only; "
    "`--full` trains seeds 0-2 and also the earlier default of separate input and output item tables.",
    result=CeilingRun,
    run=run,
    format_table=format_table,
)
