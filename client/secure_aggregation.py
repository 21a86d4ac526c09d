"""``noise = distributed`` at a site: its share of the noise, the value range, and its part in Flower's SecAgg+.

Mechanism (one DP step per round, as ``central``; the Gaussian mechanism of ``common.privacy.mechanisms.gaussian``
placed ``distributed``): every site sums its Poisson-sampled users' clipped gradients (``client.clipped_sum``, the
individual half), projects that sum onto the L2 ball of public radius R = batch-size x max-grad-norm, adds its share
of the aggregate half, Gaussian noise of std sigma C / sqrt(H), and sends the result through Flower's secure aggregation
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

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message, RecordDict

from client.public_errors import PublicInputError
from common.flower.mods import ClientAppCallable
from common.flower.secaggplus_site import (
    fit_ins,
    fit_res_reply,
    is_secaggplus_train,
    protocol_state,
    secaggplus_mod,
    unmask_node_ids,
)
from common.privacy.mechanisms import SITE
from common.privacy.mechanisms.gaussian import GaussianMechanism, project
from common.protocol.secure_sum import NAME_SEPARATOR, STATE_NAMES, SUM_NAMES


def noise_share(
    clipped: Mapping[str, torch.Tensor],
    mechanism: GaussianMechanism,
    radius: float,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """The site's release (float64): its clipped sum projected onto the ball of public ``radius``, plus its share of
    ``mechanism``'s noise (placed ``distributed``).

    With ``clipped`` all zeros (a site that declined) it is pure noise, which keeps the sum's noise full.
    """
    if mechanism.placement != "distributed":
        raise ValueError(f"a noise share belongs to a distributed mechanism, not one placed '{mechanism.placement}'")
    return mechanism.add_noise(project(clipped, radius), SITE, generator)


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``secaggplus_mod`` for the SecAgg+ messages of a ``distributed`` run; other messages go straight on.

    Refuses an unmask request that names one site both alive and dropped: answering it would give the coordinator
    both secrets of that site and so its unmasked vector.
    """
    if not is_secaggplus_train(msg):
        return call_next(msg, context)
    named = unmask_node_ids(msg)
    if named is not None:
        both = named[0] & named[1]
        if both:
            raise PublicInputError(
                f"secure aggregation: the coordinator names sites {sorted(both)} both alive and dropped"
            )
    return secaggplus_mod(msg, context, call_next)


SiteRound = Callable[
    [Mapping[str, Any], dict[str, torch.Tensor], list[str], Mapping[str, Any]],
    tuple[RecordDict, dict[str, torch.Tensor]],
]
"""client.app's distributed round: (config, global weights, names to sum, the protocol's parameters as the mod kept
them) -> (the reply's records, the vector to send)."""


def secure_reply(msg: Message, context: Context, site_round: SiteRound) -> Message:
    """The site's collect-stage reply: the legacy FitRes ``secaggplus_mod`` masks (weight 1, the site's vector)."""
    config, arrays = fit_ins(msg)
    state_names = str(config.pop(STATE_NAMES, "")).split(NAME_SEPARATOR)
    sum_names = str(config.pop(SUM_NAMES, "")).split(NAME_SEPARATOR)
    if len(state_names) != len(arrays) or not set(sum_names) <= set(state_names):
        raise PublicInputError(
            f"secure aggregation: the coordinator's request names {len(state_names)} arrays for {len(arrays)} sent, "
            "or a summed name it did not send"
        )
    global_weights = {name: torch.from_numpy(array.copy()) for name, array in zip(state_names, arrays, strict=True)}
    protocol = protocol_state(context)
    records, vector = site_round(config, global_weights, sum_names, protocol)
    if list(vector) != sum_names:
        raise ValueError(f"secure aggregation: this site's vector names {list(vector)[:3]}..., not {sum_names[:3]}...")
    metrics: dict[str, Any] = {}
    records_read: list[Mapping[str, Any]] = [*records.metric_records.values(), *records.config_records.values()]
    for record in records_read:
        metrics.update(record)
    return fit_res_reply(msg, [np.asarray(value, dtype=np.float64) for value in vector.values()], metrics)
