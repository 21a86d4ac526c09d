"""What a site decides for itself: its node config's privacy settings, and its checks of a coordinator's request.

The coordinator (the server side: run config, global weights, every message)
may be curious or malicious, so everything it sends is hostile input. A run
config can *ask* (dp, delta, epsilon, model shape); the site's own node config
*decides*. Every check here reads public input only (the node config, the run
config, the incoming weights) and runs before any private data is read, so a
refusal says nothing about the site's users.

Node config keys (deployment: ``flower-supernode --node-config``; simulation:
the file ``fedtail simulate`` writes for its simulated sites, see
``simulated_node_config``):

- ``max-epsilon``: the site's epsilon budget over all runs on its users (its lifetime cap);
- ``window-epsilon``: the most one run (a lifelong run's time window) may spend; with it a run
  asking more is declined, and a run whose remaining rounds would cross ``max-epsilon`` is declined whole, at
  its first round, instead of training part of the window (``client.site_round``). A deployed site that does
  not set it gets ``DEPLOYED_WINDOW_SHARE`` of its ``max-epsilon``; ``window-epsilon = 0`` turns the cap off.
  Simulated sites keep 0 (off) unless their node config sets it;
- ``delta``: the site's delta: the noise is calibrated, the ledger composes,
  the budget is checked and replies state epsilon at this delta; a run asking
  another delta is declined (a larger one would make past spending look
  smaller, and one delta per site keeps ledger, replies and audit in step);
- ``allow-non-private``: whether this site ever trains without DP (default
  false: a run with ``dp = false`` is declined);
- ``max-abs-weight``: the largest weight magnitude accepted from the
  coordinator; with it the forward pass provably stays finite
  (``common.recommender.model.activation_bound``);
- ``fedavg-weight``: the public weight of this site's update in FedAvg (the
  exact user count is never sent);
- ``trust-coordinator-noise``: whether this site trains under ``noise =
  central`` (default false: such a run is declined). It then sends the
  coordinator the *un-noised* sum of its users' clipped gradients and relies
  on the coordinator to add the noise: against the coordinator itself, that
  release is not private;
- ``trust-secure-aggregation``: whether this site trains under ``noise =
  distributed`` (default false: such a run is declined): it then adds its share
  of the noise to its sum and relies on Flower's SecAgg+ to show the
  coordinator only the sum over the sites (``client.secure_aggregation``);
- ``secure-aggregation-sites``: under ``distributed``, the fewest sites whose
  noise shares the site assumes every sum holds (the federation's sites less
  those that may drop out or collude); its share carries 1 / that of the noise
  variance, and it declines a protocol whose threshold allows fewer. Default 1:
  a full noise of its own (no gain, no assumption).
- ``max-fallback-epsilon``: under ``distributed``, the most the site's fallback epsilon (what its own noise
  shares alone are worth if secure aggregation failed: ``common.privacy.fallback``) may reach; a release that
  would pass it is declined before anything is released. Default: ``max-epsilon`` (a site that accepts a weaker
  guarantee should secure aggregation fail says so, up to ``inf``).

Run-config ranges. Every run-config value that shapes what the site computes
is checked against a range before any private data is read
(``run_range_problems``, called by ``SitePolicy.decline_reason``); a value
outside is declined with its key, its value and the range, all public (the
coordinator sent the value, the site's operator chose the range). Each range
is declared once, in ``RUN_RANGES``; the node config sets either end with
``min-KEY`` and ``max-KEY``, KEY being the run-config key (``max-learning-rate``,
``min-sample-rate``, and for the clipping norm ``max-max-grad-norm``), to narrow
it or, at the operator's own choice, widen it. Ends are inclusive; the run
config's own rules still apply (a learning rate is positive, a sample rate in
(0, 1]). The defaults, which every setting the documentation and the
simulations use passes:

- ``learning-rate`` [0, 0.1]: the site's Adam step size;
- ``local-epochs`` [0, 100];
- ``local-steps`` [1, 10000]: not a run-config key but what the run asks for, the
  DP-SGD steps of a round (``common.federation.steps_per_round``: ceil(local-epochs
  / sample-rate), 1 under ``noise = central`` or ``distributed``);
- ``sample-rate`` [0, 1];
- ``batch-size`` [1, 100000];
- ``max-grad-norm`` [0, 100]: the clipping norm C;
- ``max-len`` [1, 1024], ``hidden`` [1, 1024], ``heads`` [1, 64], ``blocks`` [1, 16],
  ``dropout`` [0, 0.9]: the model's shape;
- ``popularity-share`` [0, 0.9]: the share of epsilon spent on the popularity release;
- ``user-steps`` [1, 100], ``user-learning-rate`` [0, 10]: under ``user-update = delta``,
  each sampled user's local SGD steps and their step size (``client.delta_sum``); the
  steps bound a round's compute, the clip bounds what a user adds whatever they are.

The ranges keep a run within what the site meant to run; what keeps every
forward pass finite is the weight box, ``max-abs-weight``, which holds on
arrival (``incoming_weights_problem``) and after every local step
(``client.dp_sgd.bounded_adam``), whatever the learning rate.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.errors import ConfigError
from common.federation import RunSettings, steps_per_round
from common.protocol.round_plan import DEFAULT_MAX_ABS_WEIGHT
from common.recommender.model import activation_bound

SIMULATED_SITES_ENV = "FEDTAIL_SIMULATED_SITES"
"""Path of the JSON file with each simulated site's node config (Flower's simulation sets only the partition)."""
SAFE_ACTIVATION = 1e36
"""Largest magnitude ``activation_bound`` may give (it already counts the LayerNorm's sums of squares and the
attention scores): a factor of 300 below float32's largest value, for rounding."""
DEPLOYED_WINDOW_SHARE = 0.5
"""A deployed site's ``window-epsilon`` when its node config does not set one, as a share of its ``max-epsilon``.
Whoever can submit a run chooses its ``epsilon`` (with the approved app, what the run spends); capped at half the
budget, no single run, mistaken, legitimate or not, spends more than half of it."""
RUN_RANGES: dict[str, tuple[float, float]] = {
    "learning-rate": (0.0, 0.1),
    "local-epochs": (0.0, 100.0),
    "local-steps": (1, 10_000),
    "sample-rate": (0.0, 1.0),
    "batch-size": (1, 100_000),
    "max-grad-norm": (0.0, 100.0),
    "max-len": (1, 1024),
    "hidden": (1, 1024),
    "heads": (1, 64),
    "blocks": (1, 16),
    "dropout": (0.0, 0.9),
    "popularity-share": (0.0, 0.9),
    "user-steps": (1, 100),
    "user-learning-rate": (0.0, 10.0),
}
"""The default range of each run-config value the site checks (inclusive); node config ``min-KEY`` / ``max-KEY``."""


@dataclass(frozen=True)
class SitePolicy:
    max_epsilon: float = 8.0
    delta: float = 1e-5
    allow_non_private: bool = False
    max_abs_weight: float = DEFAULT_MAX_ABS_WEIGHT
    run_ranges: Mapping[str, tuple[float, float]] = field(default_factory=lambda: dict(RUN_RANGES))
    """Each checked run-config key's (lowest, highest) allowed value: ``RUN_RANGES`` with the node config's ends."""
    fedavg_weight: float = 1.0
    window_epsilon: float = 0.0
    """0: off (a run may spend up to what is left of max-epsilon, round by round)."""
    trust_coordinator_noise: bool = False
    trust_secure_aggregation: bool = False
    secure_aggregation_sites: float = 1.0
    max_fallback_epsilon: float | None = None
    """None: max-epsilon (``fallback_cap``)."""

    def __post_init__(self) -> None:
        problems = [
            f"max-epsilon={self.max_epsilon}: must be positive and finite"
            * (not (math.isfinite(self.max_epsilon) and self.max_epsilon > 0)),
            f"delta={self.delta}: must be in (0, 1)" * (not 0 < self.delta < 1),
            f"max-abs-weight={self.max_abs_weight}: must be positive and finite"
            * (not (math.isfinite(self.max_abs_weight) and self.max_abs_weight > 0)),
            f"fedavg-weight={self.fedavg_weight}: must be positive and finite"
            * (not (math.isfinite(self.fedavg_weight) and self.fedavg_weight > 0)),
            f"window-epsilon={self.window_epsilon}: must be 0 (off) or in (0, max-epsilon={self.max_epsilon}]"
            * (not 0 <= self.window_epsilon <= self.max_epsilon),
            f"secure-aggregation-sites={self.secure_aggregation_sites}: must be a whole number, at least 1"
            * (not (self.secure_aggregation_sites >= 1 and float(self.secure_aggregation_sites).is_integer())),
            f"max-fallback-epsilon={self.max_fallback_epsilon}: must be positive (inf: no cap)"
            * (self.max_fallback_epsilon is not None and not self.max_fallback_epsilon > 0),
        ]
        problems += [
            f"min-{key}={lower:g}, max-{key}={upper:g}: must be numbers, the first at most the second"
            for key, (lower, upper) in self.run_ranges.items()
            if not lower <= upper
        ]
        problems = [problem for problem in problems if problem]
        if problems:
            raise ConfigError("node config: " + "; ".join(problems))

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any], deployed: bool) -> SitePolicy:
        """The site's settings; a deployed site must state its budget and caps each run at a share of it unless it
        sets ``window-epsilon``; a simulated one may take the defaults (so simulations keep their results)."""
        if deployed and "max-epsilon" not in node_config:
            raise ConfigError("node config 'max-epsilon' (this site's privacy budget) is required on a deployed site")
        values: dict[str, Any] = {}
        for name, declared in cls.__dataclass_fields__.items():
            key = name.replace("_", "-")
            if key in node_config and name != "run_ranges":
                values[name] = _typed(key, node_config[key], str(declared.type))
        ends = {f"{end}-{key}" for key in RUN_RANGES for end in ("min", "max")}
        unknown = sorted(
            key for key in node_config
            if key.startswith(("min-", "max-")) and key not in ends and key.replace("-", "_") not in values
        )
        if unknown:
            raise ConfigError(
                f"node config {unknown}: unknown range keys; a run-config range is set with min-KEY or max-KEY "
                f"for KEY one of {', '.join(RUN_RANGES)}"
            )
        values["run_ranges"] = {
            key: tuple(_typed(f"{end}-{key}", node_config.get(f"{end}-{key}", default), "float")
                       for end, default in zip(("min", "max"), bounds, strict=True))
            for key, bounds in RUN_RANGES.items()
        }
        if deployed and "window-epsilon" not in node_config:
            values["window_epsilon"] = values["max_epsilon"] * DEPLOYED_WINDOW_SHARE
        return cls(**values)

    @property
    def fallback_cap(self) -> float:
        """The most the ledger's fallback epsilon may reach (``max-fallback-epsilon``, else ``max-epsilon``)."""
        return self.max_epsilon if self.max_fallback_epsilon is None else self.max_fallback_epsilon

    def decline_reason(self, settings: RunSettings) -> str:
        """Why this site will not train the round the run asks for; "" when it will. Public input only."""
        if not settings.dp and not self.allow_non_private:
            return (
                "declined: the run asks for training without differential privacy (dp = false); this site's "
                "node config does not allow it (allow-non-private = false)"
            )
        if settings.noise == "central" and not self.trust_coordinator_noise:
            return (
                "declined: the run asks for noise = central, where this site would send the coordinator the sum of "
                "its users' clipped gradients WITHOUT noise and trust it to add the noise; this site's node config "
                "does not trust the coordinator with that (trust-coordinator-noise = false)"
            )
        if settings.noise == "distributed" and not self.trust_secure_aggregation:
            return (
                "declined: the run asks for noise = distributed, where this site would add only a share of the noise "
                "and rely on Flower's secure aggregation (SecAgg+) to show the coordinator nothing but the sum over "
                "the sites; this site's node config does not trust that protocol (trust-secure-aggregation = false)"
            )
        if settings.dp and settings.delta != self.delta:
            return (
                f"declined: the run asks delta={settings.delta:g}; this site's budget, ledger and replies are at its "
                f"own delta={self.delta:g} (node config), and a larger delta would make its past spending look "
                "smaller; ask for the site's delta"
            )
        if settings.dp and self.window_epsilon and settings.epsilon > self.window_epsilon:
            return (
                f"declined: the run asks epsilon={settings.epsilon:g} for this window; this site spends at most "
                f"window-epsilon={self.window_epsilon:g} per run (node config)"
            )
        bound = activation_bound(settings.model_config(1), self.max_abs_weight)
        if not bound < SAFE_ACTIVATION:
            return (
                f"declined: with weights up to max-abs-weight={self.max_abs_weight:g}, a model of hidden="
                f"{settings.hidden}, blocks={settings.blocks}, dropout={settings.dropout:g} could overflow in its "
                "forward pass; ask for a smaller model or a site with a lower max-abs-weight"
            )
        outside = run_range_problems(settings, self.run_ranges)
        if outside:
            return "declined: " + "; ".join(outside)
        return ""


def run_range_problems(settings: RunSettings, ranges: Mapping[str, tuple[float, float]]) -> list[str]:
    """Each checked run-config value outside the site's range, with the value and the range (all public)."""
    values = _checked_values(settings)
    return [
        f"the run asks {key}={values[key]:g}, outside this site's range [{lower:g}, {upper:g}] "
        f"(node config min-{key}, max-{key})"
        for key, (lower, upper) in ranges.items()
        if not lower <= values[key] <= upper
    ]


def ranges_admitting(settings: RunSettings) -> dict[str, float]:
    """The node-config ends that widen the default ranges just enough for this run's own values.

    For simulated sites, whose operator is the one who chose the run (``fedtail simulate``), as their budget
    follows the run's epsilon; a deployed site keeps the defaults unless its operator sets these keys.
    """
    values = _checked_values(settings)
    ends = {f"min-{key}": values[key] for key, (lower, _) in RUN_RANGES.items() if values[key] < lower}
    return ends | {f"max-{key}": values[key] for key, (_, upper) in RUN_RANGES.items() if values[key] > upper}


def _checked_values(settings: RunSettings) -> dict[str, float]:
    try:
        steps: float = steps_per_round(settings.noise, settings.local_epochs, settings.sample_rate)
    except OverflowError:  # local-epochs / sample-rate beyond float's range: more steps than any range allows
        steps = math.inf
    run_config = settings.to_run_config()
    return {key: steps if key == "local-steps" else run_config[key] for key in RUN_RANGES}


def _typed(key: str, value: Any, kind: str) -> Any:
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"node config {key}={value!r}: expected true or false")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"node config {key}={value!r}: expected a number") from None


def incoming_weights_problem(state_dict: Mapping[str, torch.Tensor], policy: SitePolicy) -> str:
    """Why the coordinator's global weights are refused; "" when they are acceptable. Public input only.

    Non-finite weights, or weights large enough to overflow, would make the
    forward pass non-finite for exactly the users whose history touches them
    (an input-embedding row, a position only long histories reach), and a
    non-finite forward pass poisons the clipped sum for everyone. Bounding
    every weight keeps every user's forward pass finite (``activation_bound``),
    so per-user clipping can exclude a user whose gradient alone is not finite.
    """
    for name, tensor in state_dict.items():
        if not torch.is_floating_point(tensor):
            continue
        if not bool(torch.isfinite(tensor).all()):
            return f"refused: the coordinator's weights hold non-finite values in '{name}'"
        largest = float(tensor.abs().max()) if tensor.numel() else 0.0
        if largest > policy.max_abs_weight:
            return (
                f"refused: the coordinator's weights hold |w| = {largest:.3g} in '{name}', above this site's "
                f"max-abs-weight={policy.max_abs_weight:g}"
            )
    return ""


def simulated_node_config(partition_id: int) -> dict[str, Any]:
    """The node config a simulated site would have had from its operator: ``fedtail simulate`` writes it.

    Flower's Simulation Engine gives a ClientApp only its partition; the rest
    comes from a file named by an environment variable that the simulation's
    own launcher sets (never from the run config, which the coordinator writes).
    Without that file (a bare ``flwr run``), the site policy's defaults apply.
    """
    path = os.environ.get(SIMULATED_SITES_ENV, "")
    if not path:
        return {}
    try:
        sites = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(
            f"{SIMULATED_SITES_ENV}={path}: cannot read the simulated sites' node config ({error})"
        ) from None
    return dict(sites.get(str(partition_id), {}))
