"""Users, never interactions, go to sites: disjoint, complete, deterministic."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from common.data.datasets import load_dataset
from common.data.partition import partition_users, user_site_names
from common.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def sequences() -> list[np.ndarray]:
    dataset = load_dataset("synthetic:users=600,items=200,seed=9")
    return dataset.sequences(dataset.catalog())[1]


@pytest.mark.parametrize("scheme", ["uniform", "skewed", "taste"])
def test_every_user_in_exactly_one_site_and_no_site_empty(sequences: list[np.ndarray], scheme: str) -> None:
    sites = partition_users(sequences, 10, scheme, seed=1, num_items=200)
    assert sites.shape == (len(sequences),)
    assert set(np.unique(sites)) == set(range(10))
    np.testing.assert_array_equal(sites, partition_users(sequences, 10, scheme, seed=1, num_items=200))


def test_uniform_is_balanced_and_skewed_has_large_sites(sequences: list[np.ndarray]) -> None:
    uniform = np.bincount(partition_users(sequences, 10, "uniform", 0, 200))
    assert uniform.max() - uniform.min() <= 1
    skewed = np.bincount(partition_users(sequences, 10, "skewed", 0, 200))
    assert skewed[:2].mean() > 5 * skewed[2:].mean()


def test_taste_sites_favour_different_items(sequences: list[np.ndarray]) -> None:
    def item_overlap(sites: np.ndarray) -> float:
        tops = []
        for site in range(4):
            items = np.concatenate([sequences[u] for u in np.flatnonzero(sites == site)])
            tops.append(set(pd.Series(items).value_counts().index[:30]))
        return np.mean([len(tops[a] & tops[b]) / 30 for a in range(4) for b in range(a + 1, 4)])

    assert item_overlap(partition_users(sequences, 4, "taste", 0, 200)) < item_overlap(
        partition_users(sequences, 4, "uniform", 0, 200)
    )


def test_column_partitioning_uses_the_data_and_checks_it() -> None:
    frame = pd.DataFrame({"user": ["a", "a", "b", "c"], "site": ["x", "x", "y", "x"]})
    names = user_site_names(frame, ["a", "b", "c"])
    assert partition_users([np.zeros(1)] * 3, 2, "column", 0, 5, names).tolist() == [0, 1, 0]
    with pytest.raises(ConfigError, match="names 2 sites"):
        partition_users([np.zeros(1)] * 3, 3, "column", 0, 5, names)
    with pytest.raises(DataError, match="more than one site"):
        user_site_names(pd.DataFrame({"user": ["a", "a"], "site": ["x", "y"]}), ["a"])
    with pytest.raises(DataError, match="site column"):
        partition_users([np.zeros(1)] * 3, 2, "column", 0, 5, None)


def test_more_sites_than_users_is_an_error(sequences: list[np.ndarray]) -> None:
    with pytest.raises(ConfigError, match="cannot split"):
        partition_users(sequences[:3], 5, "uniform", 0, 200)
