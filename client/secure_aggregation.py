"""``noise = distributed`` at a site: its share of the noise, the value range, and its part in Flower's SecAgg+.

Mechanism (one DP step per round, as ``central``): every site sums its Poisson-sampled users' clipped gradients
(``client.clipped_sum``), projects that sum onto the L2 ball of public radius R = batch-size x max-grad-norm, adds
Gaussian noise of std sigma C / sqrt(H) and sends the result through Flower's secure aggregation
(``secaggplus_mod``, unchanged), so that the coordinator sees only the sum over the sites. sigma is the noise
multiplier of the total noise (calibrated as for ``central``); H is the fewest sites' shares every sum holds, from
the site's own node config (``secure-aggregation-sites``): the noise of any H shares has variance sigma^2 C^2, the
full noise. The projection is nonexpansive, so one user still moves the sum by at most C: the sensitivity is
unchanged and the projection costs nothing in the analysis.

Range: Flower clips each coordinate to [-clipping_range, clipping_range] before quantising; with
clipping_range = R + 12 share stds (``clipping_range``), a coordinate (|projected sum| <= R) is clipped only when
its share noise exceeds 12 standard deviations: probability 3.6e-33 per coordinate, and the integer sum of the
sites cannot wrap modulo ``modulus_range`` (sites x quantization_range < modulus_range, checked here).

What is approximate: the analysis is that of the continuous Gaussian sum. Flower rounds each coordinate of each
share stochastically to a grid of step 2 clipping_range / quantization_range (about 4e-5 C with the defaults) and
clips as above; neither is covered by the accountant (Kairouz, Liu & Steinke, ICML 2021, analyse this exactly with
discrete Gaussian shares; Flower's quantiser is not theirs).

Trust: the secure sum hides a single site's share from a coordinator that follows the protocol, even with up to
T = K - threshold sites colluding with it, when T < threshold (checked here). Flower 1.41's SecAgg+ does not
defend against a coordinator that deviates from it (its unmask stage has no consistency check); this site
refuses an unmask request that names one site both alive and dropped (``secure_aggregation_mod``), which stops
the direct form of that attack, not every form. If the secure sum fails, what protects this site's users is its
own share's noise alone: the ledger records that fallback epsilon (``common.privacy.ledger``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Scalar, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.compat.common import recorddict_compat as compat

from client.dp_sgd import gaussian_noise, secret_generator
from client.public_errors import PublicInputError

HEADROOM_STDS = 12.0
"""Flower's clipping range lies this many share standard deviations beyond the bound on a site's sum."""
STATE_NAMES = "state-names"
SUM_NAMES = "sum-names"
"""FitIns config keys: the global state's names in the order of FitIns' arrays, and the names (and order) of the
vector each site replies (the trainable parameters): public, the model's architecture."""
NAME_SEPARATOR = ","
SCALARS = bool | bytes | float | int | str
"""What a legacy FitRes' metrics may hold."""
DISTRIBUTED_TRUST = (
    "Flower's secure aggregation (SecAgg+) and the other sites: this site added only a share of the noise (std "
    "noise_multiplier x max_grad_norm / sqrt(secure_aggregation_sites)); the epsilon holds if the coordinator saw "
    "only the sum over the sites and every sum held the shares of at least secure_aggregation_sites sites that did "
    "not collude with it. Flower's SecAgg+ is secure against a coordinator that follows the protocol, not one that "
    "deviates from it; if it failed, the fallback epsilon (this site's own share alone) is what holds"
)


def sum_bound(max_grad_norm: float, batch_size: int) -> float:
    """R: the public L2 radius a site's clipped sum is projected onto (the expected federation batch x C)."""
    return max_grad_norm * batch_size


def share_noise_multiplier(noise_multiplier: float, shares: int) -> float:
    """The multiplier of one site's share: any ``shares`` shares together carry the total noise's variance."""
    return noise_multiplier / math.sqrt(shares)


def clipping_range(max_grad_norm: float, batch_size: int, noise_multiplier: float, shares: int) -> float:
    """Flower's per-coordinate range: the sum's bound plus ``HEADROOM_STDS`` share standard deviations."""
    share_std = share_noise_multiplier(noise_multiplier, shares) * max_grad_norm
    return sum_bound(max_grad_norm, batch_size) + HEADROOM_STDS * share_std


def noise_share(
    clipped: Mapping[str, torch.Tensor],
    max_grad_norm: float,
    batch_size: int,
    noise_multiplier: float,
    shares: int,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """The site's release: its clipped sum projected onto the ball of radius ``sum_bound``, plus its noise share.

    With ``clipped`` all zeros (a site that declined) it is pure noise, which keeps the sum's noise full.
    """
    generator = generator or secret_generator(torch.device("cpu"))
    norm = math.sqrt(sum(float(tensor.double().pow(2).sum()) for tensor in clipped.values()))
    bound = sum_bound(max_grad_norm, batch_size)
    scale = 1.0 if norm <= bound else bound / norm
    std = share_noise_multiplier(noise_multiplier, shares) * max_grad_norm
    return {
        name: tensor.double() * scale + gaussian_noise(std, tensor.shape, generator, torch.float64)
        for name, tensor in clipped.items()
    }


def protocol_problem(protocol: Mapping[str, Any], shares: int, required_range: float) -> str:
    """Why this site will not send a share in the SecAgg+ round the coordinator set up; "" when it will.

    ``protocol`` is what Flower's ``secaggplus_mod`` kept from the coordinator's setup message. Public input only.
    """
    sites, threshold = int(protocol["sample_num"]), int(protocol["threshold"])
    if threshold < shares:
        return (
            f"declined: the coordinator's secure aggregation completes with as few as {threshold} of {sites} sites, "
            f"but this site's share assumes the shares of at least {shares} (node config secure-aggregation-sites)"
        )
    if sites - threshold >= threshold:
        return (
            f"declined: the coordinator's secure aggregation tolerates {sites - threshold} of {sites} sites missing, "
            f"as many as its reconstruction threshold {threshold}: that many colluding sites could unmask a share"
        )
    if sites * int(protocol["target_range"]) >= int(protocol["mod_range"]) or float(protocol["max_weight"]) != 1.0:
        return (
            "declined: the coordinator's secure aggregation could wrap around its modulus or rescale the shares "
            f"({sites} sites x quantization range {protocol['target_range']} vs modulus {protocol['mod_range']}, "
            f"max weight {protocol['max_weight']})"
        )
    if float(protocol["clipping_range"]) < required_range:
        return (
            f"declined: the coordinator's secure aggregation clips at {float(protocol['clipping_range']):g}, below "
            f"the {required_range:g} this site's share needs"
        )
    return ""


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``secaggplus_mod`` for the SecAgg+ messages of a ``distributed`` run; other messages go straight on.

    Refuses an unmask request that names one site both alive and dropped: answering it would give the coordinator
    both secrets of that site and so its unmasked vector.
    """
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    if msg.metadata.message_type != MessageType.TRAIN or configs is None:
        return call_next(msg, context)
    if configs.get(Key.STAGE) == Stage.UNMASK:
        alive, dead = configs.get(Key.ACTIVE_NODE_ID_LIST, []), configs.get(Key.DEAD_NODE_ID_LIST, [])
        both = {int(node) for node in alive} & {int(node) for node in dead}  # type: ignore[union-attr]
        if both:
            raise PublicInputError(
                f"secure aggregation: the coordinator names sites {sorted(both)} both alive and dropped"
            )
    return secaggplus_mod(msg, context, call_next)


def is_secure_round(msg: Message) -> bool:
    """Whether ``msg`` is the collect stage of a SecAgg+ round (legacy FitIns), not a Message-API train request."""
    return RECORD_KEY_CONFIGS in msg.content.config_records


SiteRound = Callable[
    [Mapping[str, Any], dict[str, torch.Tensor], list[str], Mapping[str, Any]],
    tuple[RecordDict, dict[str, torch.Tensor]],
]
"""client.app's distributed round: (config, global weights, names to sum, the protocol's parameters as the mod kept
them) -> (the reply's records, the vector to send)."""


def secure_reply(msg: Message, context: Context, site_round: SiteRound) -> Message:
    """The site's collect-stage reply: the legacy FitRes ``secaggplus_mod`` masks (weight 1, the site's vector)."""
    fit_ins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config: dict[str, Scalar] = dict(fit_ins.config)
    state_names = str(config.pop(STATE_NAMES, "")).split(NAME_SEPARATOR)
    sum_names = str(config.pop(SUM_NAMES, "")).split(NAME_SEPARATOR)
    arrays = parameters_to_ndarrays(fit_ins.parameters)
    if len(state_names) != len(arrays) or not set(sum_names) <= set(state_names):
        raise PublicInputError(
            f"secure aggregation: the coordinator's request names {len(state_names)} arrays for {len(arrays)} sent, "
            "or a summed name it did not send"
        )
    global_weights = {name: torch.from_numpy(array.copy()) for name, array in zip(state_names, arrays, strict=True)}
    protocol = dict(context.state.config_records[RECORD_KEY_STATE])
    records, vector = site_round(config, global_weights, sum_names, protocol)
    if list(vector) != sum_names:
        raise ValueError(f"secure aggregation: this site's vector names {list(vector)[:3]}..., not {sum_names[:3]}...")
    metrics: dict[str, Scalar] = {}
    records_read: list[Mapping[str, Any]] = [*records.metric_records.values(), *records.config_records.values()]
    for record in records_read:
        metrics.update({key: value for key, value in record.items() if isinstance(value, SCALARS)})
    fit_res = FitRes(
        Status(Code.OK, ""),
        ndarrays_to_parameters([np.asarray(value, dtype=np.float64) for value in vector.values()]),
        1,
        metrics,
    )
    return Message(compat.fitres_to_recorddict(fit_res, keep_input=False), reply_to=msg)
