"""The site's side of the DP popularity floor: one Gaussian release of its users' item popularity before round 1.

The release is the Gaussian mechanism (``common.privacy.popularity.popularity_mechanism``) on another statistic:
its individual half scales each user's indicator of the items in their training example to L2 norm at most 1
(``clipped_popularity_sum``), its aggregate half adds N(0, sigma^2) noise to every entry of the sum where the
placement says; under ``noise = site`` the site adds it, records the release in its ledger (round 0, sample rate 1,
one step: Poisson sampling at rate 1 takes every user) and sends the noisy
vector. The same checks as for a training round come first, on public input
only: the site's policy, then its budget against its ledger. A query repeated
in the same run re-sends the vector already released (post-processing) instead of charging a second release.

Under ``noise = distributed`` the release travels as a secure sum (``client.app.distributed_popularity``): the site
projects its sum onto the public radius ``popularity_sum_bound``, adds only its share of the noise (std
sigma / sqrt(secure-aggregation-sites), as for a round), and Flower's SecAgg+ shows the coordinator the sum over the
sites alone; the ledger line says so and records the fallback epsilon of the share alone.

Under ``noise = central`` (a site whose node config trusts the coordinator's noise; the policy declines the query
otherwise) the site sends the sum WITHOUT noise, and the coordinator adds N(0, sigma^2) once to the sum over all
sites (``server.popularity``), as for training: one noise over the federation instead of one per site, so the sum
carries sqrt(sites) times less noise at the same epsilon. The ledger line says so (placement ``central``, the trust
it relies on).
"""

from __future__ import annotations

import torch

from client.replay import ReleasedUpdate
from client.site_round import RoundOutcome, library_versions, over_budget, over_fallback_cap
from common.data.catalog import PADDING_INDEX
from common.data.split import TrainingExamples
from common.errors import ConfigError
from common.privacy.accounting import ACCOUNTANT, epsilon_from_history
from common.privacy.ledger import Ledger, Spend
from common.privacy.mechanisms import SITE
from common.privacy.mechanisms.gaussian import GaussianMechanism, project
from common.privacy.popularity import POPULARITY_ARRAY, popularity_mechanism
from common.protocol.round_plan import PrivacyPlan

POPULARITY_ROUND = 0
"""The release's round number in the ledger: before round 1."""
_REPLAY_KEY = "popularity-release"
_CHUNK_USERS = 1024


def clipped_popularity_sum(examples: TrainingExamples, num_items: int, mechanism: GaussianMechanism) -> torch.Tensor:
    """[num_items + 1]: the sum over users of their item indicator, each bounded by ``mechanism``'s individual half
    (L2 norm at most its clip, ``POPULARITY_BOUND``)."""
    total = torch.zeros(num_items + 1, dtype=torch.float64)
    for start in range(0, len(examples), _CHUNK_USERS):  # bounded memory: users x catalogue per chunk
        rows = slice(start, start + _CHUNK_USERS)
        items = torch.cat([examples.inputs[rows], examples.targets[rows]], dim=1)  # [users, 2 L]
        present = torch.zeros(len(items), num_items + 1, dtype=torch.float64).scatter_(1, items, 1.0)
        present[:, PADDING_INDEX] = 0.0
        total += mechanism.constrain_sensitivity(present).sum(dim=0)
    return total


def release_site_popularity(
    examples: TrainingExamples, num_items: int, privacy: PrivacyPlan, ledger: Ledger, run_id: str, site: str,
    sum_bound: float = 0.0,
) -> RoundOutcome:
    """The noisy sum as ``{"popularity": [num_items + 1]}``, charged in ``ledger`` first; or a decline.

    ``sum_bound``: under ``distributed``, the public radius the sum is projected onto (``popularity_sum_bound``)."""
    if not privacy.enabled or privacy.popularity_share <= 0:
        raise ConfigError("the popularity release needs dp = true and popularity-share > 0")
    released = ReleasedUpdate(ledger.path.with_suffix(".popularity.pt"))
    history = ledger.history()
    spent = epsilon_from_history(history, privacy.delta)
    replay = released.find(run_id, POPULARITY_ROUND, _REPLAY_KEY)
    if replay is not None:
        return RoundOutcome(replay, spent)
    mechanism = popularity_mechanism(privacy.target_epsilon, privacy.delta, privacy.popularity_share,
                                     privacy.noise_placement, privacy.noise_shares)
    refusal = over_budget(history, mechanism.step, privacy, "popularity release")
    fallback = None
    if not refusal and mechanism.placement == "distributed":
        fallback, refusal = over_fallback_cap(ledger.entries(), mechanism.share_step, privacy, "popularity release")
    if refusal:
        return RoundOutcome(None, spent, refusal)
    release = {POPULARITY_ARRAY: clipped_popularity_sum(examples, num_items, mechanism)}
    if mechanism.placement == "distributed":
        if sum_bound <= 0:
            raise ConfigError("a distributed popularity release needs the public bound its sum is projected onto")
        release = project(release, sum_bound)
    # the site's part of the aggregate half: all the noise (site), none (central), its share (distributed)
    noisy = mechanism.add_noise(release, SITE)[POPULARITY_ARRAY].float()
    noisy[PADDING_INDEX] = 0.0  # not an item; zeroing it is post-processing
    entry = ledger.append(
        Spend(
            run_id=run_id,
            round=POPULARITY_ROUND,
            site=site,
            delta=privacy.delta,
            accountant=ACCOUNTANT,
            library_versions=library_versions(),
            users=len(examples),
            **mechanism.ledger_fields(fallback),
        )
    )
    vector = {POPULARITY_ARRAY: noisy}
    released.save(run_id, POPULARITY_ROUND, _REPLAY_KEY, vector)
    return RoundOutcome(vector, float(entry["epsilon_so_far"]))
