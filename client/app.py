"""fedtail's ClientApp: one site's local DP training per round, and its DP popularity release before round 1.

The handler only reads configuration and translates between Flower records
and the plain functions in ``client.site_round`` and ``client.shard``.

Node config (what the site decides, never the coordinator):

- simulation: ``partition-id`` / ``num-partitions`` (set by Flower), the rest
  from the file ``fedtail simulate`` writes for its simulated sites;
- deployment: ``data-path`` (the site's interaction file), ``catalog-path``
  (the public catalogue), ``ledger-dir``, optional ``site-id``;
- both: the site's privacy settings (``client.policy``: ``max-epsilon``,
  ``delta``, ``allow-non-private``, ``max-abs-weight``, ``fedavg-weight``).

Before reading any private data the site checks, on public input alone,
that the run asks nothing its policy forbids and that the coordinator's
weights are finite and bounded; otherwise it declines and says why.
Whatever fails, the coordinator reads only a fixed code and a public reason
(``client.public_errors``). Under ``noise = distributed`` the site's share
leaves it only inside a SecAgg+ exchange; a plain message is declined.

Under ``noise = central`` the site trains only if its node config trusts the
coordinator to add the noise; its reply then holds the round's un-noised sum of
clipped per-user gradients in place of weights, and the noise multiplier of the
total noise its epsilon assumes (``noise-multiplier``).

A reply holds only: the trained weights, the site's id, its epsilon so far,
whether it trained with DP, the declared weight, when it declines, why, and
its ledger's head after the round (line count and the last line's hash, a
hiding commitment: see ``common.privacy.ledger``), which the coordinator records so
that an auditor can later tell a rewritten or cut-off ledger. The one query a
run may send before round 1 (``popularity``) is answered the same way, with the
site's noisy popularity vector in place of weights (``client.popularity``; under
``noise = central`` its un-noised sum and the noise multiplier the coordinator must add).
"""

from __future__ import annotations

import logging
import re
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.catalog_memory import check_extends_trained, remember_trained
from client.policy import SitePolicy, incoming_weights_problem, simulated_node_config
from client.popularity import release_site_popularity
from client.public_errors import PublicInputError, public_errors_mod
from client.secure_aggregation import noise_share, secure_aggregation_mod, secure_reply
from client.shard import SiteShard, deployed_shard, simulated_shard
from client.site_round import RoundOutcome, library_versions, train_site_round
from common.data.catalog import Catalog
from common.errors import ConfigError, DataError
from common.federation import RunSettings
from common.flower.packed_content import packed_content_mod
from common.flower.secaggplus_site import is_secure_round
from common.privacy.ledger import Ledger
from common.privacy.mechanisms import SITE
from common.privacy.mechanisms.gaussian import GaussianMechanism
from common.privacy.popularity import POPULARITY_ARRAY, popularity_mechanism, popularity_sum_bound
from common.protocol.records import NOISE_MULTIPLIER_METRIC, POPULARITY_TASK, POPULARITY_TASK_KEY, WEIGHT_METRIC
from common.protocol.round_plan import LocalTraining, PrivacyPlan, plan_round, round_mechanism
from common.protocol.secure_sum import clipping_range, protocol_problem, sum_bound
from common.recommender.item_tables import apply_item_tables
from common.recommender.model import SASRec
from common.recommender.training import pick_device
from common.run_files import LEDGER_DIR, site_ledger
from common.utils import timeline
from common.utils.progress import log
from common.utils.records import scalar

app = ClientApp(mods=[public_errors_mod, packed_content_mod, secure_aggregation_mod])
"""``public_errors_mod`` first, so that it answers a failure anywhere below it; each mod passes on what is not its own
unchanged."""
logger = logging.getLogger("fedtail.client")

LEDGER_HEAD = "ledger-head"
SHARE_ONLY_IN_SECURE_AGGREGATION = (
    "declined: the run asks for noise = distributed, where this site sends its noise share only inside a secure "
    "aggregation (SecAgg+) exchange, and this message is not one"
)
TRAINING_TIME = re.compile(r"fedtail-site (?P<site>\S+) round (?P<round>\d+): local training (?P<seconds>[\d.]+)s")
"""The site's own log line per round: for its operator, and the benchmark's measure of pure training time.
Not "fedtail:"-prefixed, so `fedtail simulate` keeps it in flower.log instead of echoing one line per site."""


@dataclass(frozen=True)
class Site:
    """Who this site is and what it decided, known before any private data is read (``load_shard`` reads it)."""

    site_id: str
    ledger: Ledger
    policy: SitePolicy
    load_shard: Callable[[], SiteShard]


def site_from_context(node_config: dict, settings: RunSettings) -> Site:
    """Who this site is, from the node config (simulation or deployment); the run config only says what is asked."""
    if "partition-id" in node_config:
        partition, partitions = int(node_config["partition-id"]), int(node_config["num-partitions"])
        node_config = {**simulated_node_config(partition), **node_config}
        if "ledger-dir" not in node_config and not settings.out_dir:
            raise ConfigError("run config out-dir is required in simulation (where site ledgers are kept)")
        ledger_dir = Path(str(node_config.get("ledger-dir") or Path(settings.out_dir) / LEDGER_DIR))
        site_id = str(partition)

        def load_shard() -> SiteShard:
            return simulated_shard(
                settings.dataset, settings.kcore, settings.partitioning, settings.seed, partition, partitions,
                settings.max_len, str(node_config.get("catalog-path", "")),
            )
    else:
        for key in ("data-path", "catalog-path", "ledger-dir"):
            if key not in node_config:
                raise ConfigError(f"node config '{key}' is required on a deployed site")
        ledger_dir = Path(str(node_config["ledger-dir"]))
        site_id = str(node_config.get("site-id", Path(str(node_config["data-path"])).stem))

        def load_shard() -> SiteShard:
            return deployed_shard(str(node_config["data-path"]), str(node_config["catalog-path"]), settings.max_len)
    policy = SitePolicy.from_node_config(node_config, deployed="partition-id" not in node_config)
    return Site(site_id, Ledger(site_ledger(ledger_dir, site_id)), policy, load_shard)


def reply_content(outcome: RoundOutcome, site: Site, dp: bool) -> RecordDict:
    lines, head_hash = site.ledger.public_head()
    metrics = MetricRecord(
        {WEIGHT_METRIC: site.policy.fedavg_weight, "dp": int(dp), "declined": int(outcome.state_dict is None),
         "ledger-lines": lines}
    )
    if dp:
        metrics["epsilon"] = outcome.epsilon
    site_fields = ConfigRecord({"site-id": site.site_id, "ledger-hash": head_hash})
    content = RecordDict({"metrics": metrics, "site": site_fields})
    if outcome.state_dict is None:
        site_fields["reason"] = outcome.declined_reason
    else:
        content["arrays"] = ArrayRecord(outcome.state_dict)
    return content


def check_ledger_continuity(state: RecordDict, ledger: Ledger) -> None:
    """The ledger must still start with what it held after this site's last round in this run.

    A hash chain cannot show that its last lines were removed; the head
    remembered in Flower's context state (kept between rounds of a run) can.
    """
    if LEDGER_HEAD in state:
        head = state.config_records[LEDGER_HEAD]
        entries = int(scalar(head["entries"]))
        if not ledger.continues(entries, str(head["hash"])):
            raise DataError(
                f"the ledger lost or changed entries since the last round (it held {entries}); "
                "refusing to train on an understated privacy history",
                ledger.path,
            )


def run_settings(context: Context) -> RunSettings:
    """The run's settings; a run config they refuse is the coordinator's public input, so the reason may say so."""
    try:
        return RunSettings.from_run_config(context.run_config)
    except ConfigError as error:
        raise PublicInputError(str(error)) from None


def check_coordinator(config: Mapping[str, Any], catalog: Catalog) -> None:
    """Refuse a round from a coordinator on another Flower version or catalogue, before loading its weights.

    Weights for another catalogue would load whenever the sizes agree, and
    then score the wrong items without any error.
    """
    theirs, mine = str(config.get("flwr-version", "unknown")), library_versions()["flwr"]
    if theirs != mine:
        raise PublicInputError(
            f"Flower version mismatch: the coordinator runs flwr {theirs}, this site flwr {mine}; "
            "install the same version on both sides"
        )
    if str(config.get("catalog-sha256", "")) != catalog.fingerprint():
        raise PublicInputError(
            f"catalogue mismatch: this site's catalogue ({catalog.num_items} items, sha256 "
            f"{catalog.fingerprint()[:12]}) is not the coordinator's "
            f"(sha256 {str(config.get('catalog-sha256'))[:12]}); "
            "every site needs the coordinator's catalog.json"
        )


def remember_ledger_head(state: RecordDict, ledger: Ledger) -> None:
    entries, last_hash = ledger.head()
    state[LEDGER_HEAD] = ConfigRecord({"entries": entries, "hash": last_hash})


@app.train()
def train(msg: Message, context: Context) -> Message:
    if is_secure_round(msg):  # noise = distributed: the collect stage of Flower's SecAgg+, in legacy records
        return secure_reply(msg, context, partial(distributed_round, context))
    config = msg.content.config_records["config"]
    content, _, _ = site_round(context, config, msg.content.array_records["arrays"].to_torch_state_dict())
    return Message(content, reply_to=msg)


def outside_secure_aggregation(_policy: SitePolicy, settings: RunSettings) -> str:
    """A plain message (no SecAgg+ stages): under ``noise = distributed`` the site's noise share would leave it in
    the clear, with 1 / ``secure-aggregation-sites`` of the noise its epsilon assumes, so it is declined."""
    return SHARE_ONLY_IN_SECURE_AGGREGATION if settings.noise == "distributed" else ""


def site_round(
    context: Context,
    config: Mapping[str, Any],
    global_weights: dict[str, torch.Tensor],
    protocol_refusal: Callable[[SitePolicy, RunSettings], str] = outside_secure_aggregation,
) -> tuple[RecordDict, RoundOutcome, Site]:
    """One round at this site from the coordinator's config and weights: the reply's records, the outcome, the site.

    ``protocol_refusal`` adds a reason to decline, decided like the others on public input before any data is read:
    the SecAgg+ exchange's own checks inside one (``distributed_round``), else ``outside_secure_aggregation``.
    """
    timeline.reset()
    entered = time.time()
    settings = run_settings(context)
    site = site_from_context(dict(context.node_config), settings)
    check_ledger_continuity(context.state, site.ledger)
    round_number = int(scalar(config["server-round"]))
    refusal = (
        site.policy.decline_reason(settings)
        or incoming_weights_problem(global_weights, site.policy)
        or protocol_refusal(site.policy, settings)
    )
    if refusal:  # decided on public input alone, before the site's data is read
        spent = site.ledger.epsilon(site.policy.delta)
        logger.warning("site %s round %d: %s", site.site_id, round_number, refusal)
        declined = RoundOutcome(None, spent, refusal)
        return reply_content(declined, site, settings.dp), declined, site
    with timeline.stage("data"):
        shard = site.load_shard()
    check_coordinator(config, shard.catalog)
    check_extends_trained(site.ledger.path, shard.catalog)
    model = SASRec(settings.model_config(shard.catalog.num_items))
    model.load_state_dict(global_weights)
    apply_item_tables(model, settings.item_tables)  # before Opacus wraps the model: it never sees frozen tables
    started = time.perf_counter()
    outcome = train_site_round(
        model,
        shard.examples,
        LocalTraining.from_settings(settings, site.policy),
        PrivacyPlan.from_settings(settings, site.policy),
        site.ledger,
        run_id=str(config["run-id"]),
        round_number=round_number,
        site=site.site_id,
        device=pick_device(),
        seed=settings.seed * 1_000_003 + round_number * 1_009 + zlib.crc32(site.site_id.encode()) % 1_000,
    )
    training_s = time.perf_counter() - started
    log(f"fedtail-site {site.site_id} round {round_number}: local training {training_s:.3f}s")
    timeline.emit("site-trained", round=round_number, entered=entered, training=training_s, **timeline.durations())
    remember_ledger_head(context.state, site.ledger)
    if outcome.state_dict is not None:
        remember_trained(site.ledger.path, shard.catalog)
    content = reply_content(outcome, site, settings.dp)
    if outcome.state_dict is None:
        logger.warning("site %s round %d: %s", site.site_id, round_number, outcome.declined_reason)
    elif not settings.dp:
        logger.warning("site %s round %d: NON-PRIVATE update sent (dp = false)", site.site_id, round_number)
    elif settings.noise in ("central", "distributed"):  # the total noise its epsilon assumes (public: settings alone)
        plan = plan_round(LocalTraining.from_settings(settings), PrivacyPlan.from_settings(settings, site.policy))
        content.metric_records["metrics"][NOISE_MULTIPLIER_METRIC] = plan.noise_multiplier
    return content, outcome, site


def distributed_round(
    context: Context,
    config: Mapping[str, Any],
    global_weights: dict[str, torch.Tensor],
    sum_names: list[str],
    protocol: Mapping[str, Any],
) -> tuple[RecordDict, dict[str, torch.Tensor]]:
    """``noise = distributed``: the round, and the vector to mask: the noisy share, or pure noise when declined
    (so that every sum keeps the noise of every site in it, whatever it trained). The popularity floor's secure
    sum comes the same way (``distributed_popularity``)."""
    if config.get(POPULARITY_TASK_KEY) == POPULARITY_TASK:
        return distributed_popularity(context, config, global_weights, sum_names, protocol)

    def share_mechanism(policy: SitePolicy, settings: RunSettings) -> GaussianMechanism:
        """The round's mechanism as this SecAgg+ stage runs it: placed ``distributed`` whatever the run config says
        (a site that declines still sends its pure-noise share)."""
        privacy = PrivacyPlan.from_settings(settings, policy)
        mechanism = round_mechanism(privacy, plan_round(LocalTraining.from_settings(settings), privacy))
        return replace(mechanism, placement="distributed")

    def refusal(policy: SitePolicy, settings: RunSettings) -> str:
        mechanism = share_mechanism(policy, settings)
        needed = clipping_range(sum_bound(mechanism.clip, settings.batch_size), mechanism.noise_std(SITE))
        return protocol_problem(protocol, mechanism.shares, needed)

    content, outcome, site = site_round(context, config, global_weights, refusal)
    if outcome.state_dict is not None:
        return content, outcome.state_dict
    settings = run_settings(context)
    mechanism = share_mechanism(site.policy, settings)
    zeros = {name: torch.zeros_like(global_weights[name], dtype=torch.float64) for name in sum_names}
    return content, noise_share(zeros, mechanism, sum_bound(mechanism.clip, settings.batch_size))


def distributed_popularity(
    context: Context,
    config: Mapping[str, Any],
    global_weights: dict[str, torch.Tensor],
    sum_names: list[str],
    protocol: Mapping[str, Any],
) -> tuple[RecordDict, dict[str, torch.Tensor]]:
    """The popularity floor under ``noise = distributed``: the site's projected sum plus its noise share, for the
    secure sum (``client.popularity``); pure noise when it declines. The same checks as for a round come first."""
    settings = run_settings(context)
    site = site_from_context(dict(context.node_config), settings)
    check_ledger_continuity(context.state, site.ledger)
    if sum_names != [POPULARITY_ARRAY] or global_weights[POPULARITY_ARRAY].dim() != 1:
        raise PublicInputError(
            f"secure popularity release: the coordinator asks for {sum_names[:3]}, not one vector"
        )
    privacy = PrivacyPlan.from_settings(settings, site.policy)  # the plan the release itself uses
    bound = popularity_sum_bound(settings.batch_size, settings.sample_rate)
    mechanism = popularity_mechanism(privacy.target_epsilon, privacy.delta, privacy.popularity_share, "distributed",
                                     privacy.noise_shares)
    refusal = site.policy.decline_reason(settings)
    if not refusal and not (settings.dp and settings.popularity_share > 0 and settings.noise == "distributed"):
        refusal = "declined: a secure popularity sum is answered only under DP with noise = distributed and " \
            "popularity-share > 0"
    if not refusal:
        refusal = protocol_problem(protocol, mechanism.shares, clipping_range(bound, mechanism.noise_std(SITE)))
    outcome = RoundOutcome(None, site.ledger.epsilon(site.policy.delta), refusal)
    if not refusal:  # public input alone decided so far; now the data
        shard = site.load_shard()
        check_coordinator(config, shard.catalog)
        outcome = release_site_popularity(
            shard.examples, shard.catalog.num_items, privacy, site.ledger, run_id=str(config["run-id"]),
            site=site.site_id, sum_bound=bound,
        )
    remember_ledger_head(context.state, site.ledger)
    if outcome.state_dict is not None:
        return reply_content(outcome, site, settings.dp), {POPULARITY_ARRAY: outcome.state_dict[POPULARITY_ARRAY]}
    logger.warning("site %s popularity release: %s", site.site_id, outcome.declined_reason)
    zeros = {POPULARITY_ARRAY: torch.zeros_like(global_weights[POPULARITY_ARRAY], dtype=torch.float64)}
    return reply_content(outcome, site, settings.dp), noise_share(zeros, mechanism, bound)


@app.query()
def popularity(msg: Message, context: Context) -> Message:
    """The DP popularity floor (``client.popularity``): asked once before round 1; the same checks as a round.
    Under ``noise = distributed`` it is answered only inside SecAgg+ (``distributed_popularity``)."""
    settings = run_settings(context)
    site = site_from_context(dict(context.node_config), settings)
    check_ledger_continuity(context.state, site.ledger)
    refusal = site.policy.decline_reason(settings)
    if not refusal and not (settings.dp and settings.popularity_share > 0):
        refusal = "declined: a popularity release is answered only under DP with popularity-share > 0"
    refusal = refusal or outside_secure_aggregation(site.policy, settings)
    if refusal:  # public input alone, before the site's data is read
        logger.warning("site %s popularity release: %s", site.site_id, refusal)
        spent = site.ledger.epsilon(site.policy.delta)
        return Message(reply_content(RoundOutcome(None, spent, refusal), site, settings.dp), reply_to=msg)
    shard = site.load_shard()
    check_coordinator(msg.content.config_records["config"], shard.catalog)
    outcome = release_site_popularity(
        shard.examples, shard.catalog.num_items, PrivacyPlan.from_settings(settings, site.policy), site.ledger,
        run_id=str(msg.content.config_records["config"]["run-id"]), site=site.site_id,
    )
    remember_ledger_head(context.state, site.ledger)
    content = reply_content(outcome, site, settings.dp)
    if outcome.state_dict is None:
        logger.warning("site %s popularity release: %s", site.site_id, outcome.declined_reason)
    elif settings.noise == "central":  # the noise its epsilon assumes, for the coordinator to add (settings alone)
        mechanism = popularity_mechanism(settings.epsilon, site.policy.delta, settings.popularity_share, "central")
        content.metric_records["metrics"][NOISE_MULTIPLIER_METRIC] = mechanism.noise_multiplier
    return Message(content, reply_to=msg)
