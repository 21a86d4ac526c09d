"""Hypothesis strategies for what a hostile coordinator can send a site: run configs, weights, message sequences.

Every draw starts from a tiny valid run (so that most examples reach training) and bends it: extreme finite,
zero, negative, huge, non-finite and wrong-typed values for every key the site reads, unknown keys, weights at,
just below and just above the site's bound, other shapes and dtypes, and message sequences in any order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from common.federation import RunSettings

MAX_ABS_WEIGHT = 100.0
"""The site's max-abs-weight (``client.policy.SitePolicy``'s default, which the fuzzed sites keep)."""
SITES, THRESHOLD = 5, 3
"""The SecAgg+ group the fuzzer drives: the site under test and four honest peers; the site assumes 3 shares."""

TINY_RUN: dict[str, Any] = {
    "dataset": "", "catalog-path": "catalog.json", "rounds": 3, "epsilon": 4.0, "delta": 1e-5, "hidden": 8,
    "heads": 2, "blocks": 1, "max-len": 4, "dropout": 0.0, "batch-size": 4, "sample-rate": 0.5,
    "local-epochs": 1.0, "popularity-share": 0.0,
}
"""A run the site accepts and trains in a fraction of a second: the starting point every draw bends."""
PLACEMENTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "site": ({}, {}),
    "central": ({"noise": "central", "min-sites": 3}, {"trust-coordinator-noise": True}),
    "distributed": (
        {"noise": "distributed", "min-sites": SITES, "secure-aggregation-tolerated": SITES - THRESHOLD},
        {"trust-secure-aggregation": True, "secure-aggregation-sites": THRESHOLD},
    ),
}
"""Per noise placement: what the run asks, and the node config of a site that opted in to it."""

RUN_KEYS: dict[str, str] = {
    name.replace("_", "-"): str(declared.type) for name, declared in RunSettings.__dataclass_fields__.items()
}
"""Every run-config key the site reads, with its declared type."""
SITE_KEYS = ("learning-rate", "local-epochs", "sample-rate", "batch-size", "max-grad-norm", "epsilon", "delta",
             "rounds", "max-len", "hidden", "heads", "blocks", "dropout", "popularity-share", "grad-sample-mode",
             "loss", "max-physical-batch-size", "item-tables", "noise", "seed", "dp", "user-update", "user-steps",
             "user-learning-rate")
"""The keys that shape a site's computation or its privacy: drawn three times as often as the rest."""
CHOICES: dict[str, tuple[str, ...]] = {
    name.replace("_", "-"): tuple(declared.metadata["choices"])
    for name, declared in RunSettings.__dataclass_fields__.items() if declared.metadata["choices"]
}

EXTREME_FLOATS = [0.0, -0.0, -1.0, 5e-324, 1e-300, 1e-9, 0.5, 1.0, 1.0 + 1e-15, 2.0, 1e6, 1e20, 1e30, 1e300,
                  1.7976931348623157e308, -1e30, math.inf, -math.inf, math.nan]
EXTREME_INTS = [0, -1, 1, 2, 3, 7, 4096, 2**31 - 1, 2**31, 2**53 + 1, 2**63 - 1, -(2**63)]
INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


def _right_type(kind: str, key: str) -> st.SearchStrategy[Any]:
    if kind == "float":
        return st.one_of(st.sampled_from(EXTREME_FLOATS), st.floats())
    if kind == "int":
        return st.one_of(st.sampled_from(EXTREME_INTS), INT64)
    if kind == "bool":
        return st.booleans()
    return st.one_of(st.sampled_from([*CHOICES.get(key, ()), "", " ", "../..", "site\x00", "1e30"]),
                     st.text(max_size=12))


def _wrong_type(kind: str) -> st.SearchStrategy[Any]:
    others = {
        "float": st.one_of(st.booleans(), st.sampled_from(["1e-3", "nan", "inf", ""])),
        "int": st.one_of(st.booleans(), st.sampled_from([1.5, 2.0, 1e300, math.nan, math.inf]), st.just("4")),
        "bool": st.one_of(st.sampled_from([0, 1, 2, 0.0, 1.0]), st.sampled_from(["true", "false", "yes", ""])),
        "str": st.one_of(INT64, st.floats(), st.booleans()),
    }
    return others[kind]


def run_value(key: str) -> st.SearchStrategy[Any]:
    kind = RUN_KEYS[key]
    return st.one_of(_right_type(kind, key), _right_type(kind, key), _wrong_type(kind))


UNKNOWN_KEY = st.one_of(st.sampled_from(["learning_rate", "lr", "max-epsilon", "allow-non-private", "data-path",
                                         "Epsilon", "dp ", ""]), st.text(min_size=1, max_size=10))


BENDABLE = [*sorted(RUN_KEYS), *SITE_KEYS, *SITE_KEYS]


@st.composite
def run_configs(draw: st.DrawFn, placement: str) -> dict[str, Any]:
    """A tiny valid run for ``placement``, with up to four keys bent, maybe one removed, and maybe an unknown key
    (few at a time, so that one extreme value meets an otherwise valid run)."""
    config = {**TINY_RUN, **PLACEMENTS[placement][0]}
    for key in draw(st.lists(st.sampled_from(BENDABLE), unique=True, max_size=4)):
        config[key] = draw(run_value(key))
    for key in draw(st.lists(st.sampled_from(sorted(config)), unique=True, max_size=1)):
        del config[key]
    if draw(st.integers(0, 9)) == 0:
        key = draw(UNKNOWN_KEY)
        if key not in RUN_KEYS:
            config[key] = draw(st.one_of(st.floats(), INT64, st.text(max_size=5), st.booleans()))
    return config


BOUND_VALUES = [MAX_ABS_WEIGHT, -MAX_ABS_WEIGHT, math.nextafter(MAX_ABS_WEIGHT, 0), MAX_ABS_WEIGHT * (1 + 1e-6),
                2 * MAX_ABS_WEIGHT, 1e4, 1e30, 1e38, 3.4e38, 5e-324, 0.0, math.inf, -math.inf, math.nan]


@dataclass(frozen=True)
class WeightEdit:
    """One change to the global weights: ``kind`` in value, scale, fill, drop, extra, reshape, dtype."""

    kind: str
    tensor: int
    """Which tensor (modulo the number of tensors, in the state dict's order)."""
    value: float = 0.0
    position: int = 0
    dtype: str = ""


WEIGHT_EDITS = st.one_of(
    st.builds(WeightEdit, st.just("value"), st.integers(0, 63), st.sampled_from(BOUND_VALUES), st.integers(0, 2**16)),
    st.builds(WeightEdit, st.just("fill"), st.integers(0, 63), st.sampled_from(BOUND_VALUES)),
    st.builds(WeightEdit, st.just("scale"), st.integers(0, 63), st.sampled_from([0.0, -1.0, 10.0, 1e3, 1e40])),
    st.builds(WeightEdit, st.sampled_from(["drop", "extra", "reshape"]), st.integers(0, 63)),
    st.builds(WeightEdit, st.just("dtype"), st.integers(0, 63),
              dtype=st.sampled_from(["float64", "float16", "int64", "bool"])),
)
WEIGHTS = st.lists(WEIGHT_EDITS, max_size=2)
"""A list of edits to the model's initial weights (empty: the honest global model)."""


@dataclass(frozen=True)
class TrainStep:
    """A Message-API train request: its round, which weights (edits), and its config record bent or not."""

    round_number: Any
    edits: tuple[WeightEdit, ...]
    config_edit: str = ""
    """'' (honest), or run-id, catalog, version, missing-round, extra-key: what the round's config gets wrong."""


CONFIG_EDITS = st.sampled_from(["", "", "", "run-id", "catalog", "version", "missing-round", "extra-key"])
ROUND_NUMBERS = st.one_of(st.sampled_from([1, 1, 2, 3, 0, -1, 2**31, 1.5, "1"]), INT64)


@st.composite
def train_steps(draw: st.DrawFn, previous: TrainStep | None) -> TrainStep:
    """The next train request: often the same round again (retried, maybe with other weights) or the next one."""
    if previous is not None and draw(st.booleans()):  # a retry of the previous round
        edits = previous.edits if draw(st.booleans()) else tuple(draw(WEIGHTS))
        return TrainStep(previous.round_number, edits, previous.config_edit)
    return TrainStep(draw(ROUND_NUMBERS), tuple(draw(WEIGHTS)), draw(CONFIG_EDITS))


@st.composite
def hostile_runs(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A noise placement (the site opted in to it) and a bent run config; half of them ask for the popularity
    release (``popularity-share`` 0.1 unless that key was bent)."""
    placement = draw(st.sampled_from(sorted(PLACEMENTS)))
    config = draw(run_configs(placement))
    if config.get("popularity-share") == 0.0 and draw(st.booleans()):
        config["popularity-share"] = 0.1
    return placement, config


@st.composite
def requests(draw: st.DrawFn) -> list[TrainStep | str]:
    """Up to three requests: train steps (``train_steps``) and the popularity query (``"query"``), in any order."""
    steps: list[TrainStep | str] = []
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.integers(0, 3)) == 0:
            steps.append("query")
        else:
            previous = next((step for step in reversed(steps) if isinstance(step, TrainStep)), None)
            steps.append(draw(train_steps(previous)))
    return steps


STAGES = ("setup", "share_keys", "collect", "unmask")
HONEST = list(STAGES)


@st.composite
def stage_sequences(draw: st.DrawFn) -> list[str]:
    """SecAgg+ stages for the site under test: the honest order, or it with stages skipped, replayed, swapped or
    with a plain train request (no SecAgg+ records) in between; or any order at all."""
    kind = draw(st.sampled_from(["honest", "mutated", "mutated", "any"]))
    if kind == "any":
        return draw(st.lists(st.sampled_from([*STAGES, "train"]), min_size=1, max_size=6))
    stages = list(HONEST)
    if kind == "mutated":
        for _ in range(draw(st.integers(1, 2))):
            where = draw(st.integers(0, len(stages) - 1))
            change = draw(st.sampled_from(["skip", "replay", "swap", "train"]))
            if change == "skip" and len(stages) > 1:
                del stages[where]
            elif change == "replay":
                stages.insert(where, stages[where])
            elif change == "swap" and where + 1 < len(stages):
                stages[where], stages[where + 1] = stages[where + 1], stages[where]
            elif change == "train":
                stages.insert(where, "train")
    return stages


@dataclass(frozen=True)
class Protocol:
    """What the coordinator's SecAgg+ setup asks: the group's size, threshold, ranges and weight."""

    sample_num: Any = SITES
    threshold: Any = THRESHOLD
    clipping_range: Any = 1e4
    target_range: Any = 2**22
    mod_range: Any = 2**32
    max_weight: Any = 1.0
    dead: tuple[int, ...] = ()
    """Node ids the unmask request names as dropped (the site under test is node 1, its peers 2..5)."""


PROTOCOLS = st.one_of(
    st.just(Protocol()),
    st.builds(
        Protocol,
        sample_num=st.sampled_from([SITES, SITES, 2, 7, 50]),
        threshold=st.sampled_from([THRESHOLD, THRESHOLD, 1, 2, 5, 0]),
        clipping_range=st.sampled_from([1e4, 1.0, 0.0, -1.0, 1e300, math.inf, math.nan, 3]),
        target_range=st.sampled_from([2**22, 2**31, 1]),
        mod_range=st.sampled_from([2**32, 2**22]),
        max_weight=st.sampled_from([1.0, 1000.0, 0.5]),
        dead=st.lists(st.integers(1, SITES), max_size=2, unique=True).map(tuple),
    ),
)
