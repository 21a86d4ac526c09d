"""What every benchmark shares: its declaration to the suite, timing, memory sampling and the machine's description.

Kept apart from the benchmarks so that each of them imports only this module, and the registry imports them.
"""

from __future__ import annotations

import argparse
import os
import platform
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

from client.app import TRAINING_TIME

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
ML_100K = SHARED_DATA / "ml-100k"
AMAZON_BEAUTY = SHARED_DATA / "amazon-beauty" / "Beauty.txt"

Result = TypeVar("Result")


@dataclass(frozen=True)
class Context:
    """What a benchmark runs with: the quick or the long version, the output folder, the device, its own options."""

    full: bool
    out: Path
    device: torch.device
    options: argparse.Namespace


@dataclass(frozen=True)
class Benchmark(Generic[Result]):
    """One benchmark as the suite sees it; a module declaring one and a line in the registry make it runnable."""

    name: str
    help: str
    """One line for ``fedtail bench --help``."""
    description: str
    """The paragraph above its table on the benchmarks page: what is measured, and how."""
    result: type[Result]
    """A dataclass, one per table row: the JSON holds each as a dict, and the page rebuilds them from it."""
    run: Callable[[Context], list[Result]]
    format_table: Callable[[list[Result]], str]
    plot: Callable[[Path, list[Result]], None] | None = None
    """Writes ``NAME.svg`` where a picture says more than the table."""
    add_options: Callable[[argparse._ArgumentGroup], None] | None = None
    """Its own command-line options, shown in a group of their own and handed over in ``Context.options``."""
    conclusion: Callable[[list[Result]], str] | None = None
    """A paragraph under the table, written from the results: what they say stays true of whichever run wrote the
    page."""

    def option_defaults(self) -> dict[str, Any]:
        """Each of its own options' destination and default, to tell which ones a command line set."""
        parser = argparse.ArgumentParser(add_help=False)
        if self.add_options is not None:
            self.add_options(parser.add_argument_group())
        return vars(parser.parse_args([]))


def timed(device: torch.device, step: Callable[[], object]) -> float:
    """Wall time of one call, waiting for the GPU's queued work at both ends."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def interleaved_times(
    device: torch.device, calls: Mapping[str, Callable[[], object]], repeats: int, label: str
) -> dict[str, list[float]]:
    """Each call's wall times over ``repeats`` rounds, the calls interleaved round by round so that a machine's
    load drifts over all of them alike; one extra first round warms caches and the allocator up and is dropped."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for index in range(repeats + 1):
        for name, call in calls.items():
            seconds = timed(device, call)
            if index > 0:
                times[name].append(seconds)
        print(f"  {label}: {index}/{repeats} done", flush=True)
    return times


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0  # the process ended between listing and reading


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found, frontier = [root], [root]
    while frontier:
        frontier = [child for pid in frontier for child in children.get(pid, [])]
        found.extend(frontier)
    return found


@contextmanager
def peak_rss(tree: bool = False, interval_s: float = 0.002) -> Iterator[list[int]]:
    """Samples resident memory while the block runs; yields a list whose one element becomes the peak in bytes.

    With ``tree``, the sum over this process and all its descendants (RSS counts
    shared library pages once per process, so this overstates a tree's use).
    """
    if not Path("/proc/self/statm").exists():
        raise RuntimeError("memory sampling needs Linux /proc")
    peak = [0]
    stop = threading.Event()

    def take_sample() -> None:
        pids = _descendants(os.getpid()) if tree else [os.getpid()]
        peak[0] = max(peak[0], sum(rss_bytes(pid) for pid in pids))

    def sample() -> None:
        while not stop.is_set():
            take_sample()
            stop.wait(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        stop.set()
        sampler.join()
        take_sample()  # what the block still holds at its end, in case the sampler was not scheduled in time


def site_training_seconds(flower_log: Path) -> dict[int, float]:
    """Per round, the sum of the sites' 'local training' log lines (ClientApp output reaches Flower's log)."""
    per_round: dict[int, float] = {}
    for match in TRAINING_TIME.finditer(flower_log.read_text(encoding="utf-8", errors="replace")):
        number = int(match["round"])
        per_round[number] = per_round.get(number, 0.0) + float(match["seconds"])
    return per_round


def machine() -> dict[str, Any]:
    cpu = "unknown"
    if Path("/proc/cpuinfo").exists():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(memory_gb, 1), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
