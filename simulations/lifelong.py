"""`fedtail simulate DATA --windows N --out DIR`: lifelong federated training over consecutive time windows.

The log is cut into N windows (``common.data.windows``). Three strategies are run on the same windows:

- continue (the lifelong feature): window 1 from scratch, window k from window k-1's released model (``init-model``)
  on window k's events only, with the catalogue grown by the items first seen in window k;
- retrain: at window k, a model from scratch on windows 1..k together, at the lifetime epsilon that continue has
  spent by then (its own ledgers: a counterfactual; what retraining every window would compose to is reported);
- never update: window 1's model, used for every later window (it cannot recommend items that entered later).

Every window of every strategy is a Flower run of its own (``simulations.simulate``), in its own run folder. The
continued windows' sites share one ledger folder (``DIR/ledgers``: the same users, the same budget), their node
config sets the lifetime cap (``max-epsilon``, the run's ``--epsilon``) and the per-window epsilon
(``window-epsilon``: the target at which the N windows compose to the cap, ``common.privacy.lifetime``).

Layout of DIR::

    data/window-k.csv, data/upto-k.csv, data/catalog-k.json   the windows, their union so far, catalogue version k
    continue/window-k/      the continued run of window k (global_model.pt, catalog.json, summary.json, ...)
    retrain/window-k/       the from-scratch run on windows 1..k (k >= 2; window 1 is continue's)
    ledgers/                the continued sites' ledgers across all windows
    audit/                  the audit of those ledgers, cross-checked with every continued window's rounds
    lifelong.json, lifelong.md, lifelong.svg   accuracy, forgetting, epsilon and time per window and strategy

Evaluation: window k's held-out events are the last event of each user with three or more events in window k
(the project's leave-one-out test split inside the window), ranked over the catalogue of window k. Forgetting at
window k: the mean over windows j < k of NDCG@10 on window j's held-out events with the model released at j minus
with the strategy's model at k, ranked over window j's catalogue (new rows masked). Retrain's model at k was
trained on windows 1..k, held-out events of earlier windows included, so its forgetting is not comparable (shown
for completeness).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from common.data.catalog import Catalog
from common.data.datasets import load_dataset
from common.data.split import EvaluationCases, evaluation_cases, item_popularity
from common.data.synthetic import SyntheticConfig
from common.data.windows import split_windows, write_window
from common.errors import ConfigError
from common.federation import RunSettings
from common.privacy.accounting import MechanismStep, epsilon_from_history
from common.privacy.ledger import Ledger
from common.privacy.lifetime import window_epsilon
from common.protocol.round_plan import steps_per_round
from common.recommender.artifacts import load_model
from common.recommender.continuation import grow_items
from common.recommender.evaluation import Scorer, evaluate, model_scorer, popularity_scorer
from common.recommender.training import pick_device
from common.run_files import LEDGER_DIR, read_run_record
from common.utils.files import atomic_write_text, write_json
from common.utils.plot import Panel, Series, write_line_charts
from common.utils.progress import log
from simulations.audit import audit
from simulations.audit.report import write_audit
from simulations.report import markdown_table
from simulations.simulate import Resources, simulate

STRATEGIES = ("continue", "retrain", "never")
DRIFTING_SYNTHETIC = "synthetic:drift=1.0,new_items=0.3"
"""What `fedtail simulate --windows N` runs on when no dataset is named (docs/lifelong.md)."""
SUMMARY_JSON, SUMMARY_MD, SUMMARY_SVG = "lifelong.json", "lifelong.md", "lifelong.svg"


@dataclass(frozen=True)
class WindowData:
    number: int
    events: Path
    so_far: Path
    catalog: Path


@dataclass(frozen=True)
class RunResult:
    """One Flower run of one strategy at one window."""

    folder: Path
    seconds: float
    training_seconds: float
    ledgers: Path
    """The folder of the ledgers its sites wrote (continued windows share one)."""


def run_lifelong(
    settings: RunSettings, resources: Resources, windows: int, out: Path, strategies: tuple[str, ...] = STRATEGIES
) -> dict[str, Any]:
    """Cut, train every strategy on every window, evaluate, audit, and write the summary; returns it."""
    unknown = sorted(set(strategies) - set(STRATEGIES))
    if unknown or "continue" not in strategies:
        raise ConfigError(f"strategies {list(strategies)}: use 'continue' plus any of {', '.join(STRATEGIES[1:])}")
    if settings.init_model:
        raise ConfigError("--init-from with --windows: a lifelong run starts window 1 from scratch")
    settings = replace(settings, dataset=drifting_dataset(settings.dataset))
    out = out.resolve()
    data = write_windows(settings, resources.sites, windows, out / "data")
    base = replace(settings, partitioning="column", kcore=0)
    target = settings.epsilon
    site_config: dict[str, Any] = {"ledger-dir": str(out / LEDGER_DIR)}
    if settings.dp:
        steps = steps_per_round(settings.noise, settings.local_epochs, settings.sample_rate) * settings.rounds
        target = window_epsilon(settings.epsilon, windows, settings.delta, settings.sample_rate, steps)
        site_config.update({"max-epsilon": settings.epsilon, "window-epsilon": target})
        log(f"fedtail: lifetime epsilon {settings.epsilon:g} over {windows} windows: {target:.3f} per window")
    runs: dict[tuple[str, int], RunResult] = {}
    for window in data:
        previous = "" if window.number == 1 else str(runs[("continue", window.number - 1)].folder)
        run_settings = replace(
            base, dataset=str(window.events), catalog_path=str(window.catalog), init_model=previous, epsilon=target,
            out_dir=str(out / "continue" / f"window-{window.number}"),
        )
        log(f"fedtail: window {window.number}/{windows}: continue")
        runs[("continue", window.number)] = _timed_run(run_settings, resources, site_config, out / LEDGER_DIR)
    spent = continue_epsilons(runs, windows, settings.delta) if settings.dp else None
    if "retrain" in strategies:
        runs[("retrain", 1)] = runs[("continue", 1)]
        for window in data[1:]:
            run_settings = replace(
                base, dataset=str(window.so_far), catalog_path=str(window.catalog),
                epsilon=spent["lifetime"][window.number - 1] if spent else settings.epsilon,
                out_dir=str(out / "retrain" / f"window-{window.number}"),
            )
            log(f"fedtail: window {window.number}/{windows}: retrain from scratch on windows 1..{window.number}")
            retrain_folder = Path(run_settings.out_dir)
            runs[("retrain", window.number)] = _timed_run(run_settings, resources, None, retrain_folder / LEDGER_DIR)
    if "never" in strategies:
        for window in data:
            runs[("never", window.number)] = runs[("continue", 1)]
    summary = evaluate_strategies(data, runs, strategies, settings)
    summary["epsilon"] = spent
    summary["epsilon_per_strategy"] = strategy_epsilons(runs, windows, strategies, spent, settings.delta)
    summary["settings"] = {**settings.to_run_config(), "windows": windows, "sites": resources.sites,
                           "window_epsilon": target if settings.dp else None}
    if settings.dp:
        report = audit(sorted((out / LEDGER_DIR).glob("site-*.jsonl")),
                       [runs[("continue", w.number)].folder for w in data])
        write_audit(report, out / "audit")
        summary["audit"] = {"passed": report.passed, "epsilon": report.epsilon, "folder": str(out / "audit")}
    write_summary(out, summary)
    return summary


def drifting_dataset(spec: str) -> str:
    """The built-in data with a shared clock: plain ``synthetic`` becomes ``DRIFTING_SYNTHETIC``; a synthetic spec
    without drift is refused (its clock is each user's own step count, so no cut is a point in time)."""
    kind, _, options = spec.partition(":")
    if kind != "synthetic":
        return spec
    config = SyntheticConfig.parse(options)
    if config.drift > 0 or config.new_items > 0:
        return spec
    if not options:
        log(f"fedtail: time windows on the built-in data: {DRIFTING_SYNTHETIC} (drift and items entering over time)")
        return DRIFTING_SYNTHETIC
    raise ConfigError(
        f"dataset '{spec}': the synthetic data without drift has no shared clock (each user's own step count); add "
        "drift=1.0,new_items=0.3 (or either) to cut it into time windows"
    )


def write_windows(settings: RunSettings, sites: int, windows: int, folder: Path) -> list[WindowData]:
    """The windows as files: each window's events, the union so far (for retraining), catalogue version k."""
    dataset = load_dataset(settings.dataset, kcore=settings.kcore)
    parts = split_windows(dataset.frame, windows, sites, settings.seed, settings.dataset)
    out: list[WindowData] = []
    for part in parts:
        number = part.number
        events = write_window(part.frame, folder / f"window-{number}.csv")
        so_far = write_window(pd.concat([p.frame for p in parts[:number]]), folder / f"upto-{number}.csv")
        catalog = folder / f"catalog-{number}.json"
        part.catalog.save(catalog)
        log(
            f"fedtail: window {number}: {len(part.frame)} events, {part.frame['user'].nunique()} users, catalogue "
            f"version {part.catalog.version} ({part.catalog.num_items} items)"
        )
        out.append(WindowData(number, events, so_far, catalog))
    return out


def _timed_run(
    settings: RunSettings, resources: Resources, site_config: dict[str, Any] | None, ledgers: Path
) -> RunResult:
    started = time.perf_counter()
    summary = simulate(settings, resources, site_config)
    seconds = time.perf_counter() - started
    return RunResult(Path(settings.out_dir), seconds, float(sum(summary["run"]["seconds_per_round"])), ledgers)


def _run_id(folder: Path) -> str:
    record = read_run_record(folder)
    return "" if record is None else record.run_id


def _site_histories(runs: list[RunResult]) -> dict[str, list[MechanismStep]]:
    """Each site's DP-SGD calls in ``runs``, in order: the lines of each run's ledgers that name that run."""
    histories: dict[str, list[MechanismStep]] = {}
    for run in runs:
        run_id = _run_id(run.folder)
        for path in sorted(run.ledgers.glob("site-*.jsonl")):
            histories.setdefault(path.name, []).extend(
                (e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in Ledger(path).entries()
                if e["run_id"] == run_id
            )
    return histories


def composed_epsilon(runs: list[RunResult], delta: float) -> float:
    """What ``runs`` together cost the site that spent most: each site's calls composed, the max over sites."""
    return max((epsilon_from_history(h, delta) for h in _site_histories(runs).values()), default=0.0)


def continue_epsilons(runs: dict[tuple[str, int], RunResult], windows: int, delta: float) -> dict[str, list[float]]:
    """From the shared ledgers: each window's own spend and the lifetime total after it (max over sites)."""
    continued = [runs[("continue", k)] for k in range(1, windows + 1)]
    return {
        "window": [composed_epsilon([run], delta) for run in continued],
        "lifetime": [composed_epsilon(continued[:k], delta) for k in range(1, windows + 1)],
    }


def strategy_epsilons(
    runs: dict[tuple[str, int], RunResult], windows: int, strategies: tuple[str, ...],
    spent: dict[str, list[float]] | None, delta: float,
) -> dict[str, list[float | None]]:
    """Epsilon behind each strategy's model at each window; retraining every window composes all its runs."""
    if spent is None:
        return {s: [None] * windows for s in strategies}
    result: dict[str, list[float | None]] = {"continue": list(spent["lifetime"])}
    if "never" in strategies:
        result["never"] = [spent["lifetime"][0]] * windows
    if "retrain" in strategies:
        retrained = [runs[("retrain", k)] for k in range(1, windows + 1)]
        result["retrain"] = [composed_epsilon([run], delta) for run in retrained]
        result["retrain_every_window"] = [composed_epsilon(retrained[:k], delta) for k in range(1, windows + 1)]
    return result


def _window_cases(window: WindowData, max_len: int) -> tuple[Catalog, EvaluationCases, Any, int]:
    catalog = Catalog.load(window.catalog)
    dataset, _ = load_dataset(str(window.events)).restricted_to(catalog)
    _, sequences = dataset.sequences(catalog)
    return catalog, evaluation_cases(sequences, "test", max_len), item_popularity(sequences, catalog.num_items), len(
        sequences
    )


def restricted_scorer(folder: Path, catalog: Catalog, device: torch.device) -> Scorer:
    """The released model in ``folder`` scoring over exactly ``catalog``'s items.

    A later model (a larger catalogue) has its newer rows masked out; an earlier one (never update) is grown with
    the default rows for inputs it never saw, and cannot recommend them: their scores are -inf.
    """
    model, own = load_model(folder, device=device)
    older, newer = (own, catalog) if catalog.num_items >= own.num_items else (catalog, own)
    newer.check_extends(older, f"scoring with {folder}")
    known = own.num_items
    if catalog.num_items > known:
        model = grow_items(model, catalog.num_items, None, seed=0).to(device).eval()
    base = model_scorer(model, device)
    width = catalog.num_items + 1

    def score(inputs: torch.Tensor) -> torch.Tensor:
        scores = base(inputs)[:, :width].clone()
        scores[:, known + 1 :] = float("-inf")
        return scores

    return score


def evaluate_strategies(
    data: list[WindowData], runs: dict[tuple[str, int], RunResult], strategies: tuple[str, ...], settings: RunSettings
) -> dict[str, Any]:
    """Accuracy on each window's held-out events and forgetting, per strategy; time per strategy."""
    device = pick_device()
    cases = [_window_cases(window, settings.max_len) for window in data]
    ndcg: dict[tuple[str, int, int], float] = {}  # (strategy, model window, evaluated window)
    windows_out: list[dict[str, Any]] = []
    for window in data:
        k = window.number
        entry: dict[str, Any] = {"window": k, "held_out_users": len(cases[k - 1][1]), "strategies": {}}
        for strategy in strategies:
            folder = runs[(strategy, k)].folder
            for j in range(1, k + 1):
                catalog, held_out, popularity, users = cases[j - 1]
                report = evaluate(restricted_scorer(folder, catalog, device), held_out, popularity, users)
                ndcg[(strategy, k, j)] = report["overall"]["ndcg@10"]
                if j == k:
                    entry["strategies"][strategy] = {"new_window": report}
            forgetting = [ndcg[(strategy, j, j)] - ndcg[(strategy, k, j)] for j in range(1, k)]
            entry["strategies"][strategy]["forgetting"] = sum(forgetting) / len(forgetting) if forgetting else None
            entry["strategies"][strategy]["seconds"] = _strategy_seconds(runs, strategy, k)
        _, held_out, popularity, users = cases[k - 1]
        entry["most_popular"] = evaluate(popularity_scorer(popularity), held_out, popularity, users)
        windows_out.append(entry)
    return {"windows": windows_out}


def _strategy_seconds(runs: dict[tuple[str, int], RunResult], strategy: str, k: int) -> dict[str, float]:
    """This window's run (0 when nothing was trained for it) and everything the strategy ran up to it."""
    own = runs[(strategy, k)]
    trained_now = strategy == "continue" or (strategy == "retrain" and k > 1) or k == 1
    distinct = {runs[(strategy, j)].folder: runs[(strategy, j)] for j in range(1, k + 1)}
    return {
        "window_wall": own.seconds if trained_now else 0.0,
        "window_training": own.training_seconds if trained_now else 0.0,
        "total_wall": sum(r.seconds for r in distinct.values()),
        "total_training": sum(r.training_seconds for r in distinct.values()),
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The strategies side by side per window (Markdown)."""
    epsilons = summary["epsilon_per_strategy"]
    header = ["window", "strategy", "NDCG@10", "tail", "torso", "head", "HR@10", "forgetting", "epsilon",
              "train s (total)", "wall s (total)"]
    rows = []
    for entry in summary["windows"]:
        k = entry["window"]
        for strategy, result in entry["strategies"].items():
            report = result["new_window"]
            groups = report["groups"]
            eps = epsilons.get(strategy, [None] * k)[k - 1]
            forgetting = result["forgetting"]
            seconds = result["seconds"]
            rows.append([
                str(k), strategy, f"{report['overall']['ndcg@10']:.4f}",
                *(f"{groups[g]['ndcg@10']:.4f}" for g in ("tail", "torso", "head")),
                f"{report['overall']['hr@10']:.4f}",
                "" if forgetting is None else f"{forgetting:+.4f}",
                "non-private" if eps is None else f"{eps:.3f}",
                f"{seconds['total_training']:.0f}", f"{seconds['total_wall']:.0f}",
            ])
        reference = entry["most_popular"]
        rows.append([
            str(k), "most-popular (reference)", f"{reference['overall']['ndcg@10']:.4f}",
            *(f"{reference['groups'][g]['ndcg@10']:.4f}" for g in ("tail", "torso", "head")),
            f"{reference['overall']['hr@10']:.4f}", "", "not private", "", "",
        ])
    lines = [markdown_table(header, rows)]
    if "retrain_every_window" in epsilons and epsilons["retrain_every_window"][0] is not None:
        lines.append(
            "\nretraining from scratch every window composes all its runs: epsilon "
            + ", ".join(f"{e:.3f}" for e in epsilons["retrain_every_window"] if e is not None)
            + " after windows 1.." + str(len(epsilons["retrain_every_window"]))
        )
    if summary.get("audit"):
        audit_result = summary["audit"]
        lines.append(f"\naudit of the continued windows' ledgers: {'passed' if audit_result['passed'] else 'FAILED'}"
                     f", epsilon {audit_result['epsilon']:.3f} ({audit_result['folder']})")
    lines.append(
        "\nNDCG@10 etc.: window k's held-out events with the strategy's model at k; forgetting: mean over earlier "
        "windows j of NDCG@10 with the model released at j minus with the model at k (positive: forgot); epsilon: "
        "what the model at k has cost each site (max over sites); seconds: the strategy's runs up to k; most-popular: "
        "window k's training-history counts, a non-private reference as in every accuracy table."
    )
    return "\n".join(lines)


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    write_json(out / SUMMARY_JSON, summary)
    atomic_write_text(out / SUMMARY_MD, "# Lifelong run\n\n" + format_summary(summary) + "\n")
    strategies = list(summary["windows"][0]["strategies"])
    windows = [entry["window"] for entry in summary["windows"]]
    accuracy = Panel("NDCG@10 on the new window", "window", [
        Series(s, windows, [e["strategies"][s]["new_window"]["overall"]["ndcg@10"] for e in summary["windows"]])
        for s in strategies
    ])
    forgetting = Panel("forgetting (NDCG@10 lost)", "window", [
        Series(s, windows[1:], [max(e["strategies"][s]["forgetting"], 0.0) for e in summary["windows"][1:]])
        for s in strategies if s != "retrain"
    ])
    write_line_charts(out / SUMMARY_SVG, [accuracy, forgetting])
