"""FedAvg that respects sites' privacy decisions.

Sites may decline a round (their budget would be exceeded); their replies carry
no weights and are left out of the average, and the round goes on with the
others. A reply whose update holds NaN or infinity is that site's failure, with
the reason, and is left out too. A round in which fewer sites trained than it
needs (``min-sites``) is a failed round: the global model stays as it was, and
the round's record says why. An aggregate that is not finite (finite updates
can still overflow) stops the run: nothing of that round is kept. Failed sites
are named by their site id, or by their node id before their first reply.
Replies are averaged by a declared public weight (1.0 by default), never
by private user counts. The sites' epsilons reported in replies are kept per
site for checkpoints and the summary, and each replying site's ledger head per
round (the coordinator's witness of the site's ledger, for ``fedtail audit``).

``round_offset`` lets a resumed run continue its round numbering: Flower's
``Strategy.start`` always counts from 1.

The server may apply its own optimizer to the averaged update (server momentum,
FedAdam; Reddi et al. 2021). That is post-processing of DP outputs and costs no
privacy. Its state (momentum, Adam moments) is not checkpointed: a resumed run
restarts it from zero.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM

from common.errors import ConfigError, NonFiniteError
from common.protocol.records import WEIGHT_METRIC
from common.run_files import site_order
from common.utils.finite import first_non_finite
from common.utils.records import scalar


@dataclass
class RoundReplies:
    trained: list[str] = field(default_factory=list)
    declined: dict[str, str] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    """Error reasons of sites whose ClientApp failed (or that dropped out) this round."""
    ledger_heads: dict[str, dict[str, int | str | None]] = field(default_factory=dict)
    """Per replying site, its ledger after the round: ``lines`` and ``hash`` of the last line (None: withheld)."""
    failed: str = ""
    """Why the round failed and left the global model as it was ("" when the round updated it)."""

    @property
    def everyone_failed(self) -> bool:
        return bool(self.failures) and not self.trained and not self.declined


_EXCEPTION_LINE = re.compile(r"^([\w.]+(?:Error|Exception)): (.+)$")


def root_cause(reason: str) -> str:
    """The first 'SomeError: message' line of a ClientApp's traceback, else the reason itself."""
    for line in reason.splitlines():
        match = _EXCEPTION_LINE.match(line.strip())
        if match and not match.group(1).endswith("ClientAppException"):
            return line.strip()
    return reason.strip()


def _count_trained(contents: list[RecordDict], _weight_key: str) -> MetricRecord:
    return MetricRecord({"sites-trained": len(contents)})


class PrivateAggregation(FedAvg):
    """The privacy-respecting reply handling, placed in front of a Flower strategy of the FedAvg family.

    ``server_optimizer`` goes on to the strategy after this class in the method resolution order (FedAvgM's
    ``server_momentum``, FedAdam's ``eta``): its parameters, not FedAvg's, say what they are.
    """

    def __init__(
        self,
        fraction_sites: float,
        min_sites: int,
        round_offset: int = 0,
        site_epsilon: dict[str, float] | None = None,
        frozen: tuple[str, ...] = (),
        **server_optimizer: Any,
    ) -> None:
        super().__init__(
            fraction_train=fraction_sites,
            fraction_evaluate=0.0,  # no client-side evaluation: local metrics would be an unaccounted release
            min_train_nodes=min_sites,
            min_evaluate_nodes=0,
            min_available_nodes=min_sites,
            weighted_by_key=WEIGHT_METRIC,
            train_metrics_aggr_fn=_count_trained,
            **server_optimizer,
        )
        self.round_offset = round_offset
        self.site_epsilon: dict[str, float] = dict(site_epsilon or {})
        self.last_round = RoundReplies()
        self.min_trained = min_sites
        """The fewest trained sites whose updates make a round (``min-sites``)."""
        self.node_sites: dict[int, str] = {}
        """The site id each node has replied with: names a failed node's site in its error."""
        self.frozen = frozen
        self._frozen_arrays: dict[str, Array] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._frozen_arrays = {name: arrays[name] for name in self.frozen}
        return super().configure_train(server_round + self.round_offset, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        report = RoundReplies()
        to_average: list[Message] = []
        for reply in replies:
            if reply.has_error():
                report.failures.append(f"{self.sender(reply)}: {root_cause(reply.error.reason or '')}")
                to_average.append(reply)  # FedAvg logs the error and skips it
                continue
            site = str(reply.content["site"]["site-id"])
            self.node_sites[reply.metadata.src_node_id] = site
            metrics = reply.content["metrics"]
            if "epsilon" in metrics:
                self.site_epsilon[site] = float(scalar(metrics["epsilon"]))
            if "ledger-lines" in metrics:  # a site of an older fedtail sends none: its ledger goes unwitnessed
                report.ledger_heads[site] = {
                    "lines": int(scalar(metrics["ledger-lines"])),
                    "hash": str(reply.content["site"].get("ledger-hash", "")) or None,
                }
            if metrics["declined"]:
                report.declined[site] = str(reply.content["site"]["reason"])
                continue
            problem = self.update_problem(reply)
            if problem:
                report.failures.append(f"site {site}: {problem}")
                continue
            report.trained.append(site)
            to_average.append(reply)
        self.last_round = report
        report.failed = self.shortfall(report)
        if report.failed:
            return None, None  # the global model stays as it was
        arrays, round_metrics = super().aggregate_train(server_round + self.round_offset, to_average)
        if arrays is not None:
            # Frozen tables (item-tables=frozen) come back unchanged, but a weighted average of equal float32 values
            # can round, and FedAdam would amplify that rounding into a step: they are restored exactly.
            for name, kept in self._frozen_arrays.items():
                arrays[name] = kept
            self.require_finite(server_round + self.round_offset, arrays)
        return arrays, round_metrics

    def sender(self, reply: Message) -> str:
        """Who sent a reply, as the round's record names it: the site id it replied with before, else its node."""
        node = reply.metadata.src_node_id
        return f"site {self.node_sites[node]}" if node in self.node_sites else f"node {node}"

    def update_problem(self, reply: Message) -> str:
        """Why a trained site's update cannot be averaged; "" when it can."""
        if "arrays" not in reply.content.array_records:
            return "the reply holds no weights"
        weight = scalar(reply.content["metrics"].get(WEIGHT_METRIC, 1.0))
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
            return f"'{WEIGHT_METRIC}' = {weight!r} is not a positive finite number"
        broken = first_non_finite(reply.content.array_records["arrays"])
        return "" if broken is None else f"its update holds NaN or infinity in '{broken}'; left out of the average"

    def shortfall(self, report: RoundReplies) -> str:
        """Why the round fails for want of trained sites; "" when enough trained."""
        if len(report.trained) >= self.min_trained:
            return ""
        if not report.trained:
            return "no site trained; the global model is unchanged"
        sites = ", ".join(sorted(report.trained, key=site_order))
        return (f"only {len(report.trained)} site(s) trained ({sites}), fewer than min-sites = {self.min_trained}; "
                "the global model is unchanged")

    def require_finite(self, server_round: int, weights: Mapping[str, Any]) -> None:
        """Stop the run on a non-finite aggregate: a NaN global model would be validated as perfect and kept."""
        broken = first_non_finite(weights)
        if broken is not None:
            sites = ", ".join(sorted(self.last_round.trained, key=site_order))
            raise NonFiniteError(
                f"round {server_round}: the aggregate of the updates of site(s) {sites} holds NaN or infinity in "
                f"'{broken}'; the run stops here and keeps nothing of this round"
            )


class PrivateFedAvg(PrivateAggregation, FedAvg):
    """Plain FedAvg: the global model becomes the weighted average of the sites' models."""


class PrivateFedAvgM(PrivateAggregation, FedAvgM):
    """FedAvg with server-side momentum on the averaged update."""


class PrivateFedAdam(PrivateAggregation, FedAdam):
    """Adam on the server, the averaged update as its pseudo-gradient."""


DEFAULT_SERVER_LEARNING_RATE = {"fedavg": 1.0, "fedavgm": 1.0, "fedadam": 1e-2}


def private_strategy(
    server_optimizer: str,
    fraction_sites: float,
    min_sites: int,
    round_offset: int = 0,
    site_epsilon: dict[str, float] | None = None,
    server_learning_rate: float = 0.0,
    server_momentum: float = 0.9,
    frozen: tuple[str, ...] = (),
) -> PrivateAggregation:
    """The strategy for ``server_optimizer``; a learning rate of 0 means that optimizer's usual default.

    ``frozen``: the state-dict names every round must leave exactly as they were (``item-tables=frozen``)."""
    rate = server_learning_rate or DEFAULT_SERVER_LEARNING_RATE[server_optimizer]
    common = (fraction_sites, min_sites, round_offset, site_epsilon, frozen)
    if server_optimizer == "fedavgm":
        return PrivateFedAvgM(*common, server_learning_rate=rate, server_momentum=server_momentum)
    if server_optimizer == "fedadam":
        return PrivateFedAdam(*common, eta=rate, beta_1=server_momentum)
    if rate != 1.0:
        raise ConfigError("fedavg has no server learning rate: use fedavgm (momentum 0) to scale the update")
    return PrivateFedAvg(*common)
