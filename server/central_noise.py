"""Central noise (``noise = central``): one Gaussian noise per step over the sum of every site's clipped gradients.

DP-FedSGD with per-user clipping (McMahan et al., ICLR 2018): each round is
one DP-SGD step over the union of all sites' users. Every site Poisson-samples
its users at the public ``sample-rate`` and sends the un-noised sum of their
clipped gradients (``client.clipped_sum``); the coordinator

1. sums the sites' sums, refusing any reply that is not finite or does not fit
   the global model (that site is left out of the round, with the reason);
2. adds N(0, sigma^2 C^2) to every coordinate ONCE, the aggregate half of the
   Gaussian mechanism placed ``central`` (``common.privacy.mechanisms.gaussian``:
   Opacus' secure-mode draw, from a generator seeded by the operating system),
   with sigma the largest noise multiplier any site required, and never less
   than the one the run's own settings give;
3. divides by the public ``batch-size`` (the expected federation batch: all
   sites' users x sample-rate; a public constant, never a count);
4. applies its optimizer to the global weights with that noisy mean as the
   gradient: Adam (DP-Adam) by default, or SGD with momentum. This is
   post-processing of the noisy sum.

With ``user-update = delta`` (user-level DP-FedAvg) the sites' sums are of
clipped per-user model deltas after a few local steps (``client.delta_sum``),
not of gradients; a delta points downhill, so the optimizer's gradient is the
noisy mean delta negated (with SGD at rate 1, FedAvg's own step). The noise,
its calibration and each site's ledger are the same: a user still moves the
sum by at most C, once per round.

Trust: each site trusts the coordinator to add the noise
(``common.privacy.mechanisms.CENTRAL_STATEMENT``). Against the coordinator
itself a site's release (the un-noised sum) is NOT private; the guarantee
holds against everyone who sees only the global models.

The optimizer's state (moments) is not checkpointed: a resumed run restarts it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.federation import RunSettings
from common.privacy.accounting import calibrate_noise
from common.privacy.mechanisms import COORDINATOR
from common.privacy.mechanisms.gaussian import GaussianMechanism, secret_generator
from common.protocol.records import NOISE_MULTIPLIER_METRIC
from common.recommender.training import CPU
from common.utils import timeline
from common.utils.records import scalar
from server.strategy import PrivateAggregation

DEFAULT_LEARNING_RATE = {"adam": 1e-2, "sgd": 1.0}
"""The server's learning rate when ``server-lr`` is 0: Adam's was measured against 3e-2 (docs/results.md, "The
recipe per noise placement")."""
ADAM_BETA_2, ADAM_EPSILON = 0.999, 1e-8


@dataclass
class ServerOptimizer:
    """The server's step on the global weights from the noisy mean gradient: ``adam`` or ``sgd``."""

    kind: str
    learning_rate: float
    momentum: float
    steps: int = 0
    first: dict[str, torch.Tensor] = field(default_factory=dict)
    second: dict[str, torch.Tensor] = field(default_factory=dict)

    def step(self, weights: dict[str, torch.Tensor], gradient: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """New weights: those in ``gradient`` moved, the others (frozen, buffers) unchanged."""
        self.steps += 1
        updated = dict(weights)
        for name, grad in gradient.items():
            first = self.first.get(name, torch.zeros_like(grad))
            if self.kind == "sgd":
                first = self.momentum * first + grad
                direction = first
            else:
                first = self.momentum * first + (1 - self.momentum) * grad
                second = ADAM_BETA_2 * self.second.get(name, torch.zeros_like(grad)) + (1 - ADAM_BETA_2) * grad**2
                self.second[name] = second
                mean = first / (1 - self.momentum**self.steps)
                variance = second / (1 - ADAM_BETA_2**self.steps)
                direction = mean / (variance.sqrt() + ADAM_EPSILON)
            self.first[name] = first
            updated[name] = weights[name] - self.learning_rate * direction.to(weights[name].dtype)
        return updated


def reply_arrays(reply: Message) -> dict[str, np.ndarray]:
    """The reply's clipped sums as numpy arrays, decoded from Flower's bytes (``Array.numpy()`` decodes on every
    call: ``CentralSum.arrays_of`` keeps them for the round)."""
    return {name: array.numpy() for name, array in reply.content.array_records["arrays"].items()}


ArraysOf = Callable[[Message], Mapping[str, np.ndarray]]


def reply_problem(
    reply: Message, global_weights: dict[str, torch.Tensor], arrays_of: ArraysOf = reply_arrays
) -> str:
    """Why a site's central reply cannot be summed; "" when it can."""
    required = reply.content.metric_records["metrics"].get(NOISE_MULTIPLIER_METRIC)
    if required is None:
        return f"the reply states no '{NOISE_MULTIPLIER_METRIC}' (the total noise its epsilon assumes)"
    value = scalar(required)
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        return f"'{NOISE_MULTIPLIER_METRIC}' = {value!r} is not a positive finite number"
    if "arrays" not in reply.content.array_records:
        return "the reply holds no clipped sum"
    sums = arrays_of(reply)
    if not len(sums):
        return "the reply's clipped sum is empty"
    for name, tensor in sums.items():
        if name not in global_weights:
            return f"the clipped sum names '{name}', which the global model does not have"
        expected = global_weights[name]
        if tuple(tensor.shape) != tuple(expected.shape):
            return f"'{name}' has shape {tuple(tensor.shape)}, the global model's is {tuple(expected.shape)}"
        if not torch.is_floating_point(expected) or tensor.dtype.kind != "f":
            return f"'{name}' is not a floating-point tensor ({tensor.dtype})"
        if not bool(torch.isfinite(torch.from_numpy(tensor)).all()):
            return f"'{name}' holds non-finite values"
    return ""


def sum_replies(
    replies: Iterable[Message], device: torch.device = CPU, arrays_of: ArraysOf = reply_arrays
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """The sum (float64, on ``device``) of the replies' clipped sums and the noise multiplier each of them requires.
    The replies are those ``CentralNoise`` accepted (``reply_problem``); failed replies (errors) are skipped: the
    caller records them."""
    total: dict[str, torch.Tensor] = {}
    required: list[float] = []
    for reply in replies:
        if reply.has_error():
            continue
        required.append(float(scalar(reply.content.metric_records["metrics"][NOISE_MULTIPLIER_METRIC])))
        for name, array in arrays_of(reply).items():
            value = torch.from_numpy(array).to(device, torch.float64)
            total[name] = total[name] + value if name in total else value
    return total, required


class CentralSum(FedAvg):
    """Sum, noise once, divide by the public batch size, optimizer step (see the module's docstring).

    All four run on ``device`` (the GPU when the server has one: ``server.app`` passes ``pick_device()``), the noise
    drawn there from a generator of its own (``secret_generator``); the optimizer's moments stay there between
    rounds, and the new weights come back to the CPU for Flower's message."""

    def __init__(
        self,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        batch_size: int,
        optimizer: ServerOptimizer,
        user_update: str = RunSettings.user_update,
        device: torch.device = CPU,
        **fedavg: Any,
    ) -> None:
        super().__init__(**fedavg)
        self.device = device
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.batch_size = batch_size
        self.optimizer = optimizer
        self.user_update = user_update
        self.global_weights: dict[str, torch.Tensor] = {}
        self.last_noise_multiplier = 0.0
        self._decoded: dict[int, dict[str, np.ndarray]] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.global_weights = arrays.to_torch_state_dict()
        self._decoded.clear()
        return super().configure_train(server_round, arrays, config, grid)

    def arrays_of(self, reply: Message) -> dict[str, np.ndarray]:
        """``reply_arrays``, decoded once a round: checking and summing decoded every reply three times over, about
        85 ms a round for 5 sites of the default model. Keyed by the reply object, alive until the round's sum."""
        if id(reply) not in self._decoded:
            self._decoded[id(reply)] = reply_arrays(reply)
        return self._decoded[id(reply)]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        total, required = sum_replies(replies, self.device, self.arrays_of)
        self._decoded.clear()
        if not required:
            return None, None
        sigma = max(self.noise_multiplier, *required)
        self.last_noise_multiplier = sigma
        with timeline.stage("noise-and-step"):
            mechanism = GaussianMechanism(sigma, self.max_grad_norm, placement="central")
            # its own secret generator: never a seed the sites could know
            noisy = mechanism.add_noise(total, COORDINATOR, secret_generator(self.device))
            weights = {name: tensor.to(self.device) for name, tensor in self.global_weights.items()}
            stepped = self.optimizer.step(weights, self.mean_gradient(noisy))
            updated = {name: tensor.cpu() for name, tensor in stepped.items()}
        return ArrayRecord(updated), MetricRecord({"sites-summed": len(required), "noise-multiplier": sigma})

    def mean_gradient(self, noisy_sum: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The noisy sum over the public batch size, as the gradient the optimizer steps against: negated when the
        sum is of deltas (``user-update = delta``), which point the other way."""
        sign = -1.0 if self.user_update == "delta" else 1.0
        return {name: (value * (sign / self.batch_size)).float() for name, value in noisy_sum.items()}


class CentralNoise(PrivateAggregation, CentralSum):
    """The privacy-respecting reply handling (declines, failures, epsilons, ledger heads) in front of ``CentralSum``;
    a reply that cannot be summed (``reply_problem``) counts as a failure of its site's round."""

    def update_problem(self, reply: Message) -> str:
        return reply_problem(reply, self.global_weights, self.arrays_of)


def central_noise_multiplier(settings: RunSettings) -> float:
    """The least noise multiplier the server adds: the run's own target over ``rounds`` one-step rounds."""
    return calibrate_noise(settings.epsilon, settings.delta, settings.sample_rate, settings.rounds)


def server_optimizer(settings: RunSettings) -> ServerOptimizer:
    """The run's server step for a one-noise placement (central, distributed); a learning rate of 0: the default."""
    rate = settings.server_learning_rate or DEFAULT_LEARNING_RATE[settings.central_optimizer]
    return ServerOptimizer(settings.central_optimizer, rate, settings.server_momentum)


def central_strategy(
    settings: RunSettings,
    round_offset: int = 0,
    site_epsilon: dict[str, float] | None = None,
    device: torch.device = CPU,
) -> CentralNoise:
    return CentralNoise(
        settings.fraction_sites,
        settings.min_sites,
        round_offset,
        site_epsilon,
        noise_multiplier=central_noise_multiplier(settings),
        max_grad_norm=settings.max_grad_norm,
        batch_size=settings.batch_size,
        optimizer=server_optimizer(settings),
        user_update=settings.user_update,
        device=device,
    )
