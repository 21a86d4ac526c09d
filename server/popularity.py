"""The coordinator's side of the DP popularity floor: ask every site once before round 1, sum the noisy vectors.

Each site answers a Flower query message (``client.app.popularity``) with its
users' item popularity under Gaussian noise, charged in its own ledger
(``client.popularity``). The sum is post-processing of those releases, so
everything made from it costs nothing more:

- the initial model's output bias is the log of the (clipped, smoothed) noisy
  popularity, so a DP model starts at most-popular quality instead of random;
- the same distribution is saved beside the model (``POPULARITY_PRIOR_FILE``)
  as the cold-start prior serving and re-ranking use (``server.serving``).

Under ``noise = distributed`` the query is one secure sum (``secure_popularity``, Flower's SecAgg+ as for a round):
each site adds its share of the noise and the coordinator receives only the sum over the sites.

Under ``noise = central`` the sites send their sums without noise (each site's node config trusts the coordinator
with them) and the coordinator adds N(0, sigma^2) once to the sum over the sites, with sigma the largest any site
requires and never less than the run's own settings give (``central_popularity_mechanism``), before anything is kept:
only the noisy sum is saved.

A resumed run reads the saved sum instead of asking again.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from common.data.catalog import PADDING_INDEX, Catalog
from common.errors import DataError
from common.federation import RunSettings
from common.flower.sampling import connected_nodes
from common.flower.secaggplus_driver import SecureAggregation, secure_sum
from common.privacy.mechanisms import COORDINATOR, PLACEMENT_STATEMENTS, SITE
from common.privacy.mechanisms.gaussian import GaussianMechanism
from common.privacy.popularity import POPULARITY_ARRAY, popularity_mechanism, popularity_sum_bound
from common.protocol.records import NOISE_MULTIPLIER_METRIC, POPULARITY_TASK, POPULARITY_TASK_KEY
from common.protocol.round_plan import LocalTraining, PrivacyPlan, plan_round
from common.protocol.secure_sum import NAME_SEPARATOR, STATE_NAMES, SUM_NAMES, clipping_range
from common.recommender.model import SASRec
from common.run_files import site_order
from common.utils.files import load_torch, save_torch, write_json
from common.utils.progress import log
from common.utils.records import scalar
from server.strategy import root_cause

POPULARITY_PRIOR_FILE = "popularity_prior.pt"
"""[N + 1] probabilities from the sites' DP popularity releases: the output bias's start and the cold-start prior."""
POPULARITY_FILE = "popularity.json"
"""Who answered the popularity query, their epsilon after it, who declined and why."""
PRIOR_SMOOTHING = 1.0
"""Added to every item's clipped noisy count: one user's whole contribution, so no item's prior is 0."""


@dataclass
class PopularityFloor:
    """The summed release and what the replies said."""

    noisy_sum: torch.Tensor
    """[N + 1] the sum of the sites' noisy popularity vectors (padding 0)."""
    site_epsilon: dict[str, float] = field(default_factory=dict)
    sites: list[str] = field(default_factory=list)
    declined: dict[str, str] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    ledger_heads: dict[str, dict[str, int | str | None]] = field(default_factory=dict)
    central_noise_multiplier: float | None = None
    """``noise = central``: the multiplier of the one noise the coordinator added to the sum; None: the sites added
    theirs."""
    secure_sum: bool = False
    """``noise = distributed``: the sum came from Flower's secure aggregation, each site adding a share of the noise."""

    def prior(self) -> torch.Tensor:
        """[N + 1] probabilities: negative noisy counts clipped to 0, smoothed, padding 0."""
        counts = self.noisy_sum.double().clamp(min=0.0) + PRIOR_SMOOTHING
        counts[PADDING_INDEX] = 0.0
        return (counts / counts.sum()).float()

    def report(self, settings: RunSettings) -> dict[str, Any]:
        """The summary's account of the release: its share of the budget, each site's epsilon after it, and what it
        cost training (the noise multiplier with and without the release, at the site policy's defaults)."""
        training = LocalTraining.from_settings(settings)
        with_release = plan_round(training, PrivacyPlan.from_settings(settings)).noise_multiplier
        without = plan_round(training, replace(PrivacyPlan.from_settings(settings), popularity_share=0.0))
        central = self.central_noise_multiplier is not None
        added = (
            f"one noise (multiplier {self.central_noise_multiplier:.3f}) added by the coordinator to the sum over the "
            "sites" if central else "each site adding a share of the noise, the sum formed by Flower's secure "
            "aggregation" if self.secure_sum else "each site adding its own noise"
        )
        trust = PLACEMENT_STATEMENTS["central" if central else "distributed"] if central or self.secure_sum else None
        return {
            "mechanism": f"Gaussian sum of per-user item indicators scaled to L2 norm 1, before round 1, {added}",
            **({"trust": trust} if trust else {}),
            "share_of_target_epsilon": settings.popularity_share,
            "epsilon_alone": settings.popularity_share * settings.epsilon,
            "site_epsilon_after_release": self.site_epsilon,
            "training_noise_multiplier": with_release,
            "training_noise_multiplier_without_release": without.noise_multiplier,
            "sites": sorted(self.sites, key=site_order),  # in site order, not the order replies arrived in
            "declined": self.declined,
            "failures": self.failures,
            "statement": (
                f"The popularity release took {settings.popularity_share:.0%} of each site's target epsilon "
                f"{settings.epsilon:g} on its own; training's noise was calibrated so that the release and all "
                f"rounds together compose (PLD) to the target, which raised training's noise multiplier from "
                f"{without.noise_multiplier:.3f} to {with_release:.3f}. Its ledger line is the site's round 0."
            ),
        }


def request_popularity(grid: Grid, settings: RunSettings, run_id: str, catalog: Catalog) -> PopularityFloor:
    """Ask every connected site (at least ``min-sites``) for its release and sum the answers."""
    if settings.noise == "distributed":
        return secure_popularity(grid, settings, run_id, catalog)
    nodes = connected_nodes(grid, settings.min_sites)
    config = ConfigRecord({"run-id": run_id, "catalog-sha256": catalog.fingerprint(), "flwr-version": version("flwr")})
    messages = [
        Message(content=RecordDict({"config": config}), message_type=MessageType.QUERY, dst_node_id=node)
        for node in nodes
    ]
    floor = PopularityFloor(torch.zeros(catalog.num_items + 1))
    required: list[float] = []
    for reply in grid.send_and_receive(messages):
        if reply.has_error():
            floor.failures.append(f"node {reply.metadata.src_node_id}: {root_cause(reply.error.reason or '')}")
            continue
        site = str(reply.content["site"]["site-id"])
        metrics = reply.content["metrics"]
        floor.ledger_heads[site] = {"lines": int(scalar(metrics["ledger-lines"])),
                                    "hash": str(reply.content["site"].get("ledger-hash", "")) or None}
        if "epsilon" in metrics:
            floor.site_epsilon[site] = float(scalar(metrics["epsilon"]))
        if metrics["declined"]:
            floor.declined[site] = str(reply.content["site"]["reason"])
            continue
        vector = reply.content.array_records["arrays"].to_torch_state_dict()[POPULARITY_ARRAY].float()
        if vector.shape != floor.noisy_sum.shape or not bool(torch.isfinite(vector).all()):
            floor.failures.append(f"site {site}: a popularity vector of shape {tuple(vector.shape)} or not finite")
            continue
        if settings.noise == "central":
            if NOISE_MULTIPLIER_METRIC not in metrics:
                floor.failures.append(f"site {site}: a central popularity sum without the noise it requires")
                continue
            required.append(float(scalar(metrics[NOISE_MULTIPLIER_METRIC])))
        floor.noisy_sum += vector
        floor.sites.append(site)
    if settings.noise == "central" and floor.sites:
        mechanism = central_popularity_mechanism(settings, required)
        floor.central_noise_multiplier = mechanism.noise_multiplier
        # the aggregate half, once over the sum; its own secret generator: never a seed the sites could know
        floor.noisy_sum = mechanism.add_noise({POPULARITY_ARRAY: floor.noisy_sum}, COORDINATOR)[POPULARITY_ARRAY]
        floor.noisy_sum[PADDING_INDEX] = 0.0
    log(f"fedtail: popularity floor from {len(floor.sites)} site(s)"
        + (f"; declined: {', '.join(floor.declined)}" if floor.declined else "")
        + (f"; failed: {len(floor.failures)}" if floor.failures else ""))
    return floor


def secure_popularity(grid: Grid, settings: RunSettings, run_id: str, catalog: Catalog) -> PopularityFloor:
    """``noise = distributed``: the release as one SecAgg+ sum over the ``min-sites`` sites; a site that declines
    adds pure noise, so the sum keeps every site's share (``client.app.distributed_popularity``)."""
    widest = popularity_mechanism(settings.epsilon, settings.delta, settings.popularity_share, "distributed")
    bound = popularity_sum_bound(settings.batch_size, settings.sample_rate)
    protocol = SecureAggregation(  # a range wide enough for a share that assumes no other site's noise (shares 1)
        settings.min_sites, settings.secure_aggregation_tolerated, clipping_range(bound, widest.noise_std(SITE))
    )
    config = ConfigRecord({
        "run-id": run_id, "catalog-sha256": catalog.fingerprint(), "flwr-version": version("flwr"),
        STATE_NAMES: POPULARITY_ARRAY, SUM_NAMES: NAME_SEPARATOR.join([POPULARITY_ARRAY]),
        POPULARITY_TASK_KEY: POPULARITY_TASK,
    })
    request = ArrayRecord({POPULARITY_ARRAY: torch.zeros(catalog.num_items + 1)})
    outcome = secure_sum(grid, 0, request, config, protocol, [POPULARITY_ARRAY])
    floor = PopularityFloor(torch.zeros(catalog.num_items + 1), failures=list(outcome.failures), secure_sum=True)
    for metrics in outcome.site_metrics:
        site = str(metrics["site-id"])
        floor.ledger_heads[site] = {"lines": int(metrics["ledger-lines"]),
                                    "hash": str(metrics.get("ledger-hash", "")) or None}
        if "epsilon" in metrics:
            floor.site_epsilon[site] = float(metrics["epsilon"])
        if metrics["declined"]:
            floor.declined[site] = str(metrics.get("reason", ""))
        else:
            floor.sites.append(site)
    total = None if outcome.total is None else torch.from_numpy(outcome.total[POPULARITY_ARRAY]).float()
    if total is None or not bool(torch.isfinite(total).all()):
        floor.failures.append("the secure popularity sum did not complete or is not finite")
        floor.sites = []
        return floor
    floor.noisy_sum = total
    floor.noisy_sum[PADDING_INDEX] = 0.0
    log(f"fedtail: popularity floor from a secure sum over {len(outcome.site_metrics)} site(s)"
        + (f"; declined: {', '.join(floor.declined)}" if floor.declined else ""))
    return floor


def central_popularity_mechanism(settings: RunSettings, required: list[float]) -> GaussianMechanism:
    """The release's mechanism placed ``central``, its multiplier the largest any summed site requires, never less
    than the run's own settings give."""
    own = popularity_mechanism(settings.epsilon, settings.delta, settings.popularity_share, "central")
    return replace(own, noise_multiplier=max(own.noise_multiplier, *required))


def initialise_output_bias(model: SASRec, prior: torch.Tensor) -> None:
    """Output bias = log prior: with small initial weights the model's first ranking is the popularity ranking."""
    bias = model.output.bias
    with torch.no_grad():
        logs = prior.double().clamp(min=torch.finfo(torch.float32).tiny).log()
        logs[PADDING_INDEX] = logs[1:].min()
        bias.copy_(logs.to(bias.dtype))


def save_popularity(out_dir: Path, floor: PopularityFloor, settings: RunSettings) -> None:
    save_torch(out_dir / POPULARITY_PRIOR_FILE, floor.prior())
    write_json(out_dir / POPULARITY_FILE, {**asdict(floor), "noisy_sum": floor.noisy_sum.tolist(),
                                           "report": floor.report(settings)})


def load_popularity(out_dir: Path) -> PopularityFloor | None:
    """The floor a previous start of this run asked for, or None."""
    path = out_dir / POPULARITY_FILE
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        saved.pop("report", None)
        return PopularityFloor(**{**saved, "noisy_sum": torch.tensor(saved["noisy_sum"])})
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise DataError(f"cannot read the saved popularity floor: {error}", path) from None


def load_popularity_prior(model_dir: Path, num_items: int) -> torch.Tensor | None:
    """The DP popularity prior saved with a model, or None when the run had no popularity floor."""
    path = model_dir / POPULARITY_PRIOR_FILE
    if not path.exists():
        return None
    prior = load_torch(path, "the popularity prior")
    if not isinstance(prior, torch.Tensor) or prior.shape != (num_items + 1,) or not bool(torch.isfinite(prior).all()):
        raise DataError(f"expected a [{num_items + 1}] tensor of finite item probabilities", path)
    return prior
