"""The suite: ``fedtail bench``'s command line, running benchmarks and the Markdown page, all read from the registry.

Each run writes ``OUT/NAME.json`` (and ``NAME.svg``); the page is assembled from
every JSON file present, so rerunning one benchmark keeps the other sections.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from common.errors import ConfigError
from common.recommender.training import pick_device
from common.utils.files import write_json
from simulations.bench.core import Context, machine
from simulations.bench.registry import BENCHMARKS

DESCRIPTION = (
    "Runs fedtail's benchmarks (all by default): each prints a table and saves OUT/NAME.json (and NAME.svg), then "
    "the Markdown page is assembled from every result in OUT."
)

PAGE_INTRO = """# Benchmarks

Written by `python -m simulations.bench` from its JSON results (sections marked
`--full` come from the long version, kept in a `full/` folder beside the quick
ones). Ratios are measured within one run, never across runs: these machines
are shared and noisy.
"""


class _Names(argparse.Action):
    """The NAME arguments, refused at once when one is no benchmark."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        unknown = [name for name in values if name not in BENCHMARKS]
        if unknown:
            parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
        setattr(namespace, self.dest, values)


class _Help(argparse.Action):
    """``-h``: after benchmark names (``fedtail bench serving -h``), the help of those benchmarks only."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0,
                         help="show this help and exit; after NAMEs, only theirs")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        shown = argparse.ArgumentParser(prog=parser.prog, add_help=False)
        add_arguments(shown, only=getattr(namespace, "names", None) or ())
        shown.print_help()
        parser.exit()


def add_arguments(parser: argparse.ArgumentParser, only: Sequence[str] = ()) -> None:
    """The suite's options, then each benchmark's help and own options in a group of its own, on a parser made
    with ``add_help=False``. ``only``: the benchmarks to show, with their page descriptions (default: all, briefly)."""
    parser.description = DESCRIPTION
    parser.add_argument("-h", "--help", action=_Help)
    parser.add_argument("names", nargs="*", default=[], action=_Names, metavar="NAME",
                        help=f"benchmarks to run (default: all of {', '.join(BENCHMARKS)})")
    parser.add_argument("--full", action="store_true", help="the long version (more steps, sites, rounds, data)")
    parser.add_argument("--out", default="runs/bench",
                        help="folder for the JSON results and charts (default: %(default)s)")
    parser.add_argument("--page", default=None, help="where the Markdown page goes (default: OUT/benchmarks.md)")
    for benchmark in (BENCHMARKS[name] for name in only or BENCHMARKS):
        group = parser.add_argument_group(benchmark.name, f"{benchmark.help}. {benchmark.description}" if only
                                          else benchmark.help)
        if benchmark.add_options is not None:
            benchmark.add_options(group)


def run_arguments(args: argparse.Namespace) -> int:
    """Runs the benchmarks a parsed command line names, then writes the page."""
    names = list(dict.fromkeys(args.names or BENCHMARKS))
    for benchmark in (b for b in BENCHMARKS.values() if b.name not in names):
        unused = [dest for dest, default in benchmark.option_defaults().items() if getattr(args, dest) != default]
        if unused:
            raise ConfigError(f"--{unused[0].replace('_', '-')} is an option of the {benchmark.name} benchmark, "
                              "which this command does not run")
    out = Path(args.out)
    run(names, args.full, out, args)
    print(f"wrote {write_page(out, Path(args.page) if args.page else None)}")
    return 0


def run(names: list[str], full: bool, out: Path, options: argparse.Namespace) -> None:
    out.mkdir(parents=True, exist_ok=True)
    context = Context(full, out, pick_device(), options)
    for name in names:
        benchmark = BENCHMARKS[name]
        started = time.perf_counter()
        print(f"bench {name} ({'full' if full else 'quick'}) ...", flush=True)
        results = benchmark.run(context)
        table = benchmark.format_table(results)
        if benchmark.plot is not None:
            benchmark.plot(out / f"{name}.svg", results)
        seconds = time.perf_counter() - started
        print(table, flush=True)
        if benchmark.conclusion is not None:
            print(benchmark.conclusion(results), flush=True)
        write_json(out / f"{name}.json", {
            "benchmark": name, "mode": "full" if full else "quick", "seconds": seconds, "machine": machine(),
            "device": str(context.device), "results": [asdict(r) for r in results],
        })
        print(f"bench {name}: {seconds:.0f}s; wrote {out / (name + '.json')}", flush=True)


def write_page(out: Path, page: Path | None = None) -> Path:
    """A Markdown page (default ``out/benchmarks.md``) from every benchmark's JSON in ``out`` and ``out/full``."""
    page = page or out / "benchmarks.md"
    sections = [PAGE_INTRO]
    for folder in (out, out / "full"):  # "full": long runs kept beside the quick suite's results
        for name, benchmark in BENCHMARKS.items():
            path = folder / f"{name}.json"
            if not path.exists():
                continue
            record = json.loads(path.read_text(encoding="utf-8"))
            machine_line = ", ".join(f"{key} {value}" for key, value in record["machine"].items() if value is not None)
            full = " --full" if record["mode"] == "full" else ""
            chart = Path(os.path.relpath(folder, page.parent)) / f"{name}.svg"
            results = [benchmark.result(**r) for r in record["results"]]
            table = benchmark.format_table(results)
            if benchmark.conclusion is not None:
                table += f"\n\n{benchmark.conclusion(results)}"
            sections.append(
                f"## {name}{full}\n\n{benchmark.description}\n\n"
                f"`python -m simulations.bench {name}{full}` ({record['seconds']:.0f} s, device {record['device']})\n\n"
                f"Machine: {machine_line}\n\n{table}\n"
                + (f"\n![{name}]({chart})\n" if (folder / f"{name}.svg").exists() else "")
            )
    page.write_text("\n".join(sections), encoding="utf-8")
    return page


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedtail bench", add_help=False)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_arguments(args)
    except ConfigError as error:
        parser.error(str(error))
