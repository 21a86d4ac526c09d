"""``serving``: latency of ``fedtail serve`` under a bounded local load.

For each catalogue size a model of that size is saved, ``fedtail serve`` is
started as a real process pinned to one CPU core, and a fixed number of
``POST /recommend`` requests (k = 10, histories of 50 known items) is sent at a
fixed concurrency over keep-alive connections on loopback. Latency is measured
at the client, per request. An untrained model costs the same as a trained one
of the same shape, so the timings hold for real models.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.data.catalog import Catalog
from common.recommender.artifacts import save_model
from common.recommender.model import ModelOptions, SASRec
from common.utils.processes import free_loopback_port
from server.serving import Recommender
from simulations.bench.core import Benchmark, Context
from simulations.report import markdown_table


@dataclass(frozen=True)
class LoadResult:
    catalog_size: int
    requests: int
    concurrency: int
    history_length: int
    k: int
    explain: bool
    p50_ms: float
    p99_ms: float
    requests_per_second: float
    in_process_ms: float
    """Median time of the same recommendation called in this process (no HTTP): what the model costs."""


def _wait_until_up(port: int, process: subprocess.Popen[bytes]) -> None:
    for _ in range(600):
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return
        except OSError:
            if process.poll() is not None:
                raise RuntimeError("the server exited before answering") from None
            time.sleep(0.1)
    raise RuntimeError("the server did not come up in 60 s")


def _client(port: int, bodies: list[bytes], latencies: list[float]) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for body in bodies:
        started = time.perf_counter()
        connection.request("POST", "/recommend", body, {"content-type": "application/json"})
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}")
        latencies.append(time.perf_counter() - started)


def measure(
    catalog_size: int, requests: int, concurrency: int, history_length: int, k: int, explain: bool
) -> LoadResult:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    catalog = Catalog.from_items([str(i) for i in range(1, catalog_size + 1)])
    model = SASRec(ModelOptions().for_catalog(catalog.num_items))
    histories = [rng.choice(catalog_size, size=history_length, replace=False) + 1 for _ in range(requests)]
    bodies = [json.dumps({"history": [str(i) for i in h], "k": k, "explain": explain}).encode() for h in histories]
    with tempfile.TemporaryDirectory() as directory:
        save_model(directory, model, catalog)
        in_process = _in_process_ms(Path(directory), [[str(i) for i in h] for h in histories[:50]], k, explain)
        port = free_loopback_port()
        command = [sys.executable, "-m", "simulations.cli", "serve", directory, "--port", str(port), "--device", "cpu"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        if hasattr(os, "sched_setaffinity"):
            command = ["taskset", "-c", "0", *command]
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_until_up(port, process)
            _client(port, bodies[:20], [])  # warm-up
            latencies: list[float] = []
            shares = [bodies[i::concurrency] for i in range(concurrency)]
            threads = [threading.Thread(target=_client, args=(port, share, latencies)) for share in shares]
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            elapsed = time.perf_counter() - started
        finally:
            process.terminate()
            process.wait(timeout=10)
    if len(latencies) != requests:
        raise RuntimeError(f"only {len(latencies)} of {requests} requests succeeded")
    ordered = sorted(latencies)
    return LoadResult(
        catalog_size, requests, concurrency, history_length, k, explain,
        p50_ms=1000 * statistics.median(ordered),
        p99_ms=1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        requests_per_second=requests / elapsed,
        in_process_ms=in_process,
    )


def _in_process_ms(model_dir: Path, histories: list[list[str]], k: int, explain: bool) -> float:
    torch.set_num_threads(1)
    recommender = Recommender.load(model_dir, torch.device("cpu"))
    times = []
    for history in histories:
        started = time.perf_counter()
        recommender.recommend(history, k, explain=explain)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times[5:])


def format_table(results: list[LoadResult]) -> str:
    return markdown_table(
        ["catalogue", "explain", "concurrency", "requests", "p50 ms", "p99 ms", "requests/s",
         "in-process ms (no HTTP)"],
        [[str(r.catalog_size), "yes" if r.explain else "no", str(r.concurrency), str(r.requests), f"{r.p50_ms:.1f}",
          f"{r.p99_ms:.1f}", f"{r.requests_per_second:.0f}", f"{r.in_process_ms:.1f}"] for r in results],
    )


def run(context: Context) -> list[LoadResult]:
    options = context.options
    catalogs = options.catalogs if options.catalogs is not None else [3_000, 30_000] if context.full else [3_000]
    requests = options.requests if options.requests is not None else 1000 if context.full else 300
    results = []
    for size in catalogs:
        for explain in (True, False):
            for concurrency in options.concurrency:
                results.append(measure(size, requests, concurrency, options.history, options.k, explain))
                print(f"  serving: measured {size} items, explain {explain}, concurrency {concurrency}", flush=True)
    return results


def add_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--catalogs", type=int, nargs="+", metavar="ITEMS",
                       help="catalogue sizes (default: 3000; 3000 30000 with --full)")
    group.add_argument("--requests", type=int, metavar="N",
                       help="requests per measurement (default: 300; 1000 with --full)")
    group.add_argument("--concurrency", type=int, nargs="+", default=[1], metavar="CLIENTS",
                       help="clients sending at once, one measurement per value (default: 1)")
    group.add_argument("--history", type=int, default=50, help="known items in each request's history (default: 50)")
    group.add_argument("--k", type=int, default=10, help="recommendations per request (default: 10)")


BENCHMARK = Benchmark(
    name="serving",
    help="HTTP latency of `fedtail serve` pinned to one core, with and without explanations",
    description="`fedtail serve` pinned to one core, k = 10, histories of 50, one client on loopback.",
    result=LoadResult,
    run=run,
    format_table=format_table,
    add_options=add_options,
)
