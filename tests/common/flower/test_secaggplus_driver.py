"""SecAgg+ driven from our own ServerApp loop, on Flower's Simulation Engine with Flower's own ``secaggplus_mod``.

The coordinator's view is recorded at the Grid: every message any site sends back passes through
``Grid.send_and_receive`` (the only way the workflow receives), so checking every array in every recorded reply
shows what the coordinator held, without trusting our own code's account of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from client.secure_aggregation import secure_aggregation_mod, secure_reply
from common.errors import ConfigError
from common.flower.secaggplus_driver import SecureAggregation, SecureSum, secure_sum
from common.protocol.secure_sum import STATE_NAMES, SUM_NAMES

SITES = 4
# Long enough that a random vector correlates with a site's by chance (|r| >= 0.9) with odds far below 1e-20:
# with 7 coordinates the chance was about 0.6% a comparison, and CI once failed on it.
SHAPES = {"a": (8, 16), "b": (96,)}
CLIPPING_RANGE = 16.0


def site_vector(node_id: int) -> dict[str, np.ndarray]:
    """A site's private vector, a function of its node id (so the test can tell which site a vector is)."""
    rng = np.random.default_rng(node_id % 2**32)
    return {name: rng.normal(size=shape).astype(np.float32) for name, shape in SHAPES.items()}


class RecordingGrid(Grid):
    """The ServerApp's Grid, unchanged, keeping a copy of every reply it hands the coordinator."""

    def __init__(self, grid: Grid) -> None:
        self.inner = grid
        self.replies: list[Message] = []

    def set_run(self, run):  # type: ignore[no-untyped-def]
        self.inner.set_run(run)

    @property
    def run(self):  # type: ignore[no-untyped-def]
        return self.inner.run

    def create_message(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.inner.pull_messages(message_ids))
        self.replies.extend(replies)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        self.replies.extend(replies)
        return replies


def arrays_in(content: RecordDict) -> list[np.ndarray]:
    """Every array a reply carries: array records, and bytes in config records that decode as numpy arrays."""
    found = [array.numpy() for record in content.array_records.values() for array in record.values()]
    for record in content.config_records.values():
        for value in record.values():
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, bytes):
                    try:
                        found.append(bytes_to_ndarray(item))
                    except (ValueError, OSError):
                        continue
    return found


OUTCOME: dict[str, object] = {}
DROPOUT: dict[str, object] = {}


def toy_round(
    context: Context, config: Mapping[str, Any], weights: dict[str, torch.Tensor], names: list[str],
    protocol: Mapping[str, Any],
) -> tuple[RecordDict, dict[str, torch.Tensor]]:
    """A site's round as client.app's distributed round returns it: its records and its private vector."""
    if config.get("drop") == context.node_id:
        raise RuntimeError("this site drops out after the keys were shared")
    records = RecordDict({"metrics": MetricRecord({"declined": 0}), "site": ConfigRecord({"node": context.node_id})})
    return records, {name: torch.from_numpy(site_vector(context.node_id)[name]) for name in names}


client_app = ClientApp(mods=[secure_aggregation_mod])


@client_app.train()
def reply_vector(msg: Message, context: Context) -> Message:
    """A site of the toy federation, through fedtail's SecAgg+ reply (Flower's secaggplus_mod behind the router)."""
    return secure_reply(msg, context, partial(toy_round, context))


def serve(outcome: dict[str, object], drop_first: bool) -> Callable[[Grid, Context], None]:
    def coordinate(grid: Grid, context: Context) -> None:
        recording = RecordingGrid(grid)
        arrays = ArrayRecord({name: Array(np.zeros(shape, dtype=np.float32)) for name, shape in SHAPES.items()})
        protocol = SecureAggregation(SITES, tolerated=1, clipping_range=CLIPPING_RANGE)
        nodes = sorted(grid.get_node_ids())
        while len(nodes) < SITES:
            time.sleep(0.5)
            nodes = sorted(grid.get_node_ids())
        config = ConfigRecord({STATE_NAMES: ",".join(SHAPES), SUM_NAMES: ",".join(SHAPES)})
        if drop_first:
            config["drop"] = nodes[0]
        outcome["sum"] = secure_sum(recording, 1, arrays, config, protocol, list(SHAPES))
        outcome["replies"] = recording.replies
        outcome["nodes"] = nodes[1:] if drop_first else nodes

    app = ServerApp()
    app.main()(coordinate)
    return app


@pytest.fixture(scope="module")
def federation() -> dict[str, object]:
    run_simulation(serve(OUTCOME, False), client_app, SITES, backend_config={"client_resources": {"num_cpus": 1}})
    return OUTCOME


@pytest.fixture(scope="module")
def federation_with_dropout() -> dict[str, object]:
    run_simulation(serve(DROPOUT, True), client_app, SITES, backend_config={"client_resources": {"num_cpus": 1}})
    return DROPOUT


def test_coordinator_gets_the_sum(federation: dict[str, object]) -> None:
    check_sum(federation, SITES)


def test_a_tolerated_dropout_leaves_the_sum_of_the_others(federation_with_dropout: dict[str, object]) -> None:
    """One site fails after the keys were shared (T = 1 of 4 tolerated): the others' masks are removed with the
    shares of the dropped site's key and the coordinator gets the sum of the three sites left."""
    check_sum(federation_with_dropout, SITES - 1)
    result = federation_with_dropout["sum"]
    assert isinstance(result, SecureSum) and result.failures  # Flower's workflow lists the one failure twice
    assert all("drops out" in failure for failure in result.failures)


def check_sum(federation: dict[str, object], sites: int) -> None:
    result = federation["sum"]
    assert isinstance(result, SecureSum) and result.total is not None
    nodes = federation["nodes"]
    assert isinstance(nodes, list) and len(nodes) == sites
    step = 2 * CLIPPING_RANGE / 2**22  # one quantisation step per site and coordinate
    for name in SHAPES:
        expected = sum(site_vector(node)[name] for node in nodes)
        np.testing.assert_allclose(result.total[name], expected, atol=sites * step)
    assert sorted(int(metrics["node"]) for metrics in result.site_metrics) == sorted(nodes)


def test_coordinator_never_holds_a_site_vector(federation: dict[str, object]) -> None:
    replies = federation["replies"]
    nodes = federation["nodes"]
    assert isinstance(replies, list) and isinstance(nodes, list)
    held = [array.astype(np.float64).ravel() for reply in replies for array in arrays_in(reply.content)]
    assert any(array.size >= max(np.prod(shape) for shape in SHAPES.values()) for array in held), "no masked vector"
    for node in nodes:
        for name, private in site_vector(node).items():
            flat = private.astype(np.float64).ravel()
            for array in held:
                if array.size != flat.size:
                    continue
                # any affine image of the vector (e.g. Flower's quantisation: shift and scale) correlates fully
                assert abs(np.corrcoef(array, flat)[0, 1]) < 0.9, f"the coordinator held site {node}'s '{name}'"
    # the masked vectors the sites sent look uniform modulo 2**32, nothing like the quantised vectors
    masked = [array for array in held if array.size == np.prod(SHAPES["a"])]
    assert masked and all(array.max() > 2**22 for array in masked)


@pytest.mark.parametrize(
    ("sites", "tolerated", "clip"), [(2, 0, 1.0), (5, 3, 1.0), (5, 0, 1.0), (5, 2, 0.0), (2000, 1, 1.0)]
)
def test_protocol_parameters_refused(sites: int, tolerated: int, clip: float) -> None:
    with pytest.raises(ConfigError):
        SecureAggregation(sites, tolerated, clip)
