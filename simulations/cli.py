"""The ``fedtail`` command: a thin dispatcher over the project's plain functions.

It sits above everything it dispatches to (see DESIGN.md, "Layout"), turns
``FedtailError`` into one clear line on stderr and a non-zero exit, and keeps
stdout for results. ``fedtail serve`` and ``fedtail deploy`` declare their options in ``cli_serve`` and
``cli_deploy``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import fields
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from common.data.datasets import DEFAULT_DATASET, Dataset, load_dataset
from common.data.readers import FORMATS, ColumnNames
from common.errors import ConfigError, FedtailError
from common.federation import RunSettings
from common.recipe import (
    DEFAULT_PASSES,
    FILLS,
    ONE_NOISE_PLACEMENTS,
    PublicFacts,
    Recipe,
    choose_recipe,
    simulated_estimate,
)
from common.recommender.content import metadata_beside
from common.recommender.training import TrainConfig, pick_device
from common.utils.files import write_json
from common.utils.progress import log
from simulations.audit import audit
from simulations.audit.report import format_markdown, write_audit
from simulations.bench import suite as bench_suite
from simulations.canary import CanaryConfig, format_empirical, run_empirical_audit
from simulations.centralized import evaluate_saved, train_centralized
from simulations.cli_deploy import add_deploy_commands
from simulations.cli_serve import add_serve_arguments
from simulations.deployment import deal_to_sites
from simulations.engagement import add_engagement_arguments
from simulations.lifelong import STRATEGIES, run_lifelong
from simulations.lifelong import format_summary as format_lifelong
from simulations.report import format_federated_summary, format_metrics_table
from simulations.simulate import Resources, simulate

EXIT_USER_ERROR = 2
EXIT_AUDIT_FAILED = 1

DATASET_HELP = (
    "'synthetic' (built-in default), 'synthetic:users=5000,items=3000,seed=7', a file or MovieLens folder "
    "(format detected), or FORMAT:PATH with FORMAT one of: " + ", ".join(FORMATS)
)


def _add_dataset_arguments(parser: argparse._ActionsContainer, optional: bool) -> None:
    if optional:
        parser.add_argument("dataset", nargs="?", default=DEFAULT_DATASET, help=DATASET_HELP)
    else:
        parser.add_argument("dataset", help=DATASET_HELP)
    _add_data_options(parser)


def _add_data_options(parser: argparse._ActionsContainer) -> None:
    parser.add_argument("--kcore", type=int, default=0, help="keep only users and items with at least K interactions")
    for role in ("user", "item", "time", "site"):
        parser.add_argument(f"--{role}-col", default=None, help=f"{role} column of a CSV/TSV/Parquet file")


def _load(args: argparse.Namespace) -> Any:
    columns = ColumnNames(args.user_col, args.item_col, args.time_col, args.site_col)
    return load_dataset(args.dataset, columns, args.kcore)


def _data_stats(args: argparse.Namespace) -> int:
    stats = _load(args).stats().as_dict()
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    print(f"dataset            {args.dataset}")
    for key in ("users", "items", "interactions", "duplicates_dropped", "kcore_removed_interactions"):
        print(f"{key:<28}{stats[key]}")
    print(f"{'history length':<28}" + "  ".join(f"{k}={v:g}" for k, v in stats["history_length_quantiles"].items()))
    print(f"{'top-20% item share':<28}{stats['top20_item_share']:.3f}")
    return 0


def _data_sites(args: argparse.Namespace) -> int:
    sites = [site.strip() for site in args.sites.split(",") if site.strip()]
    if len(set(sites)) != len(sites) or not sites:
        raise ConfigError(f"--sites {args.sites!r}: name each site once, separated by commas")
    _check_out_folder(args.out)
    for site, path in deal_to_sites(_load(args).frame, sites, Path(args.out)).items():
        print(f"wrote {path} (site {site})")
    return 0


def _check_out_folder(out: str) -> None:
    """``--out`` names a folder: a file there (or above it) is a one-line error now, not a traceback later."""
    path = Path(out)
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"--out {out}: {existing} is a file, not a folder")


def _train(args: argparse.Namespace) -> int:
    _check_out_folder(args.out)
    # Checked as a run's are; a setting a noise placement's recipe fills is absent unless given (its declared default)
    settings = RunSettings(**{name: value for name, value in vars(args).items() if name in MODEL_SETTINGS})
    config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        patience=args.patience,
        eval_every=args.eval_every,
        loss=args.loss,
        seed=args.seed,
    )
    item_text = Path(args.item_text) if getattr(args, "item_text", "") else None
    report = train_centralized(
        _load(args), Path(args.out), settings.model_options(), config, pick_device(args.device), item_text,
        settings.item_tables,
    )
    print(format_metrics_table(report, title=f"test split, {args.dataset}"))
    print(f"\nwrote {args.out}/model.pt, catalog.json, metrics.json ({report['run']['fit']['seconds']:.0f}s training)")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    report = evaluate_saved(Path(args.model_dir), _load(args), pick_device(args.device))
    if args.out:
        write_json(Path(args.out), report)
    print(format_metrics_table(report, title=f"test split, {args.dataset}"))
    return 0


MODEL_SETTINGS = ("max_len", "hidden", "heads", "blocks", "dropout", "loss", "item_text", "item_tables")
"""The run settings that describe the model, which centralized training takes too."""


def _add_run_settings(parser: argparse._ActionsContainer, names: tuple[str, ...] = ()) -> None:
    """An option for each run setting (or only ``names``), from its one declaration in ``RunSettings``."""
    for declared in fields(RunSettings):
        meta = declared.metadata
        if not meta["cli"] or (names and declared.name not in names):
            continue
        flag = "--" + (meta["flag"] or declared.name.replace("_", "-"))
        if declared.type == "bool":  # a flag that turns the default off (--no-dp)
            parser.add_argument(flag, dest=declared.name, action="store_false", help=meta["help"])
            continue
        kind = {"int": int, "float": float, "str": str}[str(declared.type)]
        filled = declared.name in FILLS or declared.name == "item_text"
        parser.add_argument(
            flag, dest=declared.name, type=kind, choices=meta["choices"] or None,
            # filled in by _run_settings when not given (the recipe rule, the data's own metadata): argparse must
            # not fill it first
            default=argparse.SUPPRESS if filled else declared.default,
            metavar=None if meta["choices"] else flag[2:].upper().replace("-", "_"),
            help=f"{meta['help']} (default: {FILLED[declared.name]})" if declared.name in FILLED
            else f"{meta['help']} (default: {declared.default}; noise=central or distributed: the recipe rule's "
                 "choice, printed at the start)" if filled else meta["help"],
        )


FILLED = {"item_text": "the item metadata beside the data when there is some: a MovieLens folder's titles (with "
                       "the sentence encoder installed) or an *item2attributes.json; '' for random"}
"""Run settings whose default is found in the data rather than declared."""


def _run_settings(args: argparse.Namespace, dataset: str, out: str) -> RunSettings:
    if args.user_col or args.item_col or args.time_col or args.site_col:
        raise ConfigError("federated runs read files with detected columns only; name columns the detector knows")
    _check_out_folder(out)
    data = load_dataset(dataset, kcore=args.kcore)  # fail here, with a clear message, rather than inside Flower
    chosen = {f.name: getattr(args, f.name) for f in fields(RunSettings) if f.metadata["cli"] and f.name in args}
    if "item_text" not in chosen:
        found = metadata_beside(Path(dataset.partition(":")[2] if ":" in dataset else dataset))
        if found is not None:
            log(f"fedtail: item metadata beside the data: {found} (--item-text '' trains items from random)")
        chosen["item_text"] = str(found or "")
    if chosen.get("noise", RunSettings.noise) in ONE_NOISE_PLACEMENTS:
        chosen = {**one_noise_recipe(args, data, chosen).settings(), **chosen}  # given on the line wins
    chosen["item_text"] = str(Path(chosen["item_text"]).resolve()) if chosen["item_text"] else ""
    chosen["init_model"] = str(Path(args.init_model).resolve()) if args.init_model else ""
    return RunSettings(**chosen, dataset=dataset, kcore=args.kcore, out_dir=out)


def one_noise_recipe(args: argparse.Namespace, data: Dataset, chosen: dict[str, Any]) -> Recipe:
    """The recipe rule's choice for this run (``common.recipe``), printed with its reasons."""
    estimate = args.users_estimate or simulated_estimate(data)
    facts = PublicFacts(estimate, data.stats().items, args.sites, chosen.get("epsilon", RunSettings.epsilon),
                        chosen.get("delta", RunSettings.delta), args.compute_passes)
    recipe = choose_recipe(facts)
    source = "--users-estimate" if args.users_estimate else "the data's users with training pairs, rounded"
    given = [f"--{name.replace('_', '-')}" for name in FILLS if name in chosen]
    log(f"fedtail: recipe ({source}): {recipe.why}" + (f"; given on the command line: {', '.join(given)}"
                                                       if given else ""))
    return recipe


def _resources(args: argparse.Namespace) -> Resources:
    gpus = args.gpus_per_site if args.gpus_per_site is not None else (0.5 if torch.cuda.is_available() else 0.0)
    return Resources(args.sites, args.cpus_per_site, gpus)


def _simulate(args: argparse.Namespace) -> int:
    settings = _run_settings(args, args.dataset, args.out)
    if args.windows:
        strategies = tuple(args.strategies.split(","))
        summary = run_lifelong(settings, _resources(args), args.windows, Path(args.out), strategies)
        print(format_lifelong(summary))
        print(f"\nwrote {args.out}/lifelong.json, lifelong.md, lifelong.svg, a run folder per window and strategy")
        return 0
    started = time.perf_counter()
    summary = simulate(settings, _resources(args))
    title = f"test split, {args.dataset}, {args.sites} sites, {settings.rounds} rounds"
    print(format_federated_summary(summary, title=title))
    seconds = time.perf_counter() - started
    print(f"\nwrote {args.out}/global_model.pt, summary.json, rounds.jsonl, ledgers/ ({seconds:.0f}s)")
    return 0


def _audit(args: argparse.Namespace) -> int:
    if args.empirical:
        return _empirical_audit(args)
    if not args.paths:
        raise ConfigError("name a run folder or a site ledger to audit (or use --empirical)")
    paths = [Path(p) for p in args.paths]
    if args.out is None and len(paths) > 1:
        raise ConfigError("several paths are composed into one audit: name its folder with --out")
    out = Path(args.out) if args.out else (paths[0] if paths[0].is_dir() else paths[0].parent)
    report = audit(paths, args.coordinator)
    written = write_audit(report, out)
    print(format_markdown(report).split("\n## Assumptions")[0].rstrip())
    print(f"\nwrote {', '.join(str(p) for p in written)}")
    if not report.passed:
        print("fedtail: AUDIT FAILED (see the findings above)", file=sys.stderr)
        return EXIT_AUDIT_FAILED
    return 0


def _empirical_audit(args: argparse.Namespace) -> int:
    if len(args.paths) > 1 or args.out is None:
        raise ConfigError("usage: fedtail audit --empirical [DATASET] --out DIR [federation options]")
    settings = _run_settings(args, args.paths[0] if args.paths else DEFAULT_DATASET, args.out)
    config = CanaryConfig(canaries=args.canaries, length=args.canary_length)
    report = run_empirical_audit(settings, _resources(args), config)
    print(format_empirical(report))
    print(f"wrote {args.out}/empirical-audit.json, empirical-audit.md, run/ (with the ledger audit)")
    return EXIT_AUDIT_FAILED if report["verdict"].startswith("PRIVACY BUG") else 0


def _add_federation_arguments(parser: argparse._ActionsContainer) -> None:
    parser.add_argument("--sites", type=int, default=5, help="number of simulated sites")
    parser.add_argument("--cpus-per-site", type=int, default=Resources(1).cpus_per_site,
                        help="CPU cores reserved per simulated site (how many train at once)")
    parser.add_argument("--gpus-per-site", type=float, default=None,
                        help="GPU share per site (default: 0.5 when CUDA is present, else 0)")
    _add_recipe_facts(parser, estimate_default="0: the data's users with training pairs, rounded to 2 digits")
    _add_run_settings(parser)


def _add_recipe_facts(parser: argparse._ActionsContainer, estimate_default: str) -> None:
    """The recipe rule's own facts (``common.recipe``), for ``simulate`` and ``recipe``."""
    parser.add_argument("--users-estimate", type=int, default=0,
                        help="noise=central or distributed: a public estimate of the federation's users, which the "
                             f"recipe rule sizes its rounds and batch from ({estimate_default}); never a site's "
                             "exact count")
    parser.add_argument("--compute-passes", type=float, default=DEFAULT_PASSES,
                        help="noise=central or distributed: the compute budget, expected gradient computations per "
                             "user over the run (rounds x sample rate); the recipe rule spreads it over its rounds")


def _recipe(args: argparse.Namespace) -> int:
    recipe = choose_recipe(PublicFacts(args.users_estimate, args.items, args.sites, args.epsilon, args.delta,
                                       args.compute_passes))
    print(recipe.why)
    values = " ".join(f"{name.replace('_', '-')}={json.dumps(value)}" for name, value in recipe.settings().items())
    print(f"\nrun config (flwr run --run-config): {values}")
    return 0


DESCRIPTION = (
    "fedtail: federated, privacy-preserving sequential recommendation. Sites keep their users' histories at home "
    "and train one SASRec recommender together with differential privacy (Opacus DP-SGD on Flower); each site's "
    "privacy budget is kept and audited on its own disk, and the global model serves long-tail users too. "
    "Simulate a federation on one machine, deploy a site, audit what was spent, serve recommendations."
)


class _Parser(argparse.ArgumentParser):
    """Every fedtail command's parser (subcommands inherit it): help shows each option's default."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(**kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedtail", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"fedtail {version('fedtail')}")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="inspect interaction data")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    stats = data_commands.add_parser("stats", help="users, items, history lengths, popularity concentration")
    _add_dataset_arguments(stats, optional=True)
    stats.add_argument("--json", action="store_true", help="machine-readable output")
    stats.set_defaults(handler=_data_stats)
    sites = data_commands.add_parser(
        "sites", help="deal a dataset's users to named sites, one CSV each: data to try a deployment with"
    )
    _add_dataset_arguments(sites, optional=True)
    sites.add_argument("--sites", required=True, help="site names, comma-separated (north,south)")
    sites.add_argument("--out", required=True, help="folder for SITE.csv per site")
    sites.set_defaults(handler=_data_sites)

    train = commands.add_parser("train", help="train SASRec centrally (non-private ceiling)")
    _add_dataset_arguments(train, optional=True)
    train.add_argument("--out", required=True, help="folder for model.pt, catalog.json, metrics.json")
    _add_run_settings(train, MODEL_SETTINGS)
    defaults_train = TrainConfig()
    train.add_argument("--epochs", type=int, default=defaults_train.epochs, help="at most this many (early stopping)")
    train.add_argument("--batch-size", type=int, default=defaults_train.batch_size, help="users per step")
    train.add_argument("--lr", type=float, default=defaults_train.learning_rate, help="Adam learning rate")
    train.add_argument("--weight-decay", type=float, default=defaults_train.weight_decay, help="Adam weight decay")
    train.add_argument("--patience", type=int, default=defaults_train.patience,
                       help="stop after this many evaluations without a better validation NDCG@10")
    train.add_argument("--eval-every", type=int, default=defaults_train.eval_every,
                       help="evaluate on the validation split every this many epochs")
    train.add_argument("--seed", type=int, default=defaults_train.seed, help="seed of the model and the batches")
    train.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA when present)")
    train.set_defaults(handler=_train)

    simulate = commands.add_parser(
        "simulate", help="federated DP training of N simulated sites on Flower's Simulation Engine"
    )
    _add_dataset_arguments(simulate, optional=True)
    simulate.add_argument("--out", required=True, help="run folder; an existing one is resumed from its checkpoint")
    _add_federation_arguments(simulate)
    simulate.add_argument("--windows", type=int, default=0,
                          help="lifelong: cut the timestamped log into N time windows and train them in sequence, "
                               "each from the last one's model (--epsilon is then each site's lifetime cap); "
                               "0: one run")
    simulate.add_argument("--strategies", default=",".join(STRATEGIES),
                          help="with --windows: continue plus the baselines to run beside it (retrain, never)")
    simulate.set_defaults(handler=_simulate)

    evaluate = commands.add_parser("evaluate", help="evaluate a saved model on a dataset's test split")
    evaluate.add_argument("model_dir", help="a trained model folder (model.pt) or a finished federated run folder "
                          "(global_model.pt), with its catalog.json")
    _add_dataset_arguments(evaluate, optional=False)
    evaluate.add_argument("--out", default=None, help="write the metrics JSON here")
    evaluate.add_argument("--device", default=None, help="cpu, cuda (default: CUDA when present)")
    evaluate.set_defaults(handler=_evaluate)

    recipe = commands.add_parser(
        "recipe", help="the recipe rule's rounds, sample rate, batch and learning rate for a one-noise run "
        "(noise central or distributed) from public facts, as run-config values for a deployment"
    )
    _add_recipe_facts(recipe, estimate_default="required")
    recipe.add_argument("--items", type=int, default=0, help="items in the public catalogue (reported)")
    recipe.add_argument("--sites", type=int, default=5, help="sites in the federation (reported)")
    recipe.add_argument("--epsilon", type=float, default=RunSettings.epsilon, help="each site's target epsilon")
    recipe.add_argument("--delta", type=float, default=RunSettings.delta, help="the delta it is stated at")
    recipe.set_defaults(handler=_recipe)

    engagement = commands.add_parser(
        "engagement", help="beyond one accurate item: the diversity trade-off curve, augmentation of short histories, "
        "and a multi-step replay, per user group"
    )
    add_engagement_arguments(engagement)

    serve = commands.add_parser("serve", help="HTTP recommendation service over a run folder's model")
    add_serve_arguments(serve)

    audit_parser = commands.add_parser(
        "audit", help="recompute every site's epsilon from the ledgers, cross-checked with the coordinator's record; "
        "exit 1 if a ledger is broken, rewritten, cut off or understated",
        usage="%(prog)s PATH [PATH ...] [--coordinator RECORD] [--out DIR]\n"
        "       %(prog)s --empirical [DATASET] --out DIR [options for --empirical only]",
    )
    audit_parser.add_argument("paths", nargs="*", metavar="PATH",
                              help="run folder(s) or site ledger file(s), composed per site; with --empirical: "
                              "the DATASET to plant canaries in (default: synthetic)")
    audit_parser.add_argument("--coordinator", action="append", default=[], metavar="RECORD",
                              help="the coordinator's run folder or rounds.jsonl of a run the ledgers took part in "
                              "(repeat per run): its recorded ledger heads catch a rewritten or cut-off ledger")
    audit_parser.add_argument("--out", default=None,
                              help="where audit.json / audit.md go (default: the run folder, or the ledger's folder)")
    audit_parser.add_argument("--empirical", action="store_true",
                              help="plant canary users, train through Flower, and bound epsilon from below")
    empirical = audit_parser.add_argument_group(
        "options for --empirical only", "the canaries, and the federation that trains on them through Flower"
    )
    empirical.add_argument("--canaries", type=int, default=CanaryConfig().canaries, help="canary users to plant")
    empirical.add_argument("--canary-length", type=int, default=CanaryConfig().length, help="items per canary user")
    _add_data_options(empirical)
    _add_federation_arguments(empirical)
    audit_parser.set_defaults(handler=_audit)

    deploy = commands.add_parser(
        "deploy", help="set up a real federation: certificates, site keys, site check, app bundle hashes"
    )
    add_deploy_commands(deploy)

    bench = commands.add_parser("bench", add_help=False,
                                help="the benchmark suite (same as python -m simulations.bench)")
    bench_suite.add_arguments(bench)
    bench.set_defaults(handler=bench_suite.run_arguments)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    # `kill` (SIGTERM) stops a command like Ctrl-C does, so that what it started (a SuperLink, Ray) is stopped too.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    args = build_parser().parse_args(arguments)
    try:
        return int(args.handler(args))
    except FedtailError as error:
        print(f"fedtail: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("fedtail: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (e.g. `| head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
