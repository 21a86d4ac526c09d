"""The coordinator's popularity floor: the query it sends, the sum of the replies, the bias and prior made from it."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.supercore.task_identity import TaskIdentity

from common.data.catalog import Catalog
from common.federation import RunSettings
from common.privacy.popularity import POPULARITY_ARRAY, POPULARITY_BOUND, popularity_step
from common.protocol.records import NOISE_MULTIPLIER_METRIC
from common.recommender.model import ModelConfig, SASRec
from server.popularity import (
    PRIOR_SMOOTHING,
    PopularityFloor,
    central_popularity_mechanism,
    initialise_output_bias,
    load_popularity,
    request_popularity,
    save_popularity,
)

ITEMS = 5


class _Grid:
    """Flower's Grid as ``request_popularity`` uses it: three nodes, answering as the sites would."""

    def __init__(self, answers: dict[int, RecordDict]) -> None:
        self.answers = answers
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.answers)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        self.sent = list(messages)
        return [Message(self.answers[m.metadata.dst_node_id], reply_to=m) for m in self.sent]


def _answer(site: str, vector: torch.Tensor | None, epsilon: float = 1.0) -> RecordDict:
    metrics = MetricRecord({"weight": 1.0, "dp": 1, "declined": int(vector is None), "epsilon": epsilon,
                            "ledger-lines": 1})
    content = RecordDict({"metrics": metrics, "site": ConfigRecord({"site-id": site, "ledger-hash": "ab" * 32})})
    if vector is None:
        content["site"]["reason"] = "declined: over budget"
    else:
        content["arrays"] = ArrayRecord({POPULARITY_ARRAY: vector})
    return content


def test_the_coordinator_queries_every_site_and_sums_what_the_valid_replies_release(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
    catalog = Catalog([str(i) for i in range(1, ITEMS + 1)])
    grid = _Grid({
        11: _answer("a", torch.tensor([0.0, 5.0, 1.0, -2.0, 0.5, 3.0])),
        12: _answer("b", torch.tensor([0.0, 4.0, 0.0, 1.0, 0.5, 1.0]), epsilon=0.9),
        13: _answer("c", None),
        14: _answer("d", torch.tensor([0.0, float("nan"), 0.0, 0.0, 0.0, 0.0])),  # hostile or broken: left out
    })
    floor = request_popularity(grid, RunSettings(popularity_share=0.3), "run-a", catalog)  # type: ignore[arg-type]
    assert {m.metadata.message_type for m in grid.sent} == {MessageType.QUERY} and len(grid.sent) == 4
    assert str(grid.sent[0].content.config_records["config"]["run-id"]) == "run-a"
    torch.testing.assert_close(floor.noisy_sum, torch.tensor([0.0, 9.0, 1.0, -1.0, 1.0, 4.0]))
    assert floor.sites == ["a", "b"] and list(floor.declined) == ["c"] and len(floor.failures) == 1
    assert floor.site_epsilon == {"a": 1.0, "b": 0.9, "c": 1.0, "d": 1.0}


def test_the_prior_clips_negative_counts_smooths_and_the_bias_reproduces_it(tmp_path: Path) -> None:
    floor = PopularityFloor(torch.tensor([0.0, 9.0, 1.0, -1.0, 1.0, 4.0]))
    prior = floor.prior()
    counts = torch.tensor([0.0, 9.0, 1.0, 0.0, 1.0, 4.0]) + PRIOR_SMOOTHING
    counts[0] = 0.0
    torch.testing.assert_close(prior, counts / counts.sum())
    model = SASRec(ModelConfig(num_items=ITEMS, max_len=4, hidden=8, heads=1, blocks=1, dropout=0.0))
    initialise_output_bias(model, prior)
    torch.testing.assert_close(torch.softmax(model.output.bias[1:], dim=0), prior[1:])
    assert float(model.output.bias.abs().max()) < 100, "within a site's default max-abs-weight"
    save_popularity(tmp_path, floor, RunSettings(popularity_share=0.3))
    again = load_popularity(tmp_path)
    assert again is not None and torch.equal(again.noisy_sum, floor.noisy_sum)


def test_under_central_noise_the_coordinator_adds_one_noise_of_the_largest_sigma_required(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two sites send un-noised sums and the multiplier their epsilon assumes; the floor is their sum plus ONE
    Gaussian of std sigma (the larger of the two, above the run's own): a noise per site, the smaller sigma or no
    noise would all fail the tolerance. A central reply without its multiplier is left out."""
    for name in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
    items = 40_000
    catalog = Catalog([str(i) for i in range(1, items + 1)])
    settings = RunSettings(noise="central", popularity_share=0.3, epsilon=8.0)
    own = popularity_step(settings.epsilon, settings.delta, settings.popularity_share)[0]
    ones = torch.ones(items + 1)
    ones[0] = 0.0
    answers = {11: _answer("a", ones), 12: _answer("b", ones), 13: _answer("c", ones)}
    answers[11]["metrics"][NOISE_MULTIPLIER_METRIC] = own
    answers[12]["metrics"][NOISE_MULTIPLIER_METRIC] = 2 * own
    floor = request_popularity(_Grid(answers), settings, "run-a", catalog)  # type: ignore[arg-type]
    assert floor.sites == ["a", "b"] and len(floor.failures) == 1 and "without the noise" in floor.failures[0]
    coordinator = central_popularity_mechanism(settings, [own, 2 * own])
    assert floor.central_noise_multiplier == coordinator.noise_multiplier == 2 * own
    noise = floor.noisy_sum[1:].double() - 2.0
    assert float(floor.noisy_sum[0]) == 0.0
    assert float(noise.std()) == pytest.approx(2 * own * POPULARITY_BOUND, rel=6.5 * math.sqrt(1 / (2 * items)))
    assert abs(float(noise.mean())) < 6.5 * 2 * own / math.sqrt(items)
    report = floor.report(settings)
    assert "added by the coordinator" in report["mechanism"] and "NOT private" in report["trust"]
    least = central_popularity_mechanism(settings, [0.5 * own])
    assert least.noise_multiplier == own, "never less than the run's own settings give"
