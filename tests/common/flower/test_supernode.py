"""`python -m client.supernode`: it waits for the coordinator to register its key, saying so, and shows all options."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from flwr.supercore.error import ApiErrorCode, FlowerError

from common.flower.supernode import main, wait_for_activation


def _answer(code: int, status: int = 412) -> httpx.HTTPStatusError:
    request = httpx.Request("POST", "https://127.0.0.1:9092/v1/fleet/activate-node")
    body = FlowerError(code, "internal").to_json("Failed to activate SuperNode.")
    response = httpx.Response(status, json=body, request=request)
    return httpx.HTTPStatusError("refused", request=request, response=response)


class _Fleet:
    """Flower's Fleet API client, as far as activation goes: refused ``refusals`` times, then activated. Each test
    patches a subclass of its own (``_fleet``), as the command patches Flower's class."""

    def __init__(self, refusals: int, code: int = ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED) -> None:
        self.refusals, self.code, self.calls = refusals, code, 0

    def ActivateNode(self, request: Any) -> str:  # noqa: N802 - Flower's name
        self.calls += 1
        if self.calls <= self.refusals:
            raise _answer(self.code)
        return f"activated {request}"


def _fleet(refusals: int, code: int = ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED) -> _Fleet:
    return type("Fleet", (_Fleet,), {})(refusals, code)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_a_refused_activation_is_retried_with_a_message_naming_registration(
    capsys: pytest.CaptureFixture[str],
) -> None:
    clock = _Clock()
    fleet = _fleet(refusals=3)
    wait_for_activation(type(fleet), retry_s=10, wait_s=600, clock=clock, sleep=clock.sleep)
    assert fleet.ActivateNode("request") == "activated request"
    assert fleet.calls == 4 and clock.now == 30
    said = capsys.readouterr().err
    assert said.count("refused to activate this SuperNode") == 3
    assert "flwr supernode register NAME.pub" in said and "about a minute" in said


def test_after_the_wait_and_for_other_errors_flower_gets_the_refusal() -> None:
    clock = _Clock()
    fleet = _fleet(refusals=100)
    wait_for_activation(type(fleet), retry_s=10, wait_s=25, clock=clock, sleep=clock.sleep)
    with pytest.raises(httpx.HTTPStatusError):
        fleet.ActivateNode("request")
    assert fleet.calls == 3  # at 0, 10 and 20 s; at 20 s fewer than 10 s were left
    other = _fleet(refusals=1, code=ApiErrorCode.FLEET_INVALID_HEARTBEAT_INTERVAL)
    wait_for_activation(type(other), retry_s=10, wait_s=600, clock=clock, sleep=clock.sleep)
    with pytest.raises(httpx.HTTPStatusError):
        other.ActivateNode("request")
    assert other.calls == 1


def test_help_shows_this_commands_options_and_flowers(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    shown = capsys.readouterr().out
    for option in ("--idle-poll", "--activation-wait", "--superlink", "--root-certificates", "--node-config",
                   "--isolation", "--auth-supernode-private-key"):
        assert option in shown, option
