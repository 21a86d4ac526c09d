"""Flower's waits shortened in one module at a time (the site's SuperNode loop, the ServerApp's Grid), nothing else
changed; a Flower version whose modules were not read is refused. The real processes run in tests/deploy (every
deployed site starts through ``client.supernode``, every deployed ServerApp through ``common.flower.polling_grid``)."""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path
from types import ModuleType

import pytest
from flwr.supercore.inflatable.inflatable_utils import pull_objects
from flwr.supernode import start_client_internal

from common.errors import ConfigError
from common.flower import supernode
from common.flower.pacing import (
    LOCAL_WAIT_SECONDS,
    OBJECT_RETRY_SECONDS,
    CappedSleep,
    cap_sleeps,
    quick_object_pulls,
)
from common.flower.supernode import idle_poll_seconds


def test_capped_sleep_caps_the_idle_poll_and_the_local_waits_apart_and_passes_the_rest_of_time_through(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    capped = CappedSleep(0.2)
    capped.sleep(3)  # Flower's idle poll of the SuperLink
    capped.sleep(0.5)  # Flower's wait for its ClientApp's reply
    capped.sleep(0.01)
    assert slept == [0.2, LOCAL_WAIT_SECONDS, 0.01] and LOCAL_WAIT_SECONDS <= 0.05
    assert capped.time is time.time and capped.monotonic is time.monotonic


def test_a_loop_module_gets_the_capped_time_only_for_flower_versions_whose_loop_was_read() -> None:
    loop = ModuleType("flwr.supernode.start_client_internal")
    loop.time = time  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match=r"flwr 9\.9\.9: .*checked against flwr 1\.41\.0"):
        cap_sleeps(loop, 0.2, "9.9.9")
    assert loop.time is time  # type: ignore[attr-defined]
    cap_sleeps(loop, 0.2, "1.41.0")
    cap_sleeps(loop, 0.3, "1.41.0")
    assert isinstance(loop.time, CappedSleep) and loop.time.cap == 0.3  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="no longer sleeps through the time module"):
        cap_sleeps(ModuleType("changed"), 0.2, "1.41.0")


def test_a_module_pulls_missing_message_parts_again_after_five_hundredths_of_a_second() -> None:
    grid = ModuleType("flwr.superlink.grid.http_grid")
    grid.pull_objects = pull_objects  # type: ignore[attr-defined]
    quick_object_pulls(grid, "1.41.0")
    quick_object_pulls(grid, "1.41.0")
    pulls = grid.pull_objects  # type: ignore[attr-defined]
    assert isinstance(pulls, partial) and pulls.func is pull_objects
    assert (pulls.keywords["initial_backoff"], pulls.keywords["backoff_cap"]) == OBJECT_RETRY_SECONDS
    with pytest.raises(ConfigError, match="no longer pulls message parts"):
        quick_object_pulls(ModuleType("changed"), "1.41.0")


def test_the_installed_flower_modules_wait_where_they_were_read_to() -> None:
    """The premise: the pinned Flower's SuperNode loop sleeps through its ``time`` and pulls with ``pull_objects``."""
    text = Path(start_client_internal.__file__ or "").read_text(encoding="utf-8")
    assert "time.sleep(3)" in text and "import time\n" in text and "obj_contents = pull_objects(" in text


@pytest.mark.parametrize("text", ["0", "-1", "nan", "inf", "4", "soon"])
def test_an_idle_poll_outside_a_hundredth_to_three_seconds_is_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="between 0.01 and 3"):
        idle_poll_seconds(text)
    assert idle_poll_seconds("0.2") == 0.2


def test_the_site_supernode_hands_every_other_option_to_flowers(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}

    def flower_supernode() -> None:
        seen["argv"] = list(sys.argv)
        seen["sleep_cap"] = supernode.start_client_internal.time.cap  # type: ignore[attr-defined]
        seen["pulls"] = supernode.start_client_internal.pull_objects.keywords  # type: ignore[attr-defined]

    monkeypatch.setattr(supernode, "flower_supernode", flower_supernode)
    monkeypatch.setattr(start_client_internal, "time", time)
    monkeypatch.setattr(start_client_internal, "pull_objects", pull_objects)
    monkeypatch.setattr("sys.argv", ["python"])
    supernode.main(["--insecure", "--idle-poll", "0.3", "--node-config", "max-epsilon=8.0", "--isolation", "process"])
    assert seen == {
        "argv": ["flower-supernode", "--insecure", "--node-config", "max-epsilon=8.0", "--isolation", "process"],
        "sleep_cap": 0.3,
        "pulls": {"initial_backoff": 0.05, "backoff_cap": 0.5},
    }
