"""The site's ClientApp runtime: which app bundles it admits, and the Flower behaviour its check relies on.

The refusal itself, through a real SuperLink, SuperNode and runtime, is in tests/deploy (slow).
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import httpx
import pytest
from flwr.supercore.fab import Fab
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supernode.nodestate import NodeStateFactory

from common.errors import ConfigError
from common.flower.runtime import Approval, approved_sha256, bundle_sha256, task_heartbeat
from tests.apps import app_copy


@pytest.fixture(scope="module")
def approval() -> Approval:
    return Approval.for_site([])


def test_the_installed_release_is_approved_and_so_is_any_byte_identical_copy(
    approval: Approval, tmp_path: Path
) -> None:
    """The coordinator's `flwr run` of the same release, from its own folder, uploads the bundle the site approved."""
    assert approval.refusal(approval.installed) is None
    assert bundle_sha256(app_copy(tmp_path)) == approval.installed  # another folder, other file times: same bytes


def test_a_copy_with_client_dp_changed_is_refused_with_its_hash_named(approval: Approval, tmp_path: Path) -> None:
    changed = bundle_sha256(app_copy(tmp_path, "NOISE_OFF = True\n"))
    assert changed != approval.installed
    reason = approval.refusal(changed)
    assert reason is not None and changed in reason and "not approved" in reason
    assert approval.installed[:12] in reason, "the coordinator learns which release the site runs"
    assert Approval.for_site([changed]).refusal(changed) is None, "unless the site approved exactly that bundle"


def test_a_fab_file_is_known_by_the_sha256_of_its_bytes(tmp_path: Path) -> None:
    bundle = tmp_path / "app.fab"
    bundle.write_bytes(b"any bytes")
    assert bundle_sha256(bundle) == hashlib.sha256(b"any bytes").hexdigest()


@pytest.mark.parametrize("text", ["abc", "g" * 64, "0" * 63, ""])
def test_an_approved_hash_must_be_a_sha256(text: str) -> None:
    with pytest.raises(ConfigError, match="not a sha256"):
        approved_sha256(text)
    with pytest.raises(ConfigError, match="not a sha256"):
        Approval.for_site([text])


def test_an_approved_hash_is_read_case_insensitively() -> None:
    assert approved_sha256(" " + "AB" * 32 + "\n") == "ab" * 32


def test_flower_keeps_app_bundles_under_the_sha256_of_their_bytes() -> None:
    """The runtime judges a task by the hash its SuperNode files the bundle under; Flower must compute that hash
    itself from the bytes (corestate ``store_fab``), or a coordinator could file its own code under an approved
    hash. Pinned here so that a Flower upgrade that changes it fails this test."""
    state = NodeStateFactory(objectstore_factory=ObjectStoreFactory()).state()
    approved, other = b"the approved bundle", b"the coordinator's own code"
    approved_hash = hashlib.sha256(approved).hexdigest()
    with pytest.raises(ValueError, match="hash mismatch"):
        state.store_fab(Fab(approved_hash, other, {}))
    assert state.store_fab(Fab("", other, {})) == hashlib.sha256(other).hexdigest()
    assert state.get_fab(approved_hash) is None
    state.store_fab(Fab(approved_hash, approved, {}))
    stored = state.get_fab(approved_hash)
    assert stored is not None and stored.content == approved


def test_a_lost_supernode_is_a_missed_task_heartbeat_not_a_thread_traceback() -> None:
    """Flower's task heartbeat raises on an HTTP error other than 503/504 in its own thread; a SuperNode killed
    mid-task then left an uncaught thread traceback in the site's runtime."""
    class GoneSuperNode:
        calls = 0

        def SendTaskHeartbeat(self, _request: object) -> None:  # noqa: N802 - Flower's name
            GoneSuperNode.calls += 1
            request = httpx.Request("POST", "http://127.0.0.1:9094/heartbeat")
            raise httpx.HTTPStatusError("gone", request=request, response=httpx.Response(500, request=request))

    uncaught: list[BaseException | None] = []
    previous, threading.excepthook = threading.excepthook, lambda hook: uncaught.append(hook.exc_value)
    try:
        sender = HeartbeatSender(task_heartbeat(GoneSuperNode()))  # type: ignore[arg-type]
        sender.start()
        deadline = time.monotonic() + 10
        while GoneSuperNode.calls < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sender.is_running, "the heartbeat thread died"
        sender.stop()
    finally:
        threading.excepthook = previous
    assert GoneSuperNode.calls >= 2 and uncaught == []
