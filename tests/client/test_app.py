"""The ClientApp's reply holds only what the privacy model allows to leave a site."""

from __future__ import annotations

import math
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.app import train
from client.shard import simulated_shard
from common.data.catalog import Catalog
from common.errors import ConfigError, DataError
from common.federation import RunSettings
from common.privacy.ledger import GENESIS_HASH, Ledger
from common.protocol.records import REPLY_METRICS, REPLY_SITE_FIELDS
from common.recommender.model import SASRec


@pytest.fixture(autouse=True)
def flower_task_identity() -> None:
    """Flower stamps messages with the running task's identity; a test is its own task."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


SETTINGS = RunSettings(
    dataset="synthetic:users=200,items=80,seed=4", rounds=2, epsilon=4.0, delta=1e-5, hidden=16, heads=1,
    blocks=1, max_len=10, batch_size=16,
)


def _train_config(round_number: int, catalog: Catalog, **overrides: str) -> ConfigRecord:
    """What the ServerApp sends with each round."""
    config = {"server-round": round_number, "run-id": "r1", "catalog-sha256": catalog.fingerprint(),
              "flwr-version": version("flwr")}
    return ConfigRecord({**config, **overrides})


def _call(settings: RunSettings, node_config: dict, round_number: int = 1, **config: str) -> Message:
    shard = simulated_shard(settings.dataset, 0, "uniform", 0, 0, 2, settings.max_len)
    torch.manual_seed(0)
    model = SASRec(settings.model_config(shard.catalog.num_items))
    content = RecordDict(
        {"arrays": ArrayRecord(model.state_dict()), "config": _train_config(round_number, shard.catalog, **config)}
    )
    message = Message(content=content, dst_node_id=1, message_type="train")
    context = Context(
        run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=settings.to_run_config()
    )
    return train(message, context)


def test_reply_contains_only_weights_site_id_epsilon_flags_and_ledger_head(tmp_path: Path) -> None:
    settings = RunSettings(**{**SETTINGS.__dict__, "out_dir": str(tmp_path)})
    reply = _call(settings, {"partition-id": 0, "num-partitions": 2})
    content = reply.content
    assert set(content.keys()) == {"arrays", "metrics", "site"}
    assert set(content["metrics"].keys()) == set(REPLY_METRICS)
    assert set(content["site"].keys()) == {"site-id", "ledger-hash"}
    assert content["metrics"]["weight"] == 1.0, "a declared weight, never the site's user count"
    model_keys = set(SASRec(settings.model_config(78)).state_dict().keys())
    assert set(content["arrays"].keys()) == model_keys, "model weights and nothing else"
    ledger = Ledger(tmp_path / "ledgers" / "site-0.jsonl")
    assert content["metrics"]["epsilon"] == pytest.approx(ledger.epsilon(settings.delta))
    lines, last_hash = ledger.head()
    assert lines == 1 and (content["metrics"]["ledger-lines"], content["site"]["ledger-hash"]) == (lines, last_hash)


def test_declined_reply_carries_no_weights_and_says_why(tmp_path: Path) -> None:
    settings = RunSettings(**{**SETTINGS.__dict__, "out_dir": str(tmp_path)})
    reply = _call(settings, {"partition-id": 1, "num-partitions": 2, "max-epsilon": 0.5})
    content = reply.content
    assert set(content.keys()) == {"metrics", "site"}
    assert set(content["site"].keys()) == set(REPLY_SITE_FIELDS)
    assert "budget of 0.5" in content["site"]["reason"]
    assert content["metrics"]["declined"] == 1 and content["metrics"]["epsilon"] == 0.0
    assert content["metrics"]["ledger-lines"] == 0 and content["site"]["ledger-hash"] == GENESIS_HASH


def test_non_private_reply_has_no_epsilon(tmp_path: Path) -> None:
    settings = RunSettings(**{**SETTINGS.__dict__, "out_dir": str(tmp_path), "dp": False})
    with pytest.warns(UserWarning, match="NON-PRIVATE"):
        reply = _call(settings, {"partition-id": 0, "num-partitions": 2, "allow-non-private": True})
    assert "epsilon" not in reply.content["metrics"] and reply.content["metrics"]["dp"] == 0
    assert not math.isnan(float(reply.content["metrics"]["weight"]))


def test_deployed_site_needs_its_own_budget_and_data(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data-path"):
        _call(SETTINGS, {"catalog-path": "x", "ledger-dir": "y"})


def test_a_ledger_cut_short_between_rounds_stops_the_site(tmp_path: Path) -> None:
    settings = RunSettings(**{**SETTINGS.__dict__, "out_dir": str(tmp_path)})
    state = RecordDict()
    node = {"partition-id": 0, "num-partitions": 2}
    shard = simulated_shard(settings.dataset, 0, "uniform", 0, 0, 2, settings.max_len)
    model = SASRec(settings.model_config(shard.catalog.num_items))

    def call(round_number: int) -> Message:
        content = RecordDict(
            {"arrays": ArrayRecord(model.state_dict()),
             "config": _train_config(round_number, shard.catalog)}
        )
        context = Context(run_id=1, node_id=1, node_config=node, state=state, run_config=settings.to_run_config())
        return train(Message(content=content, dst_node_id=1, message_type="train"), context)

    call(1)
    call(2)
    ledger_path = tmp_path / "ledgers" / "site-0.jsonl"
    lines = ledger_path.read_text().splitlines()
    ledger_path.write_text(lines[0] + "\n")  # the last line removed: the chain alone looks fine
    assert len(Ledger(ledger_path).entries()) == 1
    with pytest.raises(DataError, match="lost or changed entries"):
        call(3)


def test_the_coordinator_cannot_raise_a_deployed_sites_budget(tmp_path: Path) -> None:
    data = tmp_path / "site.txt"
    data.write_text("".join(f"u{u} i{(u * 3 + k) % 40}\n" for u in range(60) for k in range(6)))
    catalog = Catalog.from_items([f"i{i}" for i in range(40)])
    catalog.save(tmp_path / "catalog.json")
    settings = RunSettings(**{**SETTINGS.__dict__, "epsilon": 8.0, "delta": 1e-3})  # the run asks for epsilon 8
    node = {"data-path": str(data), "catalog-path": str(tmp_path / "catalog.json"),
            "ledger-dir": str(tmp_path / "ledger"), "max-epsilon": 0.5, "delta": 1e-3, "site-id": "north",
            "window-epsilon": 0}  # the per-run cap off: the lifetime budget alone must decline
    model = SASRec(settings.model_config(catalog.num_items))
    content = RecordDict(
        {"arrays": ArrayRecord(model.state_dict()), "config": _train_config(1, catalog)}
    )
    context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=settings.to_run_config())
    reply = train(Message(content=content, dst_node_id=1, message_type="train"), context)
    assert reply.content["metrics"]["declined"] == 1
    assert "budget of 0.5" in reply.content["site"]["reason"]
    assert not (tmp_path / "ledger" / "site-north.jsonl").exists()


def test_a_site_refuses_a_coordinator_on_another_flower_version(tmp_path: Path) -> None:
    settings = RunSettings(**{**SETTINGS.__dict__, "out_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"Flower version mismatch: the coordinator runs flwr 1\.0\.0"):
        _call(settings, {"partition-id": 0, "num-partitions": 2}, **{"flwr-version": "1.0.0"})
    assert not (tmp_path / "ledgers").exists(), "refused before anything was trained or charged"


def test_a_site_refuses_weights_for_another_catalogue(tmp_path: Path) -> None:
    settings = RunSettings(**{**SETTINGS.__dict__, "out_dir": str(tmp_path)})
    other = Catalog.from_items(["x", "y"]).fingerprint()
    with pytest.raises(ConfigError, match="catalogue mismatch"):
        _call(settings, {"partition-id": 0, "num-partitions": 2}, **{"catalog-sha256": other})
