"""The built-in default dataset: a long-tailed interaction log with learnable structure.

It has to be a real learning problem for a sequential model, not noise:

- item popularity is Zipf-like, so most-popular is a fair but beatable baseline;
- user activity is long-tailed (discrete Pareto): most users have 3 to 8
  interactions, a few have hundreds;
- each user has a sparse taste over item topics;
- sequential dynamics: every item has a few likely successors in its topic, and
  a user usually moves on to one of them. So the next item is predictable from
  the last ones even for a user with three interactions, which is what lets
  a sequential model serve long-tail users.

With ``drift`` or ``new_items`` above 0 the log gets a shared clock (days 0 to
365; each user active for ``activity_span`` of it), for lifelong runs cut into time
windows (``common.data.windows``):

- taste drift: each user's topic taste moves linearly from its start to a
  global re-mapping of the topics (topic x's fans end up in topic pi(x)), by
  ``drift`` (0: none, 1: fully re-mapped by the end of the year); a model
  trained on early events keeps recommending what people used to want;
- items entering over time: a ``new_items`` share of the items enter at a
  uniform time in the year and cannot be consumed before it.

Without them the clock is each user's step count and the data is unchanged.
Everything is drawn from seeded generators: same config, same data.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import pandas as pd

from common.errors import ConfigError

DAYS = 365.0
"""Length of the drifting data's clock, in days."""


@dataclass(frozen=True)
class SyntheticConfig:
    users: int = 3000
    items: int = 1000
    seed: int = 0
    topics: int = 20
    zipf_exponent: float = 1.0
    successors_per_item: int = 3
    follow_probability: float = 0.7
    topic_concentration: float = 0.3
    length_scale: float = 2.0
    length_tail_exponent: float = 1.0
    min_length: int = 3
    max_length: int = 300
    drift: float = 0.0
    new_items: float = 0.0
    activity_span: float = 0.15
    """Drifting data only: the share of the year one user's events spread over (a user is active for a while)."""

    def __post_init__(self) -> None:
        if self.users < 2:
            raise ConfigError(f"synthetic users={self.users}: need at least 2")
        if self.items < self.topics * (self.successors_per_item + 1):
            raise ConfigError(
                f"synthetic items={self.items}: need at least topics x (successors_per_item + 1) = "
                f"{self.topics * (self.successors_per_item + 1)}"
            )
        if not 0.0 <= self.follow_probability <= 1.0:
            raise ConfigError(f"synthetic follow_probability={self.follow_probability}: must be in [0, 1]")
        if not (0.0 <= self.drift <= 1.0 and 0.0 <= self.new_items < 1.0 and 0.0 < self.activity_span <= 1.0):
            raise ConfigError(f"synthetic drift={self.drift}, new_items={self.new_items}, activity_span="
                              f"{self.activity_span}: need drift in [0, 1], new_items in [0, 1), "
                              "activity_span in (0, 1]")
        if not 1 <= self.min_length <= min(self.max_length, self.items):
            raise ConfigError(
                f"synthetic lengths: need 1 <= min_length ({self.min_length}) <= max_length ({self.max_length})"
                f" and min_length <= items ({self.items})"
            )

    @classmethod
    def parse(cls, options: str) -> SyntheticConfig:
        """Parse ``users=5000,items=3000,seed=7`` (any field of this class)."""
        known = {field.name: field.type for field in fields(cls)}
        values: dict[str, int | float] = {}
        for part in filter(None, (p.strip() for p in options.split(","))):
            key, sep, raw = part.partition("=")
            key = key.strip()
            if not sep or key not in known:
                raise ConfigError(f"synthetic option '{part}': expected KEY=VALUE with KEY one of {', '.join(known)}")
            try:
                values[key] = int(raw) if known[key] in (int, "int") else float(raw)
            except ValueError:
                raise ConfigError(f"synthetic option '{part}': '{raw}' is not a {known[key]}") from None
        return cls(**values)  # type: ignore[arg-type]


def generate(config: SyntheticConfig = SyntheticConfig()) -> pd.DataFrame:
    """A raw interaction frame in the readers' layout (user, item, timestamp, order)."""
    rng = np.random.default_rng(config.seed)
    popularity = 1.0 / np.arange(1, config.items + 1) ** config.zipf_exponent
    popularity = popularity[rng.permutation(config.items)]
    topic_of = rng.integers(0, config.topics, size=config.items)
    topic_items = [np.flatnonzero(topic_of == topic) for topic in range(config.topics)]
    topic_weights = [popularity[members] / popularity[members].sum() for members in topic_items]

    successor_weights = 0.5 ** np.arange(config.successors_per_item)
    successor_weights /= successor_weights.sum()
    successors = np.empty((config.items, config.successors_per_item), dtype=np.int64)
    for item in range(config.items):
        members, weights = topic_items[topic_of[item]], topic_weights[topic_of[item]]
        others = members != item
        if others.sum() < config.successors_per_item:
            others = np.ones(config.items, dtype=bool)
            others[item] = False
            members, weights = np.arange(config.items), popularity
        chosen_weights = weights[others] / weights[others].sum()
        successors[item] = rng.choice(members[others], size=config.successors_per_item, replace=False, p=chosen_weights)

    lengths = _history_lengths(rng, config)
    drifting = config.drift > 0 or config.new_items > 0
    # The drift's own generator, so that the data without drift stays what it always was.
    clock = np.random.default_rng([config.seed, 1])
    topic_map = clock.permutation(config.topics)
    entry = np.where(clock.random(config.items) < config.new_items, clock.random(config.items), 0.0)
    users: list[int] = []
    items: list[int] = []
    times: list[float] = []
    for user, length in enumerate(lengths):
        taste = rng.dirichlet(np.full(config.topics, config.topic_concentration))
        drifted = np.empty_like(taste)
        drifted[topic_map] = taste
        if drifting:  # active for activity_span of the year, starting anywhere in it
            start = clock.random() * (1.0 - config.activity_span)
            user_times = start + np.sort(clock.random(length)) * config.activity_span
        else:
            user_times = np.arange(length, dtype=np.float64)
        seen: set[int] = set()
        current = -1
        for now in user_times:
            available = entry <= now if drifting else None
            item = -1
            if current >= 0 and rng.random() < config.follow_probability:
                item = int(successors[current, rng.choice(config.successors_per_item, p=successor_weights)])
            if item < 0 or item in seen or (available is not None and not available[item]):
                share = config.drift * now if drifting else 0.0
                taste_now = (1.0 - share) * taste + share * drifted
                item = _draw_by_taste(rng, taste_now, topic_items, topic_weights, seen, config.items, available)
            if item < 0:  # consumed every item entered so far: this user's history ends here
                break
            seen.add(item)
            users.append(user)
            items.append(item)
            times.append(float(now))
            current = item
    return pd.DataFrame(
        {
            "user": pd.array([str(u + 1) for u in users], dtype="string"),
            "item": pd.array([str(i + 1) for i in items], dtype="string"),
            # Drifting: days on one shared clock. Otherwise each user's own step count (only order within a user
            # matters).
            "timestamp": np.asarray(times, dtype=np.float64) * (DAYS if drifting else 1.0),
            "order": np.arange(len(users)),
        }
    )


def _history_lengths(rng: np.random.Generator, config: SyntheticConfig) -> np.ndarray:
    """Discrete Pareto: median near min_length + length_scale, a thin tail of long histories."""
    uniform = rng.random(config.users)
    extra = np.floor((uniform ** (-1.0 / config.length_tail_exponent) - 1.0) * config.length_scale)
    # A user cannot consume more distinct items than the catalogue holds.
    return np.minimum(config.min_length + extra, min(config.max_length, config.items)).astype(np.int64)


def _draw_by_taste(
    rng: np.random.Generator,
    taste: np.ndarray,
    topic_items: list[np.ndarray],
    topic_weights: list[np.ndarray],
    seen: set[int],
    num_items: int,
    available: np.ndarray | None = None,
) -> int:
    """An unseen item by taste and popularity; ``available`` (a mask over items) leaves out items not yet entered,
    and with it -1 means that no entered item is left unseen."""
    for _ in range(20):
        topic = rng.choice(len(taste), p=taste)
        members, weights = topic_items[topic], topic_weights[topic]
        if available is not None:
            members, weights = members[available[members]], weights[available[members]]
            weights = weights / weights.sum() if len(members) else weights
        if len(members) == 0:
            continue
        item = int(rng.choice(members, p=weights))
        if item not in seen:
            return item
    seen_items = np.fromiter(seen, dtype=np.int64)
    unseen = np.setdiff1d(np.arange(num_items), seen_items)
    if available is not None:
        unseen = unseen[available[unseen]]
    return int(rng.choice(unseen)) if len(unseen) else -1
