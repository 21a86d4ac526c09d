"""Distributed noise (``noise = distributed``): ``central``'s mechanism, the noise added by the sites in shares and the
sum formed by Flower's secure aggregation, so that the coordinator never holds a single site's sum.

Each round is one DP step over the union of all sites' users, as under ``central`` (``server.central_noise``), but
the coordinator adds no noise: every site sends its clipped sum plus its share of the noise
(``client.secure_aggregation``) through SecAgg+ (``common.flower.secaggplus_driver``, Flower's workflow
unchanged), and the coordinator receives only the sum. It divides that by the public ``batch-size`` and applies the
same server optimizer as ``central`` (post-processing), on the negated mean under ``user-update = delta``.

Flower's SecAgg+ is driven from Flower's legacy workflow API, so this strategy replaces ``Strategy.start``'s
send-and-receive round by one secure sum per round; the reply bookkeeping (trained, declined, failures, epsilons,
ledger heads) is ``PrivateAggregation``'s, read from the metrics that travel with the masked vectors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.common import Scalar
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result

from common.federation import RunSettings
from common.flower.secaggplus_driver import SecureAggregation, SecureSum, secure_sum
from common.privacy.mechanisms import SITE
from common.privacy.mechanisms.gaussian import GaussianMechanism
from common.protocol.records import NOISE_MULTIPLIER_METRIC
from common.protocol.secure_sum import NAME_SEPARATOR, STATE_NAMES, SUM_NAMES, clipping_range, sum_bound
from server.central_noise import CentralNoise, central_noise_multiplier, server_optimizer
from server.strategy import RoundReplies


class DistributedNoise(CentralNoise):
    """One secure sum per round, divided by the public batch size, then ``central``'s server optimizer."""

    def __init__(self, *args: Any, protocol: SecureAggregation, sum_names: list[str], **central: Any) -> None:
        super().__init__(*args, **central)
        self.min_trained = 1
        self.protocol = protocol
        self.sum_names = sum_names

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """``Strategy.start``'s loop (initial evaluation, then train and evaluate per round), each round's training
        one secure sum. ``timeout`` and ``evaluate_config`` are unused: no client-side evaluation, and Flower's
        workflow waits for every reply."""
        result = Result()
        arrays = initial_arrays
        if evaluate_fn:
            evaluate_fn(0, arrays)
        for current in range(1, num_rounds + 1):
            server_round = current + self.round_offset
            weights = arrays.to_torch_state_dict()
            config = ConfigRecord(
                {
                    **(train_config or {}),
                    "server-round": server_round,
                    STATE_NAMES: NAME_SEPARATOR.join(weights),
                    SUM_NAMES: NAME_SEPARATOR.join(self.sum_names),
                }
            )
            outcome = secure_sum(grid, server_round, arrays, config, self.protocol, self.sum_names)
            updated = self.step(server_round, outcome, weights)
            if updated is not None:
                arrays = ArrayRecord(updated)
                result.arrays = arrays
            if evaluate_fn:
                evaluate_fn(current, arrays)
        return result

    def step(
        self, server_round: int, outcome: SecureSum, weights: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor] | None:
        """Record the round's replies; the new global weights, or None when no site trained or the sum failed.

        A declined site is in the sum with its pure-noise share, so ``min-sites`` (the size of every secure sum)
        is met by the protocol itself: a round here fails only when no site trained."""
        report = RoundReplies(failures=list(outcome.failures))
        required = [self.noise_multiplier]
        for metrics in outcome.site_metrics:
            site = str(metrics["site-id"])
            self._record(report, site, metrics)
            if not metrics["declined"] and NOISE_MULTIPLIER_METRIC in metrics:
                required.append(float(metrics[NOISE_MULTIPLIER_METRIC]))
        self.last_round = report
        if outcome.total is None:
            report.failures.append("the secure sum did not complete (Flower's SecAgg+ workflow halted)")
            report.trained = []
            report.failed = "the secure sum did not complete; the global model is unchanged"
            return None
        report.failed = self.shortfall(report)
        if report.failed:
            return None
        sigma = max(required)
        self.last_noise_multiplier = sigma
        noisy = {name: torch.from_numpy(value) for name, value in outcome.total.items()}
        updated = self.optimizer.step(weights, self.mean_gradient(noisy))
        self.require_finite(server_round, updated)
        return updated

    def _record(self, report: RoundReplies, site: str, metrics: dict[str, Scalar]) -> None:
        if "epsilon" in metrics:
            self.site_epsilon[site] = float(metrics["epsilon"])
        if "ledger-lines" in metrics:
            report.ledger_heads[site] = {
                "lines": int(metrics["ledger-lines"]),
                "hash": str(metrics.get("ledger-hash", "")) or None,
            }
        if metrics["declined"]:
            report.declined[site] = str(metrics.get("reason", ""))
        else:
            report.trained.append(site)


def secure_aggregation(settings: RunSettings) -> SecureAggregation:
    """The run's SecAgg+ parameters: every site in every sum; a value range wide enough for any site's share, even
    one that assumes no other site's noise (``secure-aggregation-sites`` 1)."""
    widest = GaussianMechanism(central_noise_multiplier(settings), settings.max_grad_norm, placement="distributed")
    return SecureAggregation(
        settings.min_sites,
        settings.secure_aggregation_tolerated,
        clipping_range(sum_bound(widest.clip, settings.batch_size), widest.noise_std(SITE)),
    )


def distributed_strategy(
    settings: RunSettings,
    sum_names: list[str],
    round_offset: int = 0,
    site_epsilon: dict[str, float] | None = None,
) -> DistributedNoise:
    return DistributedNoise(
        settings.fraction_sites,
        settings.min_sites,
        round_offset,
        site_epsilon,
        protocol=secure_aggregation(settings),
        sum_names=sum_names,
        noise_multiplier=central_noise_multiplier(settings),
        max_grad_norm=settings.max_grad_norm,
        batch_size=settings.batch_size,
        optimizer=server_optimizer(settings),
        user_update=settings.user_update,
    )
