"""Serving: the Python API, and the HTTP service through real HTTP (a real server process on loopback)."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import uvicorn

from common.data.catalog import Catalog
from common.errors import ConfigError
from common.recommender.artifacts import save_model
from common.recommender.augment import AugmentOptions
from common.recommender.content import save_item_vectors
from common.recommender.model import ModelConfig, SASRec
from common.recommender.ranking import RankingOptions
from common.recommender.rerank import DiversityOptions
from server.http import MAX_BODY_BYTES
from server.serving import PRIOR_STRATEGY, Recommender
from simulations.cli import main
from tests.server.service import running_service

ITEMS = [f"item-{i}" for i in range(1, 41)]
DEFAULTS = "tail penalty 0.5 + diversity 0.2 (MMR:"
"""What the served default adds to the model's own list (a request with no ``shown`` items has nothing to penalise)."""


def plain_recommender(model_dir: Path) -> Recommender:
    """The model's own list: no tail penalty, no re-ranking."""
    return Recommender.load(model_dir, torch.device("cpu"), RankingOptions(tail_penalty=0.0),
                            DiversityOptions(0.0, 0.0))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("model")
    catalog = Catalog.from_items(ITEMS)
    model = SASRec(ModelConfig(num_items=catalog.num_items, max_len=8, hidden=16, heads=2, blocks=1))
    save_model(directory, model, catalog)
    return directory


def test_recommendations_exclude_the_history_and_explain_themselves_with_it(model_dir: Path) -> None:
    recommender = Recommender.load(model_dir, torch.device("cpu"))
    history = ["item-3", "item-7", "item-9"]
    result = recommender.recommend(history + ["not-an-item"], k=5)
    assert result.strategy.startswith(f"model + {DEFAULTS}") and result.unknown_items == ["not-an-item"]
    assert len(result.items) == 5 and not {r.item for r in result.items} & set(history)
    assert all(r.because_of in history for r in result.items)
    assert [r.score for r in result.items] == sorted((r.score for r in result.items), reverse=True)
    with_history = recommender.recommend(history, k=40, exclude_history=False)
    assert set(history) <= {r.item for r in with_history.items}


def test_without_explanations_the_ranking_is_the_same(model_dir: Path) -> None:
    recommender = Recommender.load(model_dir, torch.device("cpu"))
    history = ["item-3", "item-7", "item-9"]
    explained, plain = recommender.recommend(history, k=5), recommender.recommend(history, k=5, explain=False)
    assert [r.item for r in plain.items] == [r.item for r in explained.items]
    assert all(r.because_of is None for r in plain.items)


def test_the_explanation_is_the_item_whose_removal_costs_the_most(model_dir: Path) -> None:
    recommender = Recommender.load(model_dir, torch.device("cpu"))
    history = ["item-3", "item-7", "item-9"]
    top = recommender.recommend(history, k=1).items[0]
    index = recommender.catalog.index_of(top.item)
    with torch.no_grad():
        without = {
            h: float(
                recommender.model.last_scores(
                    torch.tensor([[recommender.catalog.index_of(x) for x in history if x != h]])
                )[0, index]
            )
            for h in history
        }
    assert top.because_of == min(without, key=without.get)


def test_cold_start_uses_the_models_prior(model_dir: Path) -> None:
    recommender = Recommender.load(model_dir, torch.device("cpu"))
    result = recommender.recommend([], k=3)
    assert result.strategy.startswith(PRIOR_STRATEGY) and len(result.items) == 3
    assert result.items[0].because_of is None
    assert recommender.recommend(["unknown"], k=3).strategy.startswith(PRIOR_STRATEGY)


def test_k_out_of_range_is_refused(model_dir: Path) -> None:
    recommender = Recommender.load(model_dir, torch.device("cpu"))
    for k in (0, 1001):
        with pytest.raises(ConfigError, match="between 1 and 1000"):
            recommender.recommend(["item-1"], k=k)


@pytest.fixture(scope="module")
def service(model_dir: Path) -> Iterator[str]:
    with running_service(model_dir) as url:
        yield url


def _post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=body, headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def test_the_service_answers_over_http(service: str) -> None:
    status, body = _post(f"{service}/recommend", json.dumps({"history": ["item-3", 7, "nope"], "k": 4}).encode())
    assert status == 200 and len(body["items"]) == 4 and body["unknown_items"] == ["7", "nope"]
    assert body["strategy"].startswith(f"model + {DEFAULTS}") and body["items"][0]["because_of"] == "item-3"
    status, body = _post(f"{service}/recommend/batch", json.dumps({"histories": [["item-1"], []], "k": 2}).encode())
    assert status == 200 and [r["strategy"].split(" + ")[0] for r in body["results"]] == ["model", PRIOR_STRATEGY]
    with urllib.request.urlopen(f"{service}/model") as response:
        info = json.loads(response.read())
    assert info["catalog_size"] == len(ITEMS) and len(info["model_id"]) == 16
    assert response.headers["x-fedtail-model"] == info["model_id"] and info["catalog_version"] == 1
    with urllib.request.urlopen(f"{service}/openapi.json") as response:
        assert "/recommend/batch" in json.loads(response.read())["paths"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"history": "item-1"}', "history: Input should be a valid list"),
        (b'{"history": [["nested"]]}', "history[0]: an item id is a string or an integer"),
        (b'{"history": [], "k": 0}', "k: Input should be greater than or equal to 1"),
        (b'{"history": [], "k": 100000}', "k: Input should be less than or equal to 1000"),
        (b'{"history": [], "k": "ten"}', "k: Input should be a valid integer"),
        (b"not json at all", "the body is not valid JSON"),
        (b"[]", "the body must be a JSON object"),
        (b'{"histories": "x"}', "histories: Input should be a valid list"),
        # Hostile bodies that got a 500 before: nothing in them can be echoed back as JSON or UTF-8.
        (b'{"history": [], "k": NaN}', "k: Input should be a valid integer"),
        (b'{"history": [], "k": 1e400}', "k: Input should be a valid integer"),
        (b'{"history": ["item-1", NaN]}', "history[1]: an item id is a string or an integer"),
        (b'{"histories": [[Infinity]]}', "histories[0][0]: an item id is a string or an integer"),
        (b'{"history": ["\\ud800"]}', "history[0]: not valid Unicode text"),
        (b'{"history": [], "\\udc00": -Infinity}', "a field name: not valid Unicode text"),
        (b'[' * 100_000 + b']' * 100_000, "error parsing the body"),
        # Unknown fields, which were ignored: a typo served cold-start recommendations as if the history were empty.
        (b'{"nope": 1}', "nope: unknown field"),
        (b'{"hist": ["item-1"], "k": 3}', "hist: unknown field"),
        (b'{"history": ["item-1"], "exclude": false}', "exclude: unknown field"),
        (b'{"histories": [], "history": []}', "history: unknown field"),
        (b"{}", "history: Field required"),
    ],
)
def test_bad_and_hostile_bodies_get_the_documented_400_naming_the_problem(
    service: str, body: bytes, message: str
) -> None:
    endpoint = "/recommend/batch" if b"histories" in body else "/recommend"
    status, payload = _post(f"{service}{endpoint}", body)
    assert status == 400 and message in payload["detail"], payload


def test_the_openapi_schema_types_every_answer_and_documents_the_statuses_sent(service: str) -> None:
    with urllib.request.urlopen(f"{service}/openapi.json") as response:
        schema = json.loads(response.read())
    assert "422" not in json.dumps(schema) and "400 for a body that is not valid" in schema["info"]["description"]
    for path in ("/recommend", "/recommend/batch"):
        responses = schema["paths"][path]["post"]["responses"]
        assert set(responses) == {"200", "400", "413"}
        assert responses["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/Problem")
    answers = {path: operations[method]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
               for path, operations in schema["paths"].items() for method in operations}
    assert {path: ref.rsplit("/", 1)[1] for path, ref in answers.items()} == {
        "/health": "Health", "/model": "ModelInfo", "/recommend": "RecommendationList",
        "/recommend/batch": "BatchResponse", "/admin/reload": "Reloaded",
    }
    components = schema["components"]["schemas"]
    assert components["RecommendRequest"]["additionalProperties"] is False
    assert components["RecommendRequest"]["required"] == ["history"]
    assert set(components["Recommendation"]["properties"]) == {"item", "score", "because_of"}


def _refusal_status(url: str, headers: dict[str, str], sent: bytes) -> int:
    """POST only ``sent`` (the start of an oversized body), then read the answer.

    Sending the whole body would race the server, which answers 413 and closes while the client
    still writes: the client then sees a broken pipe instead of the answer.
    """
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        connection.putrequest("POST", "/recommend")
        for name, value in {"content-type": "application/json", **headers}.items():
            connection.putheader(name, value)
        connection.endheaders(sent)
        return connection.getresponse().status
    finally:
        connection.close()


def test_an_oversized_body_is_refused_with_413_declared_or_not(service: str) -> None:
    huge = json.dumps({"history": ["item-1"] * 200_000}).encode()
    assert len(huge) > MAX_BODY_BYTES
    # Declared: the content-length alone is refused, before any of the body is read.
    assert _refusal_status(service, {"content-length": str(len(huge))}, huge[:65536]) == 413
    # Not declared (chunked): the limit must hold while reading; send just past it, in chunks.
    over = huge[: MAX_BODY_BYTES + 65536]
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (over[i : i + 65536] for i in range(0, len(over), 65536)))
    assert _refusal_status(service, {"transfer-encoding": "chunked"}, chunked) == 413
    assert _post(f"{service}/recommend", b'{"history": ["item-1"], "k": 1}')[0] == 200  # and the server is fine


def test_ranking_options_reach_the_recommendations_and_say_so(model_dir: Path) -> None:
    ranking = RankingOptions(cold_start_weight=0.5, tail_penalty=0.5)
    recommender = Recommender.load(model_dir, torch.device("cpu"), ranking)
    short = recommender.recommend(["item-3"], k=5)
    assert "cold-start blend" in short.strategy and "tail penalty 0.5" in short.strategy
    assert "cold-start blend" not in recommender.recommend([f"item-{i}" for i in range(1, 8)], k=5).strategy


def test_the_content_prior_needs_vectors_and_names_itself(model_dir: Path, tmp_path: Path) -> None:
    content = RankingOptions(cold_start_weight=0.9, cold_start_prior="content")
    with pytest.raises(ConfigError, match="item_vectors.pt"):
        Recommender.load(model_dir, torch.device("cpu"), content)
    with_vectors = tmp_path / "with-vectors"
    shutil.copytree(model_dir, with_vectors)
    catalog = Catalog.from_items(ITEMS)
    vectors = torch.zeros(len(ITEMS) + 1, 2)
    for number in range(1, 41):  # items 1-20 alike, items 21-40 alike
        vectors[catalog.index_of(f"item-{number}"), int(number > 20)] = 1.0
    save_item_vectors(with_vectors, vectors)
    recommender = Recommender.load(with_vectors, torch.device("cpu"), content)
    short = recommender.recommend(["item-25"], k=10, explain=False)
    assert "content prior" in short.strategy
    assert sum(int(r.item.split("-")[1]) > 20 for r in short.items) >= 8, "mostly items like item-25"
    assert "model prior" in recommender.recommend([], k=3).strategy  # nothing known: the model's prior


@pytest.fixture
def never_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    """A test of refusals fails, rather than serving forever, if the service starts after all."""
    def started(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the service started")

    monkeypatch.setattr(uvicorn.Server, "run", started)
    monkeypatch.setattr(uvicorn, "run", started)


@pytest.mark.usefixtures("never_serve")
def test_a_port_outside_1_to_65535_is_refused(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for port in ("70000", "0", "-1", "http"):  # 70000 printed one port and listened on 70000 - 65536
        with pytest.raises(SystemExit) as stopped:
            main(["serve", str(model_dir), "--port", port])
        assert stopped.value.code == 2 and "argument --port" in capsys.readouterr().err


@pytest.mark.usefixtures("never_serve")
def test_a_port_in_use_is_one_line_and_exit_2(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", str(model_dir), "--port", str(port), "--device", "cpu"]) == 2
    assert capsys.readouterr().err == f"fedtail: error: cannot listen on 127.0.0.1:{port}: Address already in use\n"


def test_diversity_reranks_and_the_strategy_says_what_it_changed(model_dir: Path) -> None:
    recommender = plain_recommender(model_dir)
    history = ["item-3", "item-7", "item-9"]
    plain = recommender.recommend(history, k=8)
    mixed = recommender.recommend(history, k=8, diversity=DiversityOptions(diversity=0.9, repeat_penalty=0.0))
    assert plain.strategy == "model" and "diversity" not in plain.strategy
    assert "diversity 0.9 (MMR:" in mixed.strategy
    assert mixed.items[0].item == plain.items[0].item, "the first pick is the most relevant item either way"
    assert [r.item for r in mixed.items] != [r.item for r in plain.items]
    assert [r.score for r in mixed.items] == sorted((r.score for r in mixed.items), reverse=True)
    assert not {r.item for r in mixed.items} & set(history) and all(r.because_of in history for r in mixed.items)


def test_the_repetition_penalty_moves_shown_items_down_and_counts_them(model_dir: Path) -> None:
    recommender = plain_recommender(model_dir)
    history = ["item-3", "item-7", "item-9"]
    plain = [r.item for r in recommender.recommend(history, k=5).items]
    tired = recommender.recommend(history, k=5, diversity=DiversityOptions(diversity=0.0, repeat_penalty=1.0),
                                  shown=plain[:2])
    assert [r.item for r in tired.items][:3] == plain[2:5], "the two shown items fall behind the rest"
    assert "repetition penalty 1 (2 of 2 already shown item(s)" in tired.strategy


def test_augmentation_prepends_pseudo_items_and_names_them(model_dir: Path) -> None:
    recommender = Recommender.load(model_dir, torch.device("cpu"), augmentation=AugmentOptions())
    short = recommender.recommend(["item-3"], k=5, augmentation=AugmentOptions(augment_to=4))
    assert len(short.pseudo_items) == 3 and "item-3" not in short.pseudo_items
    assert f"augmented with 3 pseudo-prior item(s) before the history ({', '.join(short.pseudo_items)})" in (
        short.strategy)
    assert all(r.because_of == "item-3" for r in short.items), "explanations name only the user's own items"
    expected = recommender.pseudo_prior.generate([recommender.catalog.index_of("item-3")], 3)
    assert short.pseudo_items == [recommender.catalog.raw_id(i) for i in expected]
    long = recommender.recommend([f"item-{i}" for i in range(1, 6)], k=5, augmentation=AugmentOptions(augment_to=4))
    assert long.pseudo_items == [] and "augmented" not in long.strategy


def test_reranking_and_augmentation_are_request_options_over_http(model_dir: Path) -> None:
    with running_service(model_dir, "--diversity", "0.5", "--repeat-penalty", "0", "--augment-to", "0") as url:
        body = {"history": ["item-3"], "k": 5}
        status, default = _post(f"{url}/recommend", json.dumps(body).encode())
        assert status == 200 and "diversity 0.5" in default["strategy"], "the server's default applies"
        status, chosen = _post(f"{url}/recommend", json.dumps(
            {**body, "diversity": 0, "repeat_penalty": 1, "shown": [default["items"][0]["item"]], "augment_to": 3}
        ).encode())
        assert status == 200 and "diversity" not in chosen["strategy"]
        assert "repetition penalty 1" in chosen["strategy"] and len(chosen["pseudo_items"]) == 2
        status, batch = _post(f"{url}/recommend/batch", json.dumps(
            {"histories": [["item-3"], ["item-4"]], "k": 3, "shown": [["item-1"], []], "augment_to": 2}
        ).encode())
        assert status == 200 and all(len(r["pseudo_items"]) == 1 for r in batch["results"])
        status, refused = _post(f"{url}/recommend/batch", json.dumps(
            {"histories": [["item-3"]], "shown": [[], []]}
        ).encode())
        assert status == 400 and "shown: 2 lists for 1 histories" in refused["detail"]
        status, refused = _post(f"{url}/recommend", json.dumps({**body, "diversity": 1.0}).encode())
        assert status == 400 and refused["detail"].startswith("diversity:")
