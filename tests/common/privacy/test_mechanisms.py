"""Every noise placement and the popularity floor through the one mechanism interface, against the accountant.

For each placement the individual half bounds one user's contribution by C, the aggregate half adds noise of std
sigma C at the party the placement names (sigma C / sqrt(H) per share under ``distributed``, H shares summing to
sigma C) and none elsewhere, and the accountant's epsilon of the mechanism's steps is the calibrated target.
"""

from __future__ import annotations

import math

import pytest
import torch

from common.errors import ConfigError
from common.federation import RunSettings
from common.privacy.accounting import EPSILON_TOLERANCE, epsilon_from_history
from common.privacy.ledger import Spend
from common.privacy.mechanisms import (
    CENTRAL_POPULARITY_TRUST,
    CENTRAL_TRUST,
    COORDINATOR,
    DISTRIBUTED_TRUST,
    PLACEMENTS,
    POPULARITY,
    SITE,
    SITE_TRUST,
)
from common.privacy.mechanisms.gaussian import GaussianMechanism, project
from common.privacy.popularity import POPULARITY_BOUND, popularity_mechanism
from common.protocol.round_plan import LocalTraining, PrivacyPlan, plan_round, round_mechanism

COORDINATES = 200_000
STD_TOLERANCE = 0.01
"""Relative: the sample std of 200,000 draws has a relative standard error of 1 / sqrt(2 x 200,000) = 0.0016."""
SHARES = 3
TARGET, DELTA, ROUNDS = 4.0, 1e-5, 6


def _mechanism(placement: str) -> GaussianMechanism:
    """The round's mechanism as a site plans it from the run's settings (calibrated on the target)."""
    sites = {"min_sites": 2 * SHARES - 1} if placement == "distributed" else {}
    settings = RunSettings(epsilon=TARGET, delta=DELTA, rounds=ROUNDS, noise=placement, max_grad_norm=0.7,
                           popularity_share=0.0, **sites)
    privacy = PrivacyPlan.from_settings(settings)
    if placement == "distributed":
        privacy = PrivacyPlan(**{**privacy.__dict__, "noise_shares": SHARES})
    return round_mechanism(privacy, plan_round(LocalTraining.from_settings(settings), privacy))


def _noise(mechanism: GaussianMechanism, party: str, seed: int) -> torch.Tensor:
    zeros = {"w": torch.zeros(COORDINATES, dtype=torch.float64)}
    return mechanism.add_noise(zeros, party, torch.Generator().manual_seed(seed))["w"]


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_the_individual_half_bounds_every_user_by_the_clip(placement: str) -> None:
    mechanism = _mechanism(placement)
    users = torch.randn(64, 5, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    users *= torch.logspace(-2, 2, 64, dtype=torch.float64).view(-1, 1, 1)  # norms far below and far above C
    bounded = mechanism.constrain_sensitivity(users)
    norms, before = bounded.flatten(1).norm(dim=1), users.flatten(1).norm(dim=1)
    assert bool((norms <= mechanism.clip * (1 + 1e-12)).all())
    inside = before <= mechanism.clip
    assert inside.any() and torch.equal(bounded[inside], users[inside]), "a user within the bound is left alone"
    assert torch.allclose(norms[~inside], torch.full_like(norms[~inside], mechanism.clip))
    assert torch.equal(mechanism.constrain_sensitivity(torch.zeros(2, 3)), torch.zeros(2, 3))


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_the_aggregate_half_adds_sigma_c_where_the_placement_says_and_nothing_elsewhere(placement: str) -> None:
    mechanism = _mechanism(placement)
    sigma, clip = mechanism.noise_multiplier, mechanism.clip
    adds, silent = (COORDINATOR, SITE) if placement == "central" else (SITE, COORDINATOR)
    expected = sigma * clip / (math.sqrt(SHARES) if placement == "distributed" else 1.0)
    assert mechanism.noise_std(adds) == pytest.approx(expected)
    assert float(_noise(mechanism, adds, 0).std()) == pytest.approx(expected, rel=STD_TOLERANCE)
    assert abs(float(_noise(mechanism, adds, 0).mean())) < 5 * expected / math.sqrt(COORDINATES)
    assert mechanism.noise_std(silent) == 0.0 and bool((_noise(mechanism, silent, 0) == 0).all())
    if placement == "distributed":  # H shares, one per site, carry the whole noise
        total = sum(_noise(mechanism, SITE, seed) for seed in range(SHARES))
        assert float(total.std()) == pytest.approx(sigma * clip, rel=STD_TOLERANCE)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_the_accountant_spends_the_calibrated_target_on_the_mechanisms_steps(placement: str) -> None:
    mechanism = _mechanism(placement)
    spent = epsilon_from_history([mechanism.step] * ROUNDS, DELTA)
    assert TARGET - 2 * EPSILON_TOLERANCE <= spent <= TARGET + 1e-9
    if placement == "distributed":  # the fallback: the site's own share alone is worth more epsilon
        assert mechanism.share_step == (mechanism.noise_multiplier / math.sqrt(SHARES), *mechanism.step[1:])
        assert epsilon_from_history([mechanism.share_step] * ROUNDS, DELTA) > spent


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_the_popularity_floor_is_the_same_mechanism_on_per_user_vectors_of_norm_one(placement: str) -> None:
    share = 0.25
    mechanism = popularity_mechanism(TARGET, DELTA, share, placement, SHARES)
    assert (mechanism.clip, mechanism.sample_rate, mechanism.steps) == (POPULARITY_BOUND, 1.0, 1)
    indicators = (torch.rand(50, 40, generator=torch.Generator().manual_seed(2)) < 0.3).double()
    assert bool((mechanism.constrain_sensitivity(indicators).norm(dim=1) <= POPULARITY_BOUND + 1e-12).all())
    spent = epsilon_from_history([mechanism.step], DELTA)
    assert share * TARGET * (1 - 5e-3) <= spent <= share * TARGET + 1e-9, "calibrated to 0.1% on sigma"
    adds = COORDINATOR if placement == "central" else SITE
    per_party = mechanism.noise_multiplier / (math.sqrt(SHARES) if placement == "distributed" else 1.0)
    assert float(_noise(mechanism, adds, 3).std()) == pytest.approx(per_party, rel=STD_TOLERANCE)


def test_projection_onto_the_sum_bound_keeps_one_users_effect_within_the_clip() -> None:
    mechanism = _mechanism("distributed")
    generator = torch.Generator().manual_seed(4)
    total = {"a": torch.randn(30, generator=generator) * 50, "b": torch.randn(20, generator=generator) * 50}
    user = mechanism.constrain_sensitivity(torch.randn(1, 50, generator=generator) * 10)[0]
    with_user = {"a": total["a"] + user[:30], "b": total["b"] + user[30:]}
    radius = 10.0
    a, b = project(total, radius), project(with_user, radius)
    assert math.sqrt(sum(float(t.pow(2).sum()) for t in a.values())) == pytest.approx(radius)
    moved = math.sqrt(sum(float((a[name] - b[name]).pow(2).sum()) for name in a))
    assert moved <= mechanism.clip + 1e-9


def test_each_placement_writes_its_ledger_line_and_trust() -> None:
    base = {"run_id": "r", "round": 1, "site": "s", "delta": DELTA, "accountant": "rdp", "library_versions": {}}
    trusts = {"site": SITE_TRUST, "central": CENTRAL_TRUST, "distributed": DISTRIBUTED_TRUST}
    for placement in PLACEMENTS:
        mechanism = _mechanism(placement)
        line = Spend(**base, **mechanism.ledger_fields(0.5 if placement == "distributed" else None))
        assert (line.noise_placement, line.trust) == (placement, trusts[placement])
        assert (line.noise_multiplier, line.sample_rate, line.steps, line.max_grad_norm) == (*mechanism.step,
                                                                                              mechanism.clip)
        if placement == "distributed":
            assert line.share_noise_multiplier == mechanism.share_noise_multiplier
            assert line.fallback_epsilon_so_far == 0.5
        else:
            assert line.share_noise_multiplier is None and line.fallback_epsilon_so_far is None
    site_line = Spend(**base, **_mechanism("site").ledger_fields())
    defaults = Spend(**base, **{k: v for k, v in _mechanism("site").ledger_fields().items()
                                if k in ("sample_rate", "noise_multiplier", "max_grad_norm", "steps")})
    assert site_line == defaults, "a site-placed DP-SGD line reads exactly as lines written before the interface"
    popularity = popularity_mechanism(TARGET, DELTA, 0.25, "central")
    assert popularity.ledger_fields()["trust"] == CENTRAL_POPULARITY_TRUST
    assert popularity.ledger_fields()["release"] == POPULARITY.release


@pytest.mark.parametrize(
    ("fields", "named"),
    [({"placement": "nowhere"}, "noise placement 'nowhere'"), ({"shares": 0}, "0 noise shares"),
     ({"clip": 0.0}, "clip 0.0"), ({"noise_multiplier": math.nan}, "noise multiplier nan")],
)
def test_a_mechanism_that_names_no_placement_or_bound_is_refused_by_name(fields: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        GaussianMechanism(**{"noise_multiplier": 1.0, "clip": 1.0, **fields})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="party 'server'"):
        _mechanism("site").noise_std("server")
