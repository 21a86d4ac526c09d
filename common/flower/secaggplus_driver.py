"""One round's sum over the sites through Flower's secure aggregation (SecAgg+), driven from fedtail's own round loop.

Flower 1.41 ships SecAgg+ (``SecAggPlusWorkflow`` on the server, ``secaggplus_mod`` on the sites) for its legacy
workflow API only: the workflow wants a ``LegacyContext`` (a legacy ``Strategy`` and a ``ClientManager``) and the
round's number and weights in the context's state. ``secure_sum`` builds exactly that for one round and calls
Flower's workflow, unchanged, with the Grid the ServerApp was given: the coordinator then receives each site's
vector only masked (uniform modulo ``modulus_range``) and learns only the sum. No cryptography here.

What the workflow computes (read from flwr/server/workflow/secure_aggregation/secaggplus_workflow.py and
flwr/client/mod/secure_aggregation/secaggplus_mod.py): each site's vector x_i is multiplied by its weight
w_i / max_weight, clipped coordinate-wise to [-clipping_range, clipping_range], shifted and scaled to
[0, quantization_range] and stochastically rounded to integers; the masked integers are summed modulo
``modulus_range`` and unmasked; the strategy gets sum_i (w_i x_i) / sum_i w_i. Every site here sends weight 1 and
``max_weight`` is 1, so the factor is exactly 1 and the sum is the mean times the number of sites in the sum.
Nothing wraps as long as sites x quantization_range < modulus_range (checked here and by each site).

Tolerance (``SecureAggregation``): with K sites in the round and T tolerated, the workflow's key-sharing graph is
complete (num_shares = K) and its reconstruction threshold is K - T. The round then completes when at most T
sites drop out, and a site's masks stay secret against a coordinator that follows the protocol together with up
to T colluding sites as long as T < K - T (fewer than K - T shares). Flower's SecAgg+ has no consistency check in
its unmask stage (a coordinator that deviates from the protocol could ask sites for both kinds of shares of one
site); fedtail's sites refuse the simplest form of that (``client.secure_aggregation``), but the protocol as
shipped is secure against an honest-but-curious coordinator, not a malicious one: hence the ledger's fallback
epsilon (a site's own noise share alone).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from common.errors import ConfigError
from common.flower.sampling import sample_nodes

QUANTIZATION_RANGE = 2**22
MODULUS_RANGE = 2**32


@dataclass(frozen=True)
class SecureAggregation:
    """The SecAgg+ parameters of a run: K sites, T of them tolerated (dropped out or colluding), the value range."""

    sites: int
    tolerated: int
    clipping_range: float
    quantization_range: int = QUANTIZATION_RANGE
    modulus_range: int = MODULUS_RANGE

    def __post_init__(self) -> None:
        problem = secure_aggregation_problem(
            self.sites, self.tolerated, self.clipping_range, self.quantization_range, self.modulus_range
        )
        if problem:
            raise ConfigError(problem)

    @property
    def threshold(self) -> int:
        """Flower's reconstruction threshold: the round aborts when fewer sites than this are left."""
        return self.sites - self.tolerated

    def workflow(self) -> SecAggPlusWorkflow:
        return SecAggPlusWorkflow(
            num_shares=self.sites,
            reconstruction_threshold=self.threshold,
            max_weight=1.0,
            clipping_range=self.clipping_range,
            quantization_range=self.quantization_range,
            modulus_range=self.modulus_range,
        )


def secure_aggregation_problem(
    sites: int, tolerated: int, clipping_range: float, quantization_range: int, modulus_range: int
) -> str:
    """Why these SecAgg+ parameters give no secure sum without wrap-around; "" when they do (public input only)."""
    if sites < 3:
        return f"secure aggregation needs at least 3 sites (Flower's SecAgg+ shares keys in 3 or more), not {sites}"
    if not 1 <= tolerated < sites - tolerated:
        return (
            f"secure aggregation tolerating {tolerated} of {sites} sites: needs 1 <= T < K - T (Flower's SecAgg+ "
            "wants its reconstruction threshold K - T below K, and it must exceed the colluding sites T), i.e. "
            "1 <= T <= (K - 1) / 2"
        )
    if not (np.isfinite(clipping_range) and clipping_range > 0):
        return f"secure aggregation clipping range {clipping_range}: must be positive and finite"
    if sites * quantization_range >= modulus_range:
        return (
            f"secure aggregation of {sites} sites with quantization range {quantization_range} could wrap around "
            f"modulus {modulus_range}"
        )
    return ""


@dataclass
class SecureSum:
    """What one secure round gave the coordinator: the sum (None if the protocol halted) and each site's metrics."""

    total: dict[str, np.ndarray] | None
    site_metrics: list[dict[str, Scalar]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


class _CollectSum(Strategy):
    """The legacy Strategy the workflow asks: every registered site trains; keeps what the workflow aggregated."""

    def __init__(self, config: dict[str, Scalar]) -> None:
        self.config = config
        self.aggregate: Parameters | None = None
        self.results: list[FitRes] = []
        self.failures: list[str] = []

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        return [(proxy, FitIns(parameters, dict(self.config))) for proxy in client_manager.all().values()]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        self.results = [fit_res for _, fit_res in results]
        self.failures = [str(failure) for failure in failures]
        if results:  # the workflow hands every result the same aggregated parameters
            self.aggregate = results[0][1].parameters
        return self.aggregate, {}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return None


def secure_sum(
    grid: Grid,
    server_round: int,
    arrays: ArrayRecord,
    config: ConfigRecord,
    protocol: SecureAggregation,
    sum_names: list[str],
) -> SecureSum:
    """Send ``arrays`` and ``config`` to every site through SecAgg+ and return the sum of the vectors they reply.

    Each site replies (``client.secure_aggregation``) one array per name in ``sum_names``, in that order; the
    coordinator gets their sum only. Waits until ``protocol.sites`` sites are connected and asks that many.
    """
    client_manager = SimpleClientManager()
    sampled, _ = sample_nodes(grid, protocol.sites, protocol.sites)  # Flower's own wait for the sites to connect
    for node_id in sampled:
        client_manager.register(GridClientProxy(node_id=node_id, grid=grid, run_id=grid.run.run_id))
    scalars = bool | bytes | float | int | str
    collect = _CollectSum({key: value for key, value in config.items() if isinstance(value, scalars)})
    scratch = Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
    legacy = LegacyContext(scratch, strategy=collect, client_manager=client_manager)
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})
    legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters([array.numpy() for array in arrays.values()]), keep_input=True
    )
    protocol.workflow()(grid, legacy)
    site_metrics = [dict(result.metrics) for result in collect.results]
    if collect.aggregate is None:
        return SecureSum(None, site_metrics, collect.failures)
    mean = parameters_to_ndarrays(collect.aggregate)
    if len(mean) != len(sum_names):
        wrong = f"the secure sum holds {len(mean)} arrays, not {len(sum_names)}"
        return SecureSum(None, site_metrics, [*collect.failures, wrong])
    # weight 1 per site, max_weight 1: the workflow's weighted mean is the sum over the results divided by their count
    total = {name: value * len(collect.results) for name, value in zip(sum_names, mean, strict=True)}
    return SecureSum(total, site_metrics, collect.failures)
