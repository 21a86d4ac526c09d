"""The built-in default data: deterministic, long-tailed, sequentially predictable."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from common.data.datasets import load_dataset
from common.data.synthetic import SyntheticConfig, generate
from common.errors import ConfigError


def test_same_seed_same_data_other_seed_other_data() -> None:
    config = SyntheticConfig(users=200, items=200, seed=3)
    pd.testing.assert_frame_equal(generate(config), generate(config))
    assert not generate(config).equals(generate(SyntheticConfig(users=200, items=200, seed=4)))


def test_long_tailed_users_and_items() -> None:
    dataset = load_dataset("synthetic:users=2000,items=800,seed=1")
    lengths = dataset.frame.groupby("user").size().to_numpy()
    assert lengths.min() >= 3
    assert np.mean((lengths >= 3) & (lengths <= 8)) > 0.5, "most users have 3 to 8 interactions"
    assert lengths.max() >= 100, "a few users have hundreds"
    assert dataset.stats().top20_item_share > 0.5, "popularity is concentrated on few items"


def _top_successor_share(frame: pd.DataFrame) -> float:
    same_user = frame["user"] == frame["user"].shift(1)
    pairs = pd.DataFrame({"previous": frame["item"].shift(1)[same_user], "next": frame["item"][same_user]})
    return float(pairs.groupby("previous")["next"].agg(lambda s: s.value_counts().iloc[0] / len(s)).mean())


def test_next_item_is_predictable_from_the_current_one() -> None:
    """Transitions concentrate on a few successors per item, far beyond what taste and popularity explain."""
    frame = generate(SyntheticConfig(users=1000, items=300, seed=2))
    shuffled = frame.copy()
    shuffled["item"] = frame.groupby("user")["item"].transform(lambda s: s.sample(frac=1.0, random_state=0).to_numpy())
    assert _top_successor_share(frame) > 2 * _top_successor_share(shuffled)


def test_no_item_repeats_within_a_user() -> None:
    frame = generate(SyntheticConfig(users=300, items=200, seed=5))
    assert not frame.duplicated(["user", "item"]).any()


def test_spec_options_are_parsed_and_bad_options_rejected() -> None:
    assert SyntheticConfig.parse("users=50,items=100,seed=7") == SyntheticConfig(users=50, items=100, seed=7)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        SyntheticConfig.parse("colour=blue")
    with pytest.raises(ConfigError, match="not a"):
        SyntheticConfig.parse("users=many")
    with pytest.raises(ConfigError, match="users=1"):
        SyntheticConfig.parse("users=1")


def test_drift_gives_a_shared_clock_drifting_tastes_and_items_entering_over_time() -> None:
    config = SyntheticConfig(users=600, items=200, seed=4, drift=1.0, new_items=0.3)
    frame = generate(config)
    pd.testing.assert_frame_equal(frame, generate(config))
    assert frame["timestamp"].between(0, 365).all()
    assert (frame.groupby("user")["timestamp"].agg(lambda t: t.max() - t.min()) <= 365 * config.activity_span).all()
    first_seen = frame.groupby("item")["timestamp"].min()
    assert (first_seen > 365 * 0.25).sum() >= 20, "some items first appear late in the year"
    early, late = frame[frame["timestamp"] < 120], frame[frame["timestamp"] > 245]
    early_share = early["item"].value_counts(normalize=True)
    late_share = late["item"].value_counts(normalize=True).reindex(early_share.index, fill_value=0.0)
    assert float((early_share - late_share).abs().sum()) > 0.2, "what people consume changes over the year"
    assert not frame.duplicated(["user", "item"]).any()


def test_without_drift_the_data_is_unchanged_by_the_drift_options() -> None:
    plain = generate(SyntheticConfig(users=200, items=200, seed=3))
    assert (plain.groupby("user")["timestamp"].first() == 0).all(), "each user's own step count"
    with pytest.raises(ConfigError, match="drift"):
        SyntheticConfig(drift=1.5)
