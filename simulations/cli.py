"""The ``fedtail`` command: a thin dispatcher over the project's plain functions.

It sits above everything it dispatches to (see DESIGN.md, "Layout"), turns
``FedtailError`` into one clear line on stderr and a non-zero exit, and keeps
stdout for results.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.datasets import DEFAULT_DATASET, load_dataset
from common.errors import FedtailError
from common.files import write_json
from common.readers import FORMATS, ColumnNames
from common.training import TrainConfig, pick_device
from simulations.centralized import ModelOptions, evaluate_saved, train_centralized
from simulations.report import format_metrics_table

EXIT_USER_ERROR = 2

DATASET_HELP = (
    "'synthetic' (built-in default), 'synthetic:users=5000,items=3000,seed=7', a file or MovieLens folder "
    "(format detected), or FORMAT:PATH with FORMAT one of: " + ", ".join(FORMATS)
)


def _add_dataset_arguments(parser: argparse.ArgumentParser, optional: bool) -> None:
    if optional:
        parser.add_argument("dataset", nargs="?", default=DEFAULT_DATASET, help=DATASET_HELP)
    else:
        parser.add_argument("dataset", help=DATASET_HELP)
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


def _train(args: argparse.Namespace) -> int:
    options = ModelOptions(args.max_len, args.hidden, args.heads, args.blocks, args.dropout)
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
    report = train_centralized(_load(args), Path(args.out), options, config, pick_device(args.device))
    print(format_metrics_table(report, title=f"test split, {args.dataset}"))
    print(f"\nwrote {args.out}/model.pt, catalog.json, metrics.json ({report['run']['fit']['seconds']:.0f}s training)")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    report = evaluate_saved(Path(args.model_dir), _load(args), pick_device(args.device))
    if args.out:
        write_json(Path(args.out), report)
    print(format_metrics_table(report, title=f"test split, {args.dataset}"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtail", description=__doc__.splitlines()[0] if __doc__ else None)
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="inspect interaction data").add_subparsers(dest="data_command", required=True)
    stats = data.add_parser("stats", help="users, items, history lengths, popularity concentration")
    _add_dataset_arguments(stats, optional=True)
    stats.add_argument("--json", action="store_true", help="machine-readable output")
    stats.set_defaults(handler=_data_stats)

    train = commands.add_parser("train", help="train SASRec centrally (non-private ceiling)")
    _add_dataset_arguments(train, optional=True)
    train.add_argument("--out", required=True, help="folder for model.pt, catalog.json, metrics.json")
    defaults_model, defaults_train = ModelOptions(), TrainConfig()
    train.add_argument("--max-len", type=int, default=defaults_model.max_len)
    train.add_argument("--hidden", type=int, default=defaults_model.hidden)
    train.add_argument("--heads", type=int, default=defaults_model.heads)
    train.add_argument("--blocks", type=int, default=defaults_model.blocks)
    train.add_argument("--dropout", type=float, default=defaults_model.dropout)
    train.add_argument("--epochs", type=int, default=defaults_train.epochs, help="at most this many (early stopping)")
    train.add_argument("--batch-size", type=int, default=defaults_train.batch_size)
    train.add_argument("--lr", type=float, default=defaults_train.learning_rate)
    train.add_argument("--weight-decay", type=float, default=defaults_train.weight_decay)
    train.add_argument("--patience", type=int, default=defaults_train.patience)
    train.add_argument("--eval-every", type=int, default=defaults_train.eval_every)
    train.add_argument("--loss", choices=("ce", "bce"), default=defaults_train.loss,
                       help="ce: full softmax cross-entropy; bce: one sampled negative per position")
    train.add_argument("--seed", type=int, default=defaults_train.seed)
    train.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA when present)")
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser("evaluate", help="evaluate a saved model on a dataset's test split")
    evaluate.add_argument("model_dir", help="folder with model.pt and catalog.json")
    _add_dataset_arguments(evaluate, optional=False)
    evaluate.add_argument("--out", default=None, help="write the metrics JSON here")
    evaluate.add_argument("--device", default=None)
    evaluate.set_defaults(handler=_evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except FedtailError as error:
        print(f"fedtail: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("fedtail: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
