"""A hostile coordinator, fuzzed: whatever it sends, a site's replies stay finite, count-free, within budget.

Hypothesis draws what a coordinator controls (``tests.client.hostile_strategies``): the run config (every key the
site reads, with extreme, non-finite and wrong-typed values, and unknown keys), the global weights (at, below and
above the site's ``max-abs-weight``, non-finite, other shapes and dtypes), and the message sequence (train
requests retried with other weights, the popularity query asked twice, SecAgg+ stages skipped, replayed, swapped
or replaced by a plain train request). Each draw goes through the real ClientApp (``client.app.app``, with its
mods) at two deployed sites whose data differ by one user (0 and 1 users, 1 and 2, 23 and 24), and every reply,
or the error text Flower would send for an exception, must satisfy:

- finite: a reply declines or carries only finite numbers (arrays, metrics, settings);
- neighbour-blind: everything in the reply but the noisy arrays (their names and shapes stay) and the ledger-head
  hash (a hiding commitment), and the random SecAgg+ key material, is identical at the two neighbours;
- within budget: no ledger line, recomputed from the ledger's history, passes the site's ``max-epsilon``, nor its
  fallback epsilon ``max-fallback-epsilon`` (default ``max-epsilon``); no non-private update leaves a site that
  does not allow it, and no ``distributed`` share leaves outside a SecAgg+ exchange;
- count-free text: no string in a reply names the site's files, a user id, or the site's user or interaction
  count;
- bounded work: no request keeps the site busy for more than ``WATCHDOG_S`` CPU seconds or past ``MEMORY_HEADROOM``
  bytes of memory (a coordinator must not be able to size the site's computation without limit).

Budgets: the attacks already named run first, as explicit examples. The default test command then runs
``CI_EXAMPLES`` examples per scenario, derandomized and without an example database, so a CI run is reproducible
(37 s for both scenarios on a loaded two-core machine). The slow mode draws ``FEDTAIL_FUZZ_EXAMPLES`` examples in
all (at least 10,000 is the documented check; about 0.6 s each), split over the two scenarios, with a random
seed::

    FEDTAIL_FUZZ_EXAMPLES=10000 pytest -m slow tests/client/test_hostile_fuzz.py
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import signal
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from client.app import app
from client.secure_aggregation import NAME_SEPARATOR, STATE_NAMES, SUM_NAMES, secure_aggregation_mod
from common.data.catalog import Catalog
from common.errors import FedtailError
from common.federation import RunSettings
from common.privacy.accounting import epsilon_from_history
from common.privacy.fallback import fallback_epsilon
from common.privacy.ledger import Ledger
from common.recommender.model import SASRec
from common.run_files import site_ledger
from tests.client.hostile_strategies import (
    PLACEMENTS,
    PROTOCOLS,
    SITES,
    STAGES,
    TINY_RUN,
    Protocol,
    TrainStep,
    WeightEdit,
    hostile_runs,
    requests,
    run_configs,
    stage_sequences,
    train_steps,
)

CI_EXAMPLES = 30
"""Examples per scenario in the default test command (measured: see docs/privacy.md)."""
SLOW_EXAMPLES = int(os.environ.get("FEDTAIL_FUZZ_EXAMPLES", "10000"))
WATCHDOG_S = 30.0
MEMORY_HEADROOM = 3 * 2**30
ITEMS = 12
NEIGHBOURS = (0, 1, 23)
"""The smaller site's user count; its neighbour has one user more."""
SITE_MARK = "fzsite"
"""Every file and folder of a fuzzed site has this in its name, so a reply naming one is found."""
USER_MARK = "uqx"
"""Every user id starts with this."""
SITE_ID = "north"
BUDGETS = (8.0, 3.5)
EPSILON_TOLERANCE = 1e-6


@pytest.fixture(autouse=True)
def flower_task_identity() -> None:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


@dataclass
class FuzzedSite:
    """One deployed site of a neighbouring pair: its files, node config and Flower state (kept across messages)."""

    root: Path
    users: int
    node_config: dict[str, Any]
    state: RecordDict = field(default_factory=RecordDict)

    @property
    def interactions(self) -> int:
        return sum(_history_length(user) for user in range(self.users))

    @property
    def ledger(self) -> Ledger:
        return Ledger(site_ledger(Path(self.node_config["ledger-dir"]), SITE_ID))


def _history_length(user: int) -> int:
    return 3 + user % 3


def _site(root: Path, users: int, node_extra: Mapping[str, Any]) -> FuzzedSite:
    root.mkdir(parents=True)
    catalog = Catalog.from_items([f"i{i}" for i in range(1, ITEMS + 1)])
    catalog.save(root / f"{SITE_MARK}-catalog.json")
    data = root / f"{SITE_MARK}-data.txt"
    data.write_text("".join(
        f"{USER_MARK}{user} " + " ".join(f"i{(user * 5 + k) % ITEMS + 1}" for k in range(_history_length(user))) + "\n"
        for user in range(users)
    ))
    node = {"data-path": str(data), "catalog-path": str(root / f"{SITE_MARK}-catalog.json"),
            "ledger-dir": str(root / f"{SITE_MARK}-ledgers"), "delta": 1e-5, "site-id": SITE_ID, **node_extra}
    return FuzzedSite(root, users, node)


CATALOG_SHA = Catalog.from_items([f"i{i}" for i in range(1, ITEMS + 1)]).fingerprint()


# ---- running one request, as Flower's SuperNode would ----------------------------------------------------------


class UnboundedWork(Exception):
    """The site had spent ``WATCHDOG_S`` seconds of CPU time on a request."""


@contextmanager
def bounded_work() -> Iterator[None]:
    """Interrupt a request after ``WATCHDOG_S`` CPU seconds, and make an allocation past ``MEMORY_HEADROOM`` fail.

    CPU time, not wall time: a loaded CI machine must not turn a slow but bounded request into a failure.
    """

    def interrupt(_signal: int, _frame: object) -> None:
        raise UnboundedWork

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    in_use = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
    previous = signal.signal(signal.SIGPROF, interrupt)
    signal.setitimer(signal.ITIMER_PROF, WATCHDOG_S)
    resource.setrlimit(resource.RLIMIT_AS, (in_use + MEMORY_HEADROOM, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)


@dataclass(frozen=True)
class Reply:
    """What the coordinator receives: the reply message, or the error reason Flower builds from an exception."""

    message: Message | None
    error: str = ""


def deliver(site: FuzzedSite, message: Message, run_config: Mapping[str, Any], what: str) -> Reply:
    context = Context(run_id=1, node_id=1, node_config=site.node_config, state=site.state,
                      run_config=dict(run_config))
    try:
        with bounded_work():
            answer = app(message, context)
        if answer.has_error():  # the site's own error reply (client.public_errors): what the coordinator reads
            return Reply(None, f"{answer.error.code}:<'{answer.error.reason}'>")
        return Reply(answer)
    except UnboundedWork:
        raise AssertionError(f"bounded work: the site spent {WATCHDOG_S:g} CPU seconds on {what}") from None
    except MemoryError:
        raise AssertionError(f"bounded work: the site ran out of memory with {what}") from None
    except Exception as error:  # noqa: BLE001 - Flower turns any exception into an error reply; so does this
        if "can't allocate memory" in str(error):
            raise AssertionError(f"bounded work: the site ran out of memory with {what}") from None
        return Reply(None, str(type(error)) + ":<'" + str(error) + "'>")  # flwr.supernode.runtime.run_clientapp


# ---- the properties ---------------------------------------------------------------------------------------------


def check_finite(reply: Reply) -> None:
    """A reply declines, or every number it carries is finite."""
    if reply.message is None:
        return
    content = reply.message.content
    for name, record in content.array_records.items():
        for key, array in record.items():
            values = array.numpy()
            if values.dtype.kind in "fc":
                assert np.isfinite(values).all(), f"finite: array {name}/{key} holds non-finite values"
    for name, record in [*content.metric_records.items(), *content.config_records.items()]:
        for key, value in record.items():
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, float):
                    assert math.isfinite(item), f"finite: {name}/{key} = {item}"


def public_view(reply: Reply) -> Any:
    """Everything the coordinator reads but the noisy arrays' values, the ledger-head hash and SecAgg+'s random
    key material (public keys, ciphertexts, masked vectors and shares: their sizes stay)."""
    if reply.message is None:
        return ("error", reply.error)
    content = reply.message.content
    view: dict[str, Any] = {}
    for name, array_record in content.array_records.items():
        view[name] = {key: (tuple(array.shape), array.dtype) for key, array in array_record.items()}
    for name, metric_record in content.metric_records.items():
        view[name] = dict(metric_record)
    for name, config_record in content.config_records.items():
        view[name] = {key: _blind(key, value) for key, value in config_record.items()}
    return view


def _blind(key: str, value: Any) -> Any:
    if key == "ledger-hash":
        return ("hash", len(str(value)))
    if isinstance(value, bytes):
        return ("bytes", len(value))
    if isinstance(value, list):
        return [_blind("", item) for item in value]
    return value


def check_neighbour_blind(reply_a: Reply, reply_b: Reply, site_a: FuzzedSite, site_b: FuzzedSite) -> None:
    view_a, view_b = public_view(reply_a), public_view(reply_b)
    assert view_a == view_b, (
        f"neighbour-blind: a site of {site_a.users} and one of {site_b.users} users replied differently:\n"
        f"  {view_a}\n  {view_b}"
    )


def reply_strings(reply: Reply) -> list[str]:
    if reply.message is None:
        return [reply.error]
    content = reply.message.content
    found: list[str] = []
    for records in (content.array_records, content.metric_records, content.config_records):
        for name, record in records.items():
            found.append(name)
            for key, value in record.items():
                found.append(key)
                for item in value if isinstance(value, list) else [value]:
                    if isinstance(item, str):
                        found.append(item)
    return found


ABSOLUTE_PATH = re.compile(r"(?:^|[\s'\"(=\[])(/[\w.@+-]+(?:/[\w.@+-]*)+)")


def check_text(reply: Reply, site: FuzzedSite, coordinator_text: str) -> None:
    """No reply string names the site's files, a user id, or its user or interaction count (a count, or a path,
    that the coordinator itself sent is only repeated and is allowed)."""
    counts = {site.users, site.interactions} if site.users > 2 else set()
    for text in reply_strings(reply):
        assert SITE_MARK not in text and str(site.root) not in text, f"count-free text: names a site file: {text!r}"
        assert USER_MARK not in text, f"count-free text: names a user id: {text!r}"
        for path in ABSOLUTE_PATH.findall(text):
            assert path in coordinator_text, f"count-free text: names a path: {text!r}"
        for count in counts:
            pattern = re.compile(rf"(?<![\w.]){count}(?![\w.])")
            if pattern.search(text) and not pattern.search(coordinator_text):
                raise AssertionError(f"count-free text: names the count {count} of a site of {site.users}: {text!r}")


def check_budget(site: FuzzedSite, replies: list[Reply]) -> None:
    """Recomputed from the ledger itself: no prefix of the history passes max-epsilon, no distributed prefix
    passes the fallback cap; nothing non-private left a site that does not allow it, and no share left in the
    clear (a reply with arrays but no SecAgg+ record while the ledger's last line is a distributed share)."""
    node = site.node_config
    delta, cap = float(node["delta"]), float(node["max-epsilon"])
    fallback_cap = float(node.get("max-fallback-epsilon", cap))
    entries = site.ledger.entries()
    history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries]
    for line in range(1, len(entries) + 1):
        spent = epsilon_from_history(history[:line], delta)
        assert spent <= cap + EPSILON_TOLERANCE, f"within budget: ledger line {line} reaches {spent:.3f} > {cap}"
        if entries[line - 1].get("noise_placement") == "distributed":
            fallback = fallback_epsilon(entries[:line], delta)
            assert fallback <= fallback_cap + EPSILON_TOLERANCE, (
                f"within budget: ledger line {line} reaches a fallback epsilon {fallback:.3f} > {fallback_cap}"
            )
    for reply in replies:
        if reply.message is None:
            continue
        content = reply.message.content
        sent = any(len(record) for record in content.array_records.values())
        metrics = content.metric_records.get("metrics", {})
        assert not (sent and metrics.get("dp") == 0 and not node.get("allow-non-private")), (
            "within budget: a non-private update left a site that does not allow one"
        )
        in_clear = sent and RECORD_KEY_CONFIGS not in content.config_records
        assert not (in_clear and entries and entries[-1].get("noise_placement") == "distributed"), (
            "within budget: a distributed noise share left in the clear, outside SecAgg+ (only its fallback "
            "epsilon protects it)"
        )


def check_pair(site_a: FuzzedSite, site_b: FuzzedSite, reply_a: Reply, reply_b: Reply, coordinator_text: str,
               history: tuple[list[Reply], list[Reply]]) -> None:
    for site, reply, replies in ((site_a, reply_a, history[0]), (site_b, reply_b, history[1])):
        replies.append(reply)
        check_finite(reply)
        check_text(reply, site, coordinator_text)
        check_budget(site, replies)
    check_neighbour_blind(reply_a, reply_b, site_a, site_b)


# ---- what the coordinator sends ---------------------------------------------------------------------------------


def model_settings(run_config: Mapping[str, Any]) -> RunSettings:
    """The model shape the run asks for when it parses and is small; else the tiny run's (the site must cope)."""
    try:
        asked = RunSettings.from_run_config(run_config)
    except FedtailError:
        return RunSettings.from_run_config(TINY_RUN)
    small = asked.hidden <= 64 and asked.max_len <= 64 and asked.blocks <= 4
    return asked if small else RunSettings.from_run_config(TINY_RUN)


def global_weights(run_config: Mapping[str, Any], edits: tuple[WeightEdit, ...]) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    weights = SASRec(model_settings(run_config).model_config(ITEMS)).state_dict()
    for edit in edits:
        names = list(weights)
        name = names[edit.tensor % len(names)]
        tensor = weights[name].clone()
        if edit.kind == "value" and tensor.numel():  # a run asking hidden = 0 has empty tensors
            tensor.view(-1)[edit.position % tensor.numel()] = edit.value
        elif edit.kind == "fill":
            tensor.fill_(edit.value)
        elif edit.kind == "scale":
            tensor = tensor * edit.value
        elif edit.kind == "drop":
            del weights[name]
            continue
        elif edit.kind == "extra":
            weights[f"{name}.extra"] = torch.zeros(2)
            continue
        elif edit.kind == "reshape":
            tensor = tensor.reshape(-1)[: max(1, tensor.numel() - 1)]
        elif edit.kind == "dtype":
            tensor = tensor.to(getattr(torch, edit.dtype))
        weights[name] = tensor
    return weights


def round_config(step: TrainStep) -> dict[str, Any]:
    config: dict[str, Any] = {"server-round": step.round_number, "run-id": "r1", "catalog-sha256": CATALOG_SHA,
                              "flwr-version": version("flwr")}
    if step.config_edit == "run-id":
        config["run-id"] = "r2"
    elif step.config_edit == "catalog":
        config["catalog-sha256"] = "0" * 64
    elif step.config_edit == "version":
        config["flwr-version"] = "0.0.1"
    elif step.config_edit == "missing-round":
        del config["server-round"]
    elif step.config_edit == "extra-key":
        config["max-epsilon"] = 1e9
    return config


def train_message(run_config: Mapping[str, Any], step: TrainStep) -> Message:
    content = RecordDict({"arrays": ArrayRecord(global_weights(run_config, step.edits)),
                          "config": ConfigRecord(round_config(step))})
    return Message(content=content, dst_node_id=1, message_type="train")


def query_message() -> Message:
    config = ConfigRecord({"run-id": "r1", "catalog-sha256": CATALOG_SHA, "flwr-version": version("flwr")})
    return Message(content=RecordDict({"config": config}), dst_node_id=1, message_type="query")


def coordinator_text(run_config: Mapping[str, Any], extra: object = "") -> str:
    """What the coordinator itself wrote, as text: a site may repeat it."""
    return json.dumps({"run": {key: repr(value) for key, value in run_config.items()}, "extra": repr(extra)})


# ---- scenario 1: train requests and popularity queries ----------------------------------------------------------


def node_extra(placement: str, budget: float) -> dict[str, Any]:
    return {"max-epsilon": budget, **PLACEMENTS[placement][1]}


def fuzz_requests(placement: str, run_config: dict[str, Any], steps: list[TrainStep | str], smaller: int,
                  budget: float) -> None:
    with tempfile.TemporaryDirectory(prefix=f"{SITE_MARK}-") as root:
        sites = [_site(Path(root) / f"{SITE_MARK}-{users}", users, node_extra(placement, budget))
                 for users in (smaller, smaller + 1)]
        text = coordinator_text(run_config, [round_config(step) for step in steps if isinstance(step, TrainStep)])
        history: tuple[list[Reply], list[Reply]] = ([], [])
        for step in steps:
            what = f"{step!r} under {run_config}"
            replies = [
                deliver(site, query_message() if step == "query" else train_message(run_config, step),  # type: ignore[arg-type]
                        run_config, what)
                for site in sites
            ]
            check_pair(sites[0], sites[1], replies[0], replies[1], text, history)


def _budget(scenario_share: int, slow: bool) -> settings:
    if slow:
        return settings(max_examples=max(1, -(-SLOW_EXAMPLES // scenario_share)), deadline=None, database=None,
                        suppress_health_check=list(HealthCheck), print_blob=True)
    return settings(max_examples=CI_EXAMPLES, derandomize=True, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=True)


SCENARIOS = 2
BUDGET_MODES = [pytest.param(False, id="ci"), pytest.param(True, id="slow", marks=pytest.mark.slow)]


ROUND_1 = [TrainStep(1, ())]
DISTRIBUTED_RUN = {**TINY_RUN, **PLACEMENTS["distributed"][0]}


@pytest.mark.parametrize("slow", BUDGET_MODES)
def test_train_and_popularity_requests_from_a_hostile_coordinator(slow: bool) -> None:
    """The attacks already named come first, as explicit examples; then the draws."""

    @_budget(SCENARIOS, slow)
    @given(run=hostile_runs(), steps=requests(), smaller=st.sampled_from(NEIGHBOURS), budget=st.sampled_from(BUDGETS))
    @example(run=("site", TINY_RUN), steps=ROUND_1, smaller=0, budget=8.0)  # empty site: trains pure noise
    @example(run=("site", TINY_RUN), steps=ROUND_1, smaller=1, budget=8.0)  # one user
    @example(run=("site", {**TINY_RUN, "learning-rate": 1e30}), steps=ROUND_1, smaller=23, budget=8.0)
    @example(run=("distributed", DISTRIBUTED_RUN), steps=ROUND_1, smaller=23, budget=8.0)  # a share in the clear
    @example(run=("site", {**TINY_RUN, "popularity-share": 0.1}), steps=["query", "query", *ROUND_1], smaller=23,
             budget=8.0)
    @example(run=("site", {**TINY_RUN, "sample-rate": 1e-9}), steps=ROUND_1, smaller=23, budget=8.0)  # work:
    @example(run=("site", {**TINY_RUN, "local-epochs": 1e6}), steps=ROUND_1, smaller=23, budget=8.0)  # steps,
    @example(run=("site", {**TINY_RUN, "rounds": 2**63 - 1}), steps=ROUND_1, smaller=23, budget=8.0)  # calibration,
    @example(run=("site", {**TINY_RUN, "epsilon": 1e300}), steps=ROUND_1, smaller=23, budget=8.0)
    @example(run=("site", {**TINY_RUN, "max-len": 2**31 - 1}), steps=ROUND_1, smaller=23, budget=8.0)  # memory
    @example(run=("site", {**TINY_RUN, "hidden": 0}), steps=ROUND_1, smaller=23, budget=8.0)  # an error naming the
    # Poisson batch's size
    def fuzz(run: tuple[str, dict[str, Any]], steps: list[TrainStep | str], smaller: int, budget: float) -> None:
        fuzz_requests(run[0], dict(run[1]), steps, smaller, budget)

    fuzz()


# ---- scenario 2: SecAgg+ stages in any order --------------------------------------------------------------------


SITE_NODE = 1


@dataclass
class SecAggGroup:
    """The four honest peers of the site under test in one SecAgg+ group, and what the coordinator kept of them."""

    protocol: Protocol
    peers: dict[int, RecordDict] = field(default_factory=lambda: {node: RecordDict() for node in range(2, SITES + 1)})
    peer_keys: dict[int, list[bytes]] = field(default_factory=dict)
    site_keys: list[bytes] = field(default_factory=lambda: [os.urandom(32), os.urandom(32)])
    to_site: dict[int, bytes] = field(default_factory=dict)

    def setup_config(self) -> dict[str, Any]:
        p = self.protocol
        return {Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: p.sample_num, Key.SHARE_NUMBER: p.sample_num,
                Key.THRESHOLD: p.threshold, Key.CLIPPING_RANGE: p.clipping_range, Key.TARGET_RANGE: p.target_range,
                Key.MOD_RANGE: p.mod_range, Key.MAX_WEIGHT: p.max_weight}

    def peer_stage(self, config: dict[str, Any]) -> dict[int, ConfigRecord]:
        """Run one stage at every honest peer (Flower's own secaggplus_mod); what each replied (none if it failed)."""
        replies: dict[int, ConfigRecord] = {}
        for node, state in self.peers.items():
            message = Message(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(dict(config))}), dst_node_id=node,
                              message_type="train")
            context = Context(run_id=1, node_id=node, node_config={}, state=state, run_config={})
            try:
                reply = secure_aggregation_mod(message, context, _never)
            except Exception:  # noqa: BLE001 - Flower's own checks refuse what the coordinator got wrong
                continue
            replies[node] = reply.content.config_records[RECORD_KEY_CONFIGS]
        return replies

    def keys_config(self) -> dict[str, Any]:
        return {Key.STAGE: Stage.SHARE_KEYS, str(SITE_NODE): list(self.site_keys),
                **{str(node): keys for node, keys in self.peer_keys.items()}}

    def message(self, stage: str, run_config: Mapping[str, Any], round_step: TrainStep) -> Message:
        """The coordinator's next message to the site, built from what the peers sent so far."""
        if stage == "setup":
            config = self.setup_config()
            self.peer_keys = {node: [reply[Key.PUBLIC_KEY_1], reply[Key.PUBLIC_KEY_2]]  # type: ignore[list-item]
                              for node, reply in self.peer_stage(config).items()}
        elif stage == "share_keys":
            config = self.keys_config()
            self.to_site = {}
            for node, reply in self.peer_stage(config).items():
                for destination, ciphertext in zip(reply[Key.DESTINATION_LIST], reply[Key.CIPHERTEXT_LIST],  # type: ignore[arg-type]
                                                   strict=True):
                    if destination == SITE_NODE:
                        self.to_site[node] = ciphertext
        elif stage == "collect":
            config = {Key.STAGE: Stage.COLLECT_MASKED_VECTORS, Key.CIPHERTEXT_LIST: list(self.to_site.values()),
                      Key.SOURCE_LIST: list(self.to_site)}
        elif stage == "unmask":
            alive = [node for node in range(1, SITES + 1) if node not in self.protocol.dead or node == SITE_NODE]
            config = {Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: alive,
                      Key.DEAD_NODE_ID_LIST: list(self.protocol.dead)}
        else:
            return train_message(run_config, round_step)
        content = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(config)})
        if stage == "collect":
            weights = global_weights(run_config, round_step.edits)
            trainable = [name for name, parameter in SASRec(model_settings(run_config).model_config(ITEMS))
                         .named_parameters() if parameter.requires_grad]
            fit_config = {**round_config(round_step), STATE_NAMES: NAME_SEPARATOR.join(weights),
                          SUM_NAMES: NAME_SEPARATOR.join(trainable)}
            parameters = ndarrays_to_parameters([tensor.numpy() for tensor in weights.values()])
            content = compat.fitins_to_recorddict(FitIns(parameters, fit_config), keep_input=True)
            content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(config)
        return Message(content=content, dst_node_id=SITE_NODE, message_type="train")

    def remember(self, stage: str, reply: Reply) -> None:
        if stage == "setup" and reply.message is not None:
            configs = reply.message.content.config_records[RECORD_KEY_CONFIGS]
            self.site_keys = [configs[Key.PUBLIC_KEY_1], configs[Key.PUBLIC_KEY_2]]  # type: ignore[list-item]


def _never(_message: Message, _context: Context) -> Message:
    raise ValueError("an honest peer is never asked to train here")


def fuzz_secure_aggregation(run_config: dict[str, Any], stages: list[str], protocol: Protocol, step: TrainStep,
                            smaller: int, budget: float) -> None:
    with tempfile.TemporaryDirectory(prefix=f"{SITE_MARK}-") as root:
        sites = [_site(Path(root) / f"{SITE_MARK}-{users}", users, node_extra("distributed", budget))
                 for users in (smaller, smaller + 1)]
        groups = [SecAggGroup(protocol) for _ in sites]
        text = coordinator_text(run_config, [protocol, round_config(step)])
        history: tuple[list[Reply], list[Reply]] = ([], [])
        for stage in stages:
            replies = []
            for site, group in zip(sites, groups, strict=True):
                reply = deliver(site, group.message(stage, run_config, step), run_config,
                                f"SecAgg+ {stages} at '{stage}' under {run_config}, {protocol}, {step}")
                group.remember(stage, reply)
                replies.append(reply)
            check_pair(sites[0], sites[1], replies[0], replies[1], text, history)


@pytest.mark.parametrize("slow", BUDGET_MODES)
def test_secure_aggregation_stages_from_a_hostile_coordinator(slow: bool) -> None:
    @_budget(SCENARIOS, slow)
    @given(run_config=run_configs("distributed"), stages=stage_sequences(), protocol=PROTOCOLS,
           step=train_steps(None), smaller=st.sampled_from(NEIGHBOURS), budget=st.sampled_from(BUDGETS))
    @example(run_config=DISTRIBUTED_RUN, stages=list(STAGES), protocol=Protocol(), step=ROUND_1[0], smaller=23,
             budget=8.0)
    def fuzz(run_config: dict[str, Any], stages: list[str], protocol: Protocol, step: TrainStep, smaller: int,
             budget: float) -> None:
        fuzz_secure_aggregation(run_config, stages, protocol, step, smaller, budget)

    fuzz()
