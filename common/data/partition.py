"""Assigning users (never single interactions) to simulated sites.

Users are the privacy unit and sites must hold disjoint users, so every scheme
returns one site per user. Deterministic from the seed: the server and every
simulated client compute the same assignment independently.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd

from common.errors import ConfigError, DataError

Scheme = Literal["uniform", "skewed", "taste", "column"]
SCHEMES: tuple[str, ...] = ("uniform", "skewed", "taste", "column")
SKEW_FACTOR = 10.0
TASTE_LOYALTY = 0.8


def partition_users(
    sequences: Sequence[np.ndarray],
    num_sites: int,
    scheme: str,
    seed: int,
    num_items: int,
    user_sites: Sequence[str] | None = None,
) -> np.ndarray:
    """Site index (0..num_sites-1) per user; every site gets at least one user.

    - uniform: equal shares at random;
    - skewed: the first fifth of the sites (at least one) are 10x larger;
    - taste: the catalogue is cut into ``num_sites`` random item groups, and a
      user goes to the site of the group they interact with most (with
      probability 0.8, else a random site): sites favour different items;
    - column: the data names each user's site (``user_sites``).
    """
    users = len(sequences)
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown partitioning '{scheme}': use one of {', '.join(SCHEMES)}")
    if scheme == "column":
        return _by_column(user_sites, num_sites)
    if not 1 <= num_sites <= users:
        raise ConfigError(f"cannot split {users} users into {num_sites} sites")
    rng = np.random.default_rng(seed)
    if scheme == "uniform":
        sites = np.arange(users) % num_sites
        return sites[rng.permutation(users)]
    if scheme == "skewed":
        large = max(1, num_sites // 5)
        weights = np.where(np.arange(num_sites) < large, SKEW_FACTOR, 1.0)
        extra = rng.choice(num_sites, users - num_sites, p=weights / weights.sum())
        sites = np.concatenate([np.arange(num_sites), extra])
        return sites[rng.permutation(users)]
    group_of_item = rng.integers(0, num_sites, size=num_items + 1)
    favourite = np.array([np.bincount(group_of_item[s], minlength=num_sites).argmax() for s in sequences])
    loyal = rng.random(users) < TASTE_LOYALTY
    sites = np.where(loyal, favourite, rng.integers(0, num_sites, size=users))
    return _fill_empty_sites(sites, num_sites, rng)


def _fill_empty_sites(sites: np.ndarray, num_sites: int, rng: np.random.Generator) -> np.ndarray:
    """Move a random user from the largest site to each empty one."""
    sites = sites.copy()
    for site in range(num_sites):
        if not (sites == site).any():
            largest = np.bincount(sites, minlength=num_sites).argmax()
            sites[rng.choice(np.flatnonzero(sites == largest))] = site
    return sites


def _by_column(user_sites: Sequence[str] | None, num_sites: int) -> np.ndarray:
    if user_sites is None:
        raise DataError("partitioning 'column' needs a site column in the data (see --site-col)")
    names = sorted(set(user_sites))
    if len(names) != num_sites:
        raise ConfigError(
            f"the data names {len(names)} sites ({', '.join(names[:10])}), but {num_sites} were asked for"
        )
    index = {name: position for position, name in enumerate(names)}
    return np.array([index[name] for name in user_sites])


def user_site_names(frame: pd.DataFrame, user_ids: Sequence[str]) -> list[str] | None:
    """Each user's site from the data's site column (their first interaction's), or None without one."""
    if "site" not in frame.columns:
        return None
    first = frame.groupby("user", sort=False)["site"].first()
    conflicting = frame.groupby("user", sort=False)["site"].nunique()
    if (conflicting > 1).any():
        user = conflicting[conflicting > 1].index[0]
        raise DataError(f"user {user} appears at more than one site; sites must hold disjoint users")
    return [str(first[user]) for user in user_ids]
