"""The site's side of the DP popularity floor: one Gaussian release of its users' item popularity before round 1.

Each user contributes the indicator of the items in their training example
divided by the square root of their count (L2 norm 1 whatever the count:
``common.privacy.popularity``), the site adds N(0, sigma^2) noise to every
entry of the sum, records the release in its ledger (round 0, sample rate 1,
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

from typing import Any

import torch

from client.dp_sgd import gaussian_noise, secret_generator
from client.replay import ReleasedUpdate
from client.secure_aggregation import DISTRIBUTED_TRUST
from client.site_round import RoundOutcome, library_versions, over_budget, over_fallback_cap
from common.data.catalog import PADDING_INDEX
from common.data.split import TrainingExamples
from common.errors import ConfigError
from common.privacy.accounting import ACCOUNTANT, epsilon_from_history
from common.privacy.ledger import Ledger, Spend
from common.privacy.popularity import POPULARITY_ARRAY, POPULARITY_BOUND, popularity_step
from common.protocol.round_plan import PrivacyPlan
from common.protocol.secure_sum import share_noise_multiplier

POPULARITY_RELEASE = "gaussian sum of per-user item indicators, each scaled to L2 norm 1"
CENTRAL_POPULARITY_TRUST = (
    "the coordinator: this site sent it the un-noised sum of its users' popularity vectors (each of L2 norm at most "
    "1), and the epsilon holds only if the coordinator added Gaussian noise of std noise_multiplier once to the sum "
    "over all sites; against the coordinator itself this release is NOT private"
)
POPULARITY_ROUND = 0
"""The release's round number in the ledger: before round 1."""
_REPLAY_KEY = "popularity-release"
_CHUNK_USERS = 1024


def clipped_popularity_sum(examples: TrainingExamples, num_items: int) -> torch.Tensor:
    """[num_items + 1]: the sum over users of their item indicator scaled to L2 norm at most ``POPULARITY_BOUND``."""
    total = torch.zeros(num_items + 1, dtype=torch.float64)
    for start in range(0, len(examples), _CHUNK_USERS):  # bounded memory: users x catalogue per chunk
        rows = slice(start, start + _CHUNK_USERS)
        items = torch.cat([examples.inputs[rows], examples.targets[rows]], dim=1)  # [users, 2 L]
        present = torch.zeros(len(items), num_items + 1, dtype=torch.float64).scatter_(1, items, 1.0)
        present[:, PADDING_INDEX] = 0.0
        norms = present.sum(dim=1, keepdim=True).sqrt().clamp(min=1.0)
        total += (present * (POPULARITY_BOUND / norms)).sum(dim=0)
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
    step = popularity_step(privacy.target_epsilon, privacy.delta, privacy.popularity_share)
    sigma = step[0]
    share = share_noise_multiplier(sigma, privacy.noise_shares)
    refusal = over_budget(history, step, privacy, "popularity release")
    fallback = 0.0
    if not refusal and privacy.noise_placement == "distributed":
        fallback, refusal = over_fallback_cap(ledger.entries(), (share, step[1], step[2]), privacy,
                                              "popularity release")
    if refusal:
        return RoundOutcome(None, spent, refusal)
    release = clipped_popularity_sum(examples, num_items)
    placement: dict[str, Any] = {}
    own_sigma = sigma  # site: the site adds the whole noise
    if privacy.noise_placement == "central":
        placement, own_sigma = {"noise_placement": "central", "trust": CENTRAL_POPULARITY_TRUST}, 0.0
    elif privacy.noise_placement == "distributed":
        if sum_bound <= 0:
            raise ConfigError("a distributed popularity release needs the public bound its sum is projected onto")
        release *= min(1.0, sum_bound / max(float(release.norm()), 1e-12))
        own_sigma = share
        placement = {"noise_placement": "distributed", "trust": DISTRIBUTED_TRUST, "share_noise_multiplier": own_sigma,
                     "fallback_epsilon_so_far": fallback}
    if own_sigma > 0:
        generator = secret_generator(torch.device("cpu"))  # unpredictable to the coordinator, as DP-SGD's noise
        release += gaussian_noise(own_sigma * POPULARITY_BOUND, (num_items + 1,), generator, torch.float64)
    noisy = release.float()
    noisy[PADDING_INDEX] = 0.0  # not an item; zeroing it is post-processing
    entry = ledger.append(
        Spend(
            run_id=run_id,
            round=POPULARITY_ROUND,
            site=site,
            sample_rate=step[1],
            noise_multiplier=sigma,
            max_grad_norm=POPULARITY_BOUND,
            steps=step[2],
            delta=privacy.delta,
            accountant=ACCOUNTANT,
            library_versions=library_versions(),
            users=len(examples),
            release=POPULARITY_RELEASE,
            **placement,
        )
    )
    vector = {POPULARITY_ARRAY: noisy}
    released.save(run_id, POPULARITY_ROUND, _REPLAY_KEY, vector)
    return RoundOutcome(vector, float(entry["epsilon_so_far"]))
