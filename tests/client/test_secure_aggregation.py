"""noise = distributed at the site: share sizing, the projection, the protocol checks, the opt-in, the ledger's
fallback epsilon and its audit."""

from __future__ import annotations

import itertools
import math
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.supercore.task_identity import TaskIdentity

from client.app import SHARE_ONLY_IN_SECURE_AGGREGATION, distributed_round
from client.policy import SitePolicy
from client.popularity import release_site_popularity
from client.public_errors import PublicInputError
from client.secure_aggregation import noise_share, secure_aggregation_mod
from client.site_round import train_site_round
from common.data.split import training_examples
from common.errors import ConfigError
from common.federation import RunSettings
from common.privacy.accounting import epsilon_from_history
from common.privacy.ledger import Ledger
from common.privacy.mechanisms import SITE
from common.privacy.mechanisms.gaussian import GaussianMechanism
from common.protocol.round_plan import LocalTraining, PrivacyPlan, plan_round
from common.protocol.secure_sum import HEADROOM_STDS, clipping_range, protocol_problem, sum_bound
from common.recommender.model import ModelConfig, SASRec
from simulations.audit.fallback import fallback_findings
from simulations.audit.ledgers import check_chain
from tests.client.test_hostile_coordinator import _node, _settings, _site
from tests.client.test_public_errors import on_the_wire, request, wire_text

SITES, TOLERATED = 5, 2
SHARES = SITES - TOLERATED


@pytest.fixture(autouse=True)
def flower_task_identity() -> None:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


def _share(sigma: float, clip: float) -> GaussianMechanism:
    return GaussianMechanism(sigma, clip, placement="distributed", shares=SHARES)


def test_any_sites_beyond_the_tolerated_carry_the_full_noise() -> None:
    """Each of K=5 sites adds pure noise (a declined site's share); every sum of K-T=3 shares has variance
    sigma^2 C^2 (statistical, 60,000 coordinates), and more shares only add to it."""
    sigma, clip, coordinates = 1.3, 0.7, 60_000
    zeros = {"w": torch.zeros(coordinates)}
    shares = [
        noise_share(zeros, _share(sigma, clip), sum_bound(clip, 64), torch.Generator().manual_seed(site))["w"]
        for site in range(SITES)
    ]
    assert _share(sigma, clip).share_noise_multiplier ** 2 * SHARES == pytest.approx(sigma**2)
    target = (sigma * clip) ** 2
    tolerance = 4 * target * math.sqrt(2 / coordinates)  # four standard errors of a sample variance
    for subset in itertools.combinations(range(SITES), SHARES):
        total = sum(shares[site] for site in subset)
        assert abs(float(total.var()) - target) < tolerance, subset
    assert float(sum(shares).var()) > target  # no dropout: more noise than needed, never less


def test_the_projection_keeps_the_sensitivity_and_leaves_small_sums_alone() -> None:
    """The sum is projected onto the ball of radius R before the noise: one user (a change of norm <= C) still moves
    the projected sum by at most C, however large the sum; a sum inside the ball is unchanged."""
    clip, batch = 1.0, 4
    rng = np.random.default_rng(0)
    for _ in range(50):
        big = torch.from_numpy(rng.normal(size=300) * rng.uniform(0.1, 3) * batch * clip)
        user = torch.from_numpy(rng.normal(size=300))
        user = user / user.norm() * clip * rng.uniform(0, 1)
        a = noise_share({"w": big}, _share(0.0, clip), sum_bound(clip, batch))["w"]
        b = noise_share({"w": big + user}, _share(0.0, clip), sum_bound(clip, batch))["w"]
        assert float(a.norm()) <= sum_bound(clip, batch) + 1e-9
        assert float((a - b).norm()) <= clip + 1e-9
    small = torch.full((10,), 0.1)
    assert torch.equal(noise_share({"w": small}, _share(0.0, clip), sum_bound(clip, batch))["w"], small.double())


def test_the_clipping_range_leaves_headroom_for_the_share() -> None:
    std = 2.0 / math.sqrt(SHARES) * 0.5
    assert clipping_range(sum_bound(0.5, 100), _share(2.0, 0.5).noise_std(SITE)) == pytest.approx(
        50 + HEADROOM_STDS * std
    )


PROTOCOL = {"sample_num": 5, "threshold": 3, "target_range": 2**22, "mod_range": 2**32, "max_weight": 1.0,
            "clipping_range": 100.0}


@pytest.mark.parametrize(
    ("change", "refused"),
    [
        ({}, ""),
        ({"threshold": 2}, "completes with as few as 2 of 5"),
        ({"sample_num": 7, "threshold": 3}, "as many as its reconstruction threshold"),
        ({"sample_num": 2000, "threshold": 1500}, "wrap around"),
        ({"max_weight": 1000.0}, "wrap around"),
        ({"clipping_range": 10.0}, "clips at 10"),
    ],
)
def test_the_site_checks_the_coordinators_protocol(change: dict[str, float], refused: str) -> None:
    problem = protocol_problem({**PROTOCOL, **change}, shares=SHARES, required_range=50.0)
    assert (problem == "") if not refused else (refused in problem and problem.startswith("declined:"))


def test_a_site_without_the_opt_in_declines() -> None:
    settings = RunSettings(noise="distributed", min_sites=SITES, secure_aggregation_tolerated=TOLERATED)
    assert "trust-secure-aggregation = false" in SitePolicy().decline_reason(settings)
    trusting = SitePolicy.from_node_config(
        {"trust-secure-aggregation": "true", "secure-aggregation-sites": 3}, deployed=False
    )
    assert trusting.decline_reason(settings) == ""
    assert PrivacyPlan.from_settings(settings, trusting).noise_shares == SHARES
    with pytest.raises(ConfigError, match="secure-aggregation-sites"):
        SitePolicy(secure_aggregation_sites=2.5)


@pytest.mark.parametrize(("min_sites", "tolerated"), [(2, 0), (5, 3), (4, 2), (5, 0)])
def test_a_run_asking_an_unsafe_tolerance_is_refused(min_sites: int, tolerated: int) -> None:
    with pytest.raises(ConfigError, match="noise='distributed'|secure-aggregation-tolerated"):
        RunSettings(noise="distributed", min_sites=min_sites, secure_aggregation_tolerated=tolerated)


def test_the_site_refuses_to_unmask_a_site_named_alive_and_dropped() -> None:
    configs = ConfigRecord({Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: [1, 2, 3], Key.DEAD_NODE_ID_LIST: [3]})
    msg = Message(content=RecordDict({RECORD_KEY_CONFIGS: configs}), dst_node_id=1, message_type="train")
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})

    def never(_msg: Message, _context: Context) -> Message:
        raise AssertionError("the handler must not run")

    with pytest.raises(PublicInputError, match=r"sites \[3\] both alive and dropped"):
        secure_aggregation_mod(msg, context, never)


CONFIG = ModelConfig(num_items=25, max_len=6, hidden=16, heads=2, blocks=1, dropout=0.0)


def test_the_ledger_records_the_share_and_the_fallback_epsilon_and_the_audit_recomputes_it(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    examples = training_examples(
        [rng.choice(np.arange(1, 26), size=rng.integers(3, 12), replace=False) for _ in range(30)], CONFIG.max_len
    )
    training = LocalTraining(sample_rate=0.2, batch_size=6)
    privacy = PrivacyPlan(target_epsilon=4.0, delta=1e-4, max_grad_norm=0.5, planned_rounds=10,
                          noise_placement="distributed", noise_shares=SHARES, max_fallback_epsilon=math.inf)
    plan = plan_round(training, privacy)
    ledger = Ledger(tmp_path / "site-0.jsonl")
    torch.manual_seed(0)
    model = SASRec(CONFIG)
    for round_number in (1, 2):
        outcome = train_site_round(model, examples, training, privacy, ledger, "run", round_number, "0",
                                   torch.device("cpu"), seed=round_number)
        assert outcome.state_dict is not None and set(outcome.state_dict) == {
            name for name, p in model.named_parameters() if p.requires_grad
        }
    entries = ledger.entries()
    share = plan.noise_multiplier / math.sqrt(SHARES)
    assert [e["noise_placement"] for e in entries] == ["distributed"] * 2
    assert entries[-1]["noise_multiplier"] == pytest.approx(plan.noise_multiplier)
    assert entries[-1]["share_noise_multiplier"] == pytest.approx(share)
    fallback = epsilon_from_history([(share, 0.2, 1)] * 2, 1e-4)
    assert entries[-1]["fallback_epsilon_so_far"] == pytest.approx(fallback)
    assert fallback > entries[-1]["epsilon_so_far"]

    ledger_file, _ = check_chain(ledger.path)
    notes = fallback_findings("0", ledger_file.entries, 1e-4)
    assert [f.severity for f in notes] == ["note"] and f"fallback epsilon {fallback:.4f}" in notes[0].message

    lowered = [*ledger_file.entries[:-1], type(ledger_file.entries[-1])(
        **{**ledger_file.entries[-1].__dict__, "data": {**entries[-1], "fallback_epsilon_so_far": fallback / 2}}
    )]
    assert any(f.severity == "error" and "UNDERSTATED" in f.message for f in fallback_findings("0", lowered, 1e-4))


def _round(tmp_path: Path, users: int, node_overrides: dict, protocol: dict) -> tuple[RecordDict, dict]:
    data, catalog = _site(tmp_path, users)
    settings = _settings(noise="distributed", min_sites=SITES, secure_aggregation_tolerated=TOLERATED)
    weights = SASRec(settings.model_config(catalog.num_items)).state_dict()
    names = [name for name, p in SASRec(settings.model_config(catalog.num_items)).named_parameters()
             if p.requires_grad]
    config = {"server-round": 1, "run-id": "r1", "catalog-sha256": catalog.fingerprint(),
              "flwr-version": version("flwr")}
    context = Context(run_id=1, node_id=1, node_config=_node(tmp_path, data, **node_overrides), state=RecordDict(),
                      run_config=settings.to_run_config())
    return distributed_round(context, config, weights, names, protocol)


def _share_std(shares: int) -> float:
    settings = _settings(noise="distributed", min_sites=SITES, secure_aggregation_tolerated=TOLERATED)
    plan = plan_round(LocalTraining.from_settings(settings), PrivacyPlan.from_settings(settings, SitePolicy(
        delta=1e-5, secure_aggregation_sites=shares)))
    return GaussianMechanism(plan.noise_multiplier, settings.max_grad_norm, placement="distributed",
                             shares=shares).noise_std(SITE)


TRUSTING = {"trust-secure-aggregation": "true", "secure-aggregation-sites": SHARES, "window-epsilon": 0}
"""No per-run cap: each round's fallback epsilon is checked alone (the whole-window check has its own test)."""


@pytest.mark.parametrize(
    ("node", "protocol", "reason", "shares"),
    [
        ({}, PROTOCOL, "trust-secure-aggregation = false", 1),  # no opt-in: a full noise of its own
        (TRUSTING, {**PROTOCOL, "threshold": 2}, "completes with as few as 2", SHARES),
        (TRUSTING, {**PROTOCOL, "clipping_range": 1.0}, "clips at 1", SHARES),
    ],
)
def test_a_declining_site_sends_pure_noise_of_its_share(tmp_path: Path, node: dict, protocol: dict,
                                                         reason: str, shares: int) -> None:
    """Declined on public input (no opt-in, a protocol the site refuses): no data is used, the reply says why,
    and the vector is pure noise of the share's size, so the others' sum keeps its noise."""
    records, vector = _round(tmp_path, 40, node, protocol)
    assert records["metrics"]["declined"] == 1 and reason in str(records["site"]["reason"])
    noise = torch.cat([value.flatten() for value in vector.values()])
    assert abs(float(noise.std()) / _share_std(shares) - 1) < 0.1
    assert abs(float(noise.mean())) < 0.13 * _share_std(shares)  # 6.7 standard errors over 2,682 values
    assert Ledger(tmp_path / "ledger" / "site-north.jsonl").entries() == []  # nothing trained, nothing spent


def test_a_trusting_site_sends_its_noisy_share_and_a_public_reply(tmp_path: Path) -> None:
    replies = [_round(tmp_path / str(users), users, TRUSTING, {**PROTOCOL, "clipping_range": 1e4})
               for users in (40, 41)]
    for records, vector in replies:
        assert records["metrics"]["declined"] == 0 and vector
    public = [({k: v for k, v in records["metrics"].items()}, {k: v for k, v in records["site"].items()
                                                                if k != "ledger-hash"}) for records, _ in replies]
    assert public[0] == public[1]  # nothing in the reply depends on the user count


ATTACKED = {"trust-secure-aggregation": "true", "secure-aggregation-sites": 5, "max-fallback-epsilon": "inf"}
"""The site of the plain-message attack (H = 5), with no cap on its fallback: only the message path declines."""


@pytest.mark.parametrize("message_type", ["train", "query"])
def test_a_plain_message_gets_no_share_outside_secure_aggregation(tmp_path: Path, message_type: str) -> None:
    """A site with trust-secure-aggregation = true and H = 5 answered a plain train message (no SecAgg+ stages) by
    training and sending its share in the clear: std sigma C / sqrt(5), a fifth of the noise its epsilon assumes.
    Now it declines, on public input, before reading its data; the popularity query likewise."""
    data, catalog = _site(tmp_path, 40)
    settings = _settings(noise="distributed", min_sites=SITES, secure_aggregation_tolerated=TOLERATED,
                         popularity_share=0.2)
    reply = on_the_wire(*request(settings, _node(tmp_path, data, **ATTACKED), catalog, message_type=message_type))
    assert not reply.has_error(), wire_text(reply)
    assert reply.content["metrics"]["declined"] == 1 and "arrays" not in reply.content
    assert reply.content["site"]["reason"] == SHARE_ONLY_IN_SECURE_AGGREGATION
    assert not (tmp_path / "ledger").exists() or not any((tmp_path / "ledger").iterdir()), "nothing trained"


def test_the_fallback_epsilon_is_capped_before_the_release(tmp_path: Path) -> None:
    """Inside SecAgg+, the ledger's fallback epsilon (the site's shares alone) grew past max-epsilon unchecked. Now
    max-fallback-epsilon (default: max-epsilon) caps it: with H = 3 round 1 takes it to 6.5, round 2 would take it
    to 8.6, past max-epsilon 8, and is declined (pure noise sent, nothing spent); a lower cap declines round 1."""
    data, catalog = _site(tmp_path, 40)
    settings = _settings(noise="distributed", min_sites=SITES, secure_aggregation_tolerated=TOLERATED)
    weights = SASRec(settings.model_config(catalog.num_items)).state_dict()
    names = [name for name, p in SASRec(settings.model_config(catalog.num_items)).named_parameters()
             if p.requires_grad]
    protocol = {**PROTOCOL, "clipping_range": 1e4}
    state = RecordDict()

    def secure_round(node: dict, round_number: int, state: RecordDict) -> tuple[RecordDict, dict]:
        config = {"server-round": round_number, "run-id": "r1", "catalog-sha256": catalog.fingerprint(),
                  "flwr-version": version("flwr")}
        context = Context(run_id=1, node_id=1, node_config=node, state=state, run_config=settings.to_run_config())
        return distributed_round(context, config, weights, names, protocol)

    node = _node(tmp_path, data, **TRUSTING)
    first, _ = secure_round(node, 1, state)
    assert first["metrics"]["declined"] == 0
    second, vector = secure_round(node, 2, state)
    assert second["metrics"]["declined"] == 1
    assert "fallback epsilon" in str(second["site"]["reason"]) and "max-fallback-epsilon of 8" in str(
        second["site"]["reason"])
    noise = torch.cat([value.flatten() for value in vector.values()])
    assert abs(float(noise.std()) / _share_std(SHARES) - 1) < 0.1, "a declining site sends pure noise"
    [line] = Ledger(tmp_path / "ledger" / "site-north.jsonl").entries()
    assert line["fallback_epsilon_so_far"] <= 8.0

    lower = _node(tmp_path, data, **TRUSTING, **{"max-fallback-epsilon": 5.0, "ledger-dir": str(tmp_path / "other")})
    declined, _ = secure_round(lower, 1, RecordDict())
    assert declined["metrics"]["declined"] == 1 and "max-fallback-epsilon of 5" in str(declined["site"]["reason"])
    assert Ledger(tmp_path / "other" / "site-north.jsonl").entries() == []


def test_a_distributed_popularity_release_is_capped_too(tmp_path: Path) -> None:
    examples = training_examples([np.arange(1, 6)] * 3, CONFIG.max_len)
    privacy = PrivacyPlan(target_epsilon=8.0, delta=1e-5, popularity_share=0.1, noise_placement="distributed",
                          noise_shares=4, max_fallback_epsilon=0.5)
    ledger = Ledger(tmp_path / "site-1.jsonl")
    outcome = release_site_popularity(examples, 25, privacy, ledger, "run-a", "1", sum_bound=100)
    assert outcome.state_dict is None and "max-fallback-epsilon of 0.5" in outcome.declined_reason
    assert ledger.entries() == []
