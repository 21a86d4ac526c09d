"""Hot reload: a new model in the run folder is served without a restart, without a failed or a mixed answer.

The versions are written into the served run folder with the server's own atomic writer, model file first and
catalogue second as ``save_model`` does. Every answer states its version (X-Fedtail-Model); the test recomputes the
answer with that version in-process and requires the very same items, explanations and scores.
"""

from __future__ import annotations

import http.client
import json
import random
import shutil
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from starlette.requests import Request

from common.data.catalog import Catalog
from common.recommender.artifacts import CATALOG_FILE, save_model
from common.recommender.model import ModelConfig, SASRec
from common.recommender.ranking import RankingOptions
from common.run_files import GLOBAL_MODEL_FILE
from common.utils.files import atomic_write, atomic_write_text
from server.http import _from_loopback
from server.reloading import LiveRecommender, ReloadError
from server.serving import Recommender
from simulations.cli import main
from tests.server.service import running_service

OLD_ITEMS = [f"item-{i}" for i in range(1, 41)]
NEW_ITEMS = [f"item-{i}" for i in range(41, 49)]
"""Items that enter with the grown catalogue of version C, appended after the old ones (old indices never move)."""
K = 5


@dataclass(frozen=True)
class Version:
    folder: Path
    reference: Recommender
    """The same files loaded in this process: what the served version must answer."""

    @property
    def model_id(self) -> str:
        return self.reference.info.model_id


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Version]:
    """A and B: two models over the same catalogue; C: a model over that catalogue grown by 8 items, its catalog.json
    in the growing catalogue's format (version 2, naming the fingerprint of the version it extends)."""
    made = {}
    for seed, (name, items) in enumerate({"A": OLD_ITEMS, "B": OLD_ITEMS, "C": OLD_ITEMS + NEW_ITEMS}.items()):
        torch.manual_seed(seed)
        catalog = Catalog(tuple(items))
        folder = tmp_path_factory.mktemp(f"version-{name}")
        save_model(folder, SASRec(ModelConfig(num_items=catalog.num_items, max_len=8, hidden=16, heads=2, blocks=1)),
                   catalog, GLOBAL_MODEL_FILE)
        if name == "C":
            grown = json.loads((folder / CATALOG_FILE).read_text()) | {
                "version": 2, "fingerprint": catalog.fingerprint(),
                "previous_fingerprint": Catalog(tuple(OLD_ITEMS)).fingerprint(),
            }
            (folder / CATALOG_FILE).write_text(json.dumps(grown))
        made[name] = Version(folder, Recommender.load(folder, torch.device("cpu")))
    assert len({version.model_id for version in made.values()}) == 3
    return made


def install(run_dir: Path, version: Version, files: tuple[str, ...] = (GLOBAL_MODEL_FILE, CATALOG_FILE)) -> None:
    """Write ``version``'s files into the served folder as the server writes a run's: one atomic rename each."""
    run_dir.mkdir(exist_ok=True)
    for name in files:
        atomic_write(run_dir / name, partial(shutil.copyfile, version.folder / name))


def corrupt_model(run_dir: Path) -> None:
    atomic_write_text(run_dir / GLOBAL_MODEL_FILE, "not a model")


# The Python API: LiveRecommender.


def test_an_unchanged_folder_is_not_reloaded_and_a_new_model_is(versions: dict[str, Version], tmp_path: Path) -> None:
    install(tmp_path, versions["A"])
    live = LiveRecommender(tmp_path, torch.device("cpu"), RankingOptions())
    assert live.current.info.model_id == versions["A"].model_id and not live.reload().reloaded
    install(tmp_path, versions["C"])
    result = live.reload()
    assert result.reloaded and live.current is result.served and live.current.info.model_id == versions["C"].model_id
    assert live.current.info.catalog_size == 48 and live.current.catalog.index_of("item-7") == 7  # old index kept
    assert live.current.info.catalog_version == 2


def test_a_served_link_switched_to_another_run_folder_is_followed(
    versions: dict[str, Version], tmp_path: Path
) -> None:
    """Serving ``latest``, a link moved atomically from one window's run folder to the next (``mv -T``)."""
    latest = tmp_path / "latest"
    latest.symlink_to(versions["A"].folder)
    live = LiveRecommender(latest, torch.device("cpu"), RankingOptions())
    (tmp_path / "next").symlink_to(versions["C"].folder)
    (tmp_path / "next").replace(latest)
    assert live.reload().served.info.model_id == versions["C"].model_id


def test_a_corrupt_model_keeps_the_old_version_serving_and_names_the_file(
    versions: dict[str, Version], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    install(tmp_path, versions["A"])
    live = LiveRecommender(tmp_path, torch.device("cpu"), RankingOptions())
    serving = live.current
    corrupt_model(tmp_path)
    with pytest.raises(ReloadError, match=f"still serving model {versions['A'].model_id}"):
        live.reload()
    assert live.current is serving
    logged = capsys.readouterr().err
    assert f"{tmp_path / GLOBAL_MODEL_FILE}: cannot read the model file" in logged and logged.count("\n") == 1


def test_a_non_finite_model_keeps_the_old_version_serving_and_names_the_file_and_parameter(
    versions: dict[str, Version], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    install(tmp_path, versions["A"])
    live = LiveRecommender(tmp_path, torch.device("cpu"), RankingOptions())
    serving = live.current
    nan_model = SASRec(serving.model.config)
    with torch.no_grad():
        nan_model.output.bias.fill_(float("nan"))
    save_model(tmp_path, nan_model, serving.catalog, GLOBAL_MODEL_FILE)
    with pytest.raises(ReloadError, match=f"still serving model {versions['A'].model_id}"):
        live.reload()
    assert live.current is serving
    assert [r.item for r in live.current.recommend(["item-1"], K).items] == [
        r.item for r in versions["A"].reference.recommend(["item-1"], K).items
    ]
    logged = capsys.readouterr().err
    assert f"{tmp_path / GLOBAL_MODEL_FILE}: parameter 'output.bias' holds NaN or infinity" in logged
    assert logged.count("\n") == 1


def test_a_model_whose_catalogue_is_not_beside_it_is_refused_naming_both(
    versions: dict[str, Version], tmp_path: Path
) -> None:
    """The grown model's file lands before its grown catalogue: that pair must never be served."""
    install(tmp_path, versions["A"])
    live = LiveRecommender(tmp_path, torch.device("cpu"), RankingOptions())
    install(tmp_path, versions["C"], (GLOBAL_MODEL_FILE,))
    with pytest.raises(ReloadError) as refused:
        live.reload()
    message = str(refused.value)
    assert f"{tmp_path / GLOBAL_MODEL_FILE}: the model was trained with a different catalogue" in message
    assert f"{CATALOG_FILE} beside it (sha256 {versions['A'].reference.info.catalog_sha256}, 40 items)" in message
    assert live.current.info.model_id == versions["A"].model_id
    install(tmp_path, versions["C"], (CATALOG_FILE,))  # the catalogue arrives: the pair is whole
    assert live.reload().served.info.model_id == versions["C"].model_id


def test_a_model_whose_size_disagrees_with_its_catalogue_is_refused(tmp_path: Path) -> None:
    """A model file that records the catalogue's fingerprint but scores another number of items (a forged or
    broken file) is refused before it could answer an index outside the catalogue."""
    catalog = Catalog(tuple(OLD_ITEMS))
    save_model(tmp_path, SASRec(ModelConfig(num_items=40, max_len=8, hidden=16, heads=2, blocks=1)), catalog,
               GLOBAL_MODEL_FILE)
    live = LiveRecommender(tmp_path, torch.device("cpu"), RankingOptions())
    payload = torch.load(tmp_path / GLOBAL_MODEL_FILE, weights_only=True)
    payload["model_config"]["num_items"] = 48
    torch.save(payload, tmp_path / GLOBAL_MODEL_FILE)
    with pytest.raises(ReloadError, match="the model scores 48 items, catalog.json beside it lists 40"):
        live.reload()


def test_a_file_replaced_during_the_read_is_read_again(
    versions: dict[str, Version], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reload that read A's model while B landed must not serve A under B's files: it reads again."""
    install(tmp_path, versions["A"])
    live = LiveRecommender(tmp_path, torch.device("cpu"), RankingOptions())
    install(tmp_path, versions["C"])
    load = Recommender.load
    reads: list[str] = []

    def racing(*args: Any, **kwargs: Any) -> Recommender:
        loaded = load(*args, **kwargs)
        reads.append(loaded.info.model_id)
        if len(reads) == 1:
            install(tmp_path, versions["B"])  # lands while the first read is under way
        return loaded

    monkeypatch.setattr(Recommender, "load", racing)
    assert live.reload().served.info.model_id == versions["B"].model_id
    assert reads == [versions["C"].model_id, versions["B"].model_id]


def test_the_admin_endpoint_answers_only_unrelayed_loopback_clients() -> None:
    def request(host: str, headers: list[tuple[bytes, bytes]] | None = None) -> Request:
        return Request({"type": "http", "client": (host, 5000), "headers": headers or []})

    assert _from_loopback(request("127.0.0.1")) and _from_loopback(request("::1"))
    assert not _from_loopback(request("10.1.2.3")) and not _from_loopback(request("192.168.0.7"))
    assert not _from_loopback(request("127.0.0.1", [(b"x-forwarded-for", b"203.0.113.9")]))
    assert not _from_loopback(request("127.0.0.1", [(b"forwarded", b"for=203.0.113.9")]))
    assert not _from_loopback(request("testclient"))


# The service over real HTTP.


@pytest.fixture(scope="module")
def served(versions: dict[str, Version], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    """A service over a run folder it watches every 0.2 s: (its URL, the run folder, its log)."""
    run_dir = tmp_path_factory.mktemp("served")
    install(run_dir, versions["A"])
    log = run_dir.parent / f"{run_dir.name}.log"
    with log.open("wb") as stderr, running_service(run_dir, "--watch-interval", "0.2", stderr=stderr) as url:
        yield url, run_dir, log


class Client:
    """One keep-alive connection to the service, as a load-generating client holds."""

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        self.connection = http.client.HTTPConnection(str(parts.hostname), parts.port, timeout=60)

    def call(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], Any]:
        data = None if body is None else json.dumps(body).encode()
        try:
            self.connection.request(method, path, data, {"content-type": "application/json", **(headers or {})})
            response = self.connection.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(response.read())
        except Exception:
            self.connection.close()  # reconnects on the next call
            raise

    def close(self) -> None:
        self.connection.close()


def reload_to(url: str, run_dir: Path, version: Version) -> None:
    """Install ``version`` and ask for it at once (the watcher may have been quicker: then nothing was left to do)."""
    install(run_dir, version)
    client = Client(url)
    try:
        status, headers, body = client.call("POST", "/admin/reload")
    finally:
        client.close()
    assert status == 200 and body["model"]["model_id"] == version.model_id == headers["x-fedtail-model"], body


def wait_until_served(url: str, model_id: str, timeout: float = 60) -> None:
    client = Client(url)
    deadline = time.monotonic() + timeout
    try:
        while client.call("GET", "/model")[1]["x-fedtail-model"] != model_id:
            assert time.monotonic() < deadline, f"model {model_id} was not served within {timeout} s"
            time.sleep(0.05)
    finally:
        client.close()


def load_during_reloads(
    url: str, versions: dict[str, Version], order: list[str], reload: Callable[[Version], None],
    threads: int, answers_per_version: int,
) -> tuple[list[str], list[tuple[str, Any, Any]]]:
    """``threads`` clients ask without pause while the service is moved through ``order``, each version after the
    clients got ``answers_per_version`` more answers. Returns the failures and (model id, request, answer) triples:
    one /recommend or /recommend/batch request each, the batch answer a list."""
    failures: list[str] = []
    answers: list[tuple[str, Any, Any]] = []
    lock, stop = threading.Lock(), threading.Event()
    pool = OLD_ITEMS + NEW_ITEMS

    def ask(seed: int) -> None:
        rng, client = random.Random(seed), Client(url)
        try:
            while not stop.is_set():
                histories = [rng.sample(pool, rng.randint(0, 6)) for _ in range(rng.choice((1, 3)))]
                path, body = ("/recommend", {"history": histories[0], "k": K}) if len(histories) == 1 else (
                    "/recommend/batch", {"histories": histories, "k": K})
                try:
                    status, headers, answer = client.call("POST", path, body)
                except Exception as error:  # a dropped connection, a reset: a failed response all the same
                    with lock:
                        failures.append(f"{path}: {type(error).__name__}: {error}")
                    continue
                with lock:
                    if status != 200:
                        failures.append(f"{path}: {status} {answer}")
                    else:
                        answers.append((headers["x-fedtail-model"], body, answer))
        finally:
            client.close()

    def answered(count: int) -> None:
        deadline = time.monotonic() + 120
        while len(answers) < count and not failures:
            assert time.monotonic() < deadline, "the clients got no answers"
            time.sleep(0.01)

    workers = [threading.Thread(target=ask, args=(seed,)) for seed in range(threads)]
    for worker in workers:
        worker.start()
    try:
        answered(answers_per_version)
        for name in order:
            reload(versions[name])
            answered(len(answers) + answers_per_version)
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    return failures, answers


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Hundreds of tiny forward passes: on a busy machine torch's default two threads spin and run 20 times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def mixed(versions: dict[str, Version], answers: list[tuple[str, Any, Any]]) -> list[str]:
    """Answers that differ from what the version they name computes for their request."""
    by_id = {version.model_id: version.reference for version in versions.values()}
    with one_torch_thread():
        return [wrong for model_id, request, answer in answers
                for wrong in _differences(by_id[model_id], request, answer)]


def _differences(version: Recommender, request: Any, answer: Any) -> list[str]:
    """Where one answer differs from ``version``'s own: items, explanations, unknown items, scores (to 1e-4)."""
    histories = request["histories"] if "histories" in request else [request["history"]]
    lists = answer["results"] if "histories" in request else [answer]
    wrong = []
    for got, history in zip(lists, histories, strict=True):
        want = version.recommend(history, K).as_dict()
        same = [(r["item"], r["because_of"]) for r in got["items"]] == [(r["item"], r["because_of"])
                                                                       for r in want["items"]]
        close = all(abs(g["score"] - w["score"]) < 1e-4 for g, w in zip(got["items"], want["items"], strict=False))
        if not (same and close and got["unknown_items"] == want["unknown_items"]):
            wrong.append(f"model {version.info.model_id}: answered {got}, but it computes {want}")
    return wrong


def test_reloads_under_concurrent_load_fail_no_answer_and_mix_none(
    versions: dict[str, Version], served: tuple[str, Path, Path]
) -> None:
    """8 clients, a few hundred requests, 5 reloads between three versions (one with a grown catalogue)."""
    url, run_dir, _ = served
    reload_to(url, run_dir, versions["A"])
    order = ["B", "C", "A", "C", "B"]
    failures, answers = load_during_reloads(url, versions, order, lambda v: reload_to(url, run_dir, v), 8, 40)
    assert failures == []
    assert mixed(versions, answers) == []
    served_ids = [model_id for model_id, _, _ in answers]
    assert len(answers) >= 40 * (len(order) + 1) and set(served_ids) == {v.model_id for v in versions.values()}
    assert served_ids[-1] == versions["B"].model_id


def test_the_watcher_serves_a_new_model_and_skips_a_corrupt_one(
    versions: dict[str, Version], served: tuple[str, Path, Path]
) -> None:
    url, run_dir, log = served
    reload_to(url, run_dir, versions["A"])
    install(run_dir, versions["B"])  # no request: the watcher alone
    wait_until_served(url, versions["B"].model_id)
    corrupt_model(run_dir)
    deadline = time.monotonic() + 60
    while "cannot read the model file" not in log.read_text():
        assert time.monotonic() < deadline, "the watcher logged no error for the corrupt model"
        time.sleep(0.05)
    assert (f"reload of {run_dir} failed, still serving model {versions['B'].model_id}" in log.read_text()
            and f"{run_dir / GLOBAL_MODEL_FILE}: cannot read the model file" in log.read_text())
    time.sleep(1)  # five more polls: the watcher does not try the same corrupt file again
    assert log.read_text().count("cannot read the model file") == 1
    client = Client(url)
    try:
        status, headers, answer = client.call("POST", "/recommend", {"history": ["item-3"], "k": K})
        assert status == 200 and headers["x-fedtail-model"] == versions["B"].model_id
        assert answer == versions["B"].reference.recommend(["item-3"], K).as_dict()
        status, _, refused = client.call("POST", "/admin/reload")  # an explicit request is told why
        assert status == 409 and f"{run_dir / GLOBAL_MODEL_FILE}: cannot read" in refused["detail"], refused
        status, _, refused = client.call("POST", "/admin/reload", headers={"x-forwarded-for": "203.0.113.9"})
        assert status == 403 and "loopback" in refused["detail"]
        install(run_dir, versions["C"])
        wait_until_served(url, versions["C"].model_id)
        status, headers, info = client.call("GET", "/model")
        assert info["catalog_size"] == 48 and info["catalog_sha256"] == headers["x-fedtail-catalog"]
        assert info["catalog_version"] == 2 and headers["x-fedtail-catalog-version"] == "2"
        assert info["catalog_sha256"] == versions["C"].reference.info.catalog_sha256
    finally:
        client.close()


@pytest.mark.slow
def test_many_reloads_by_the_watcher_alone_under_heavier_load(
    versions: dict[str, Version], served: tuple[str, Path, Path]
) -> None:
    """16 clients, thousands of requests, 20 version changes that only the watcher notices."""
    url, run_dir, _ = served
    reload_to(url, run_dir, versions["A"])

    def by_watcher(version: Version) -> None:
        install(run_dir, version)
        wait_until_served(url, version.model_id)

    order = ["B", "C", "A", "C"] * 5
    failures, answers = load_during_reloads(url, versions, order, by_watcher, 16, 100)
    assert failures == []
    assert mixed(versions, answers) == []
    assert len(answers) >= 100 * (len(order) + 1)


def test_a_watch_interval_that_is_not_0_or_more_seconds_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for interval in ("-1", "nan", "inf", "often"):
        with pytest.raises(SystemExit) as stopped:
            main(["serve", str(tmp_path), "--watch-interval", interval])
        assert stopped.value.code == 2 and "argument --watch-interval" in capsys.readouterr().err
