"""The site's SuperNode entry point: Flower's loop with its polls capped, nothing else changed; a Flower version whose
loop was not read is refused. The real processes run in tests/deploy (every deployed site starts through it)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

from client import supernode
from client.supernode import CappedSleep, cap_polls, idle_poll_seconds
from common.errors import ConfigError


def test_capped_sleep_waits_at_most_the_cap_and_passes_the_rest_of_time_through() -> None:
    capped = CappedSleep(0.05)
    started = time.monotonic()
    capped.sleep(3)
    assert 0.04 <= time.monotonic() - started < 1.0
    started = time.monotonic()
    capped.sleep(0.01)
    assert time.monotonic() - started < 0.05
    assert capped.time is time.time and capped.monotonic is time.monotonic


def test_the_loop_module_gets_the_capped_time_only_for_flower_versions_whose_loop_was_read() -> None:
    loop = ModuleType("flwr.supernode.start_client_internal")
    loop.time = time  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match=r"flwr 9\.9\.9: .*checked against the SuperNode loop"):
        cap_polls(loop, 0.2, "9.9.9")
    assert loop.time is time  # type: ignore[attr-defined]
    cap_polls(loop, 0.2, "1.41.0")
    assert isinstance(loop.time, CappedSleep) and loop.time.cap == 0.2  # type: ignore[attr-defined]
    changed = ModuleType("flwr.supernode.start_client_internal")
    with pytest.raises(ConfigError, match="no longer sleeps through the time module"):
        cap_polls(changed, 0.2, "1.41.0")


def test_the_installed_flower_loop_sleeps_through_its_time_module() -> None:
    """The premise of the cap: the pinned Flower's SuperNode loop calls ``time.sleep`` of its own module."""
    text = Path(supernode.start_client_internal.__file__ or "").read_text(encoding="utf-8")
    assert "time.sleep(3)" in text and "import time\n" in text


@pytest.mark.parametrize("text", ["0", "-1", "nan", "inf", "4", "soon"])
def test_an_idle_poll_outside_a_hundredth_to_three_seconds_is_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="between 0.01 and 3"):
        idle_poll_seconds(text)
    assert idle_poll_seconds("0.2") == 0.2


def test_main_hands_every_other_option_to_flowers_supernode(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}

    def flower_supernode() -> None:
        seen["argv"] = list(sys.argv)
        seen["sleep_cap"] = supernode.start_client_internal.time.cap  # type: ignore[attr-defined]

    monkeypatch.setattr(supernode, "flower_supernode", flower_supernode)
    monkeypatch.setattr(supernode.start_client_internal, "time", time)
    monkeypatch.setattr("sys.argv", ["python"])
    supernode.main(["--insecure", "--idle-poll", "0.3", "--node-config", "max-epsilon=8.0", "--isolation", "process"])
    assert seen == {
        "argv": ["flower-supernode", "--insecure", "--node-config", "max-epsilon=8.0", "--isolation", "process"],
        "sleep_cap": 0.3,
    }
