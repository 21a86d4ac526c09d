"""The recommendation HTTP service: FastAPI over ``server.serving.Recommender``.

A request the service cannot answer gets a 4xx with a one-line message in ``detail``,
never a 5xx: 400 for a body that is not valid (not JSON, wrong types, unknown fields,
k outside 1..1000, an item id that is not valid Unicode text), 413 for a body over 1 MB.
Every answer of /recommend, /recommend/batch and /model names the version that computed
all of it in the headers X-Fedtail-Model (the model file's sha256, 16 hex digits),
X-Fedtail-Catalog (the catalogue's fingerprint) and, when the catalogue has one,
X-Fedtail-Catalog-Version. POST /admin/reload loads a new model from the run folder now
(only for a client on loopback that no proxy relayed: 403 otherwise; 409 when the new
files cannot be served, and the old version keeps serving). OpenAPI docs are at /docs.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.errors import ConfigError
from common.recommender.augment import AugmentOptions
from common.recommender.rerank import DiversityOptions
from server.reloading import LiveRecommender, ReloadError
from server.serving import MAX_K, ModelInfo, RecommendationList, Recommender

MAX_BODY_BYTES = 1_000_000
MAX_HISTORY = 10_000
MAX_BATCH = 1_000
MAX_PROBLEMS = 3
"""At most this many wrong fields are named in a 400's message (a 10,000-item history can hold as many)."""
LONE_SURROGATE = "not valid Unicode text (it holds a lone surrogate)"


def _item_id(value: Any) -> str:
    """An item id as text: integers are read as their decimal text; a lone surrogate (JSON allows ``"\\ud800"``)
    is refused, as it could not even be sent back as UTF-8."""
    if type(value) is int:  # not a bool
        return str(value)
    if not isinstance(value, str):
        raise ValueError("an item id is a string or an integer")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(LONE_SURROGATE) from None
    return value


ItemId = Annotated[
    str,
    BeforeValidator(_item_id),
    WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "integer"}], "description": "a raw item id"}),
]


class ListOptions(BaseModel):
    """What both endpoints take beside the histories; each option left out takes the server's default."""

    model_config = ConfigDict(extra="forbid", strict=True)

    k: int = Field(10, ge=1, le=MAX_K, description="how many items to recommend")
    exclude_history: bool = Field(True, description="never recommend an item of the history")
    explain: bool = Field(True, description="name the history item behind each recommendation (costs one forward "
                          "pass per history item)")
    diversity: float | None = Field(None, ge=0, lt=1, description="MMR weight of similarity to the items already in "
                                    "the list (0: the model's own order; default: the server's, fedtail serve "
                                    "--diversity)")
    repeat_penalty: float | None = Field(None, ge=0, le=1, description="how far items already shown to the user "
                                         "move down (0: off; default: the server's, --repeat-penalty)")
    augment_to: int | None = Field(None, ge=0, le=MAX_HISTORY, description="score a history shorter than this with "
                                   "pseudo-prior items the model generates before it (0: off; default: the "
                                   "server's, --augment-to)")

    def options(self, served: Recommender) -> tuple[DiversityOptions, AugmentOptions]:
        """This request's re-ranker and augmentation: its own choices over the server's defaults."""
        diversity = DiversityOptions(
            served.diversity.diversity if self.diversity is None else self.diversity,
            served.diversity.repeat_penalty if self.repeat_penalty is None else self.repeat_penalty,
        )
        return diversity, served.augmentation if self.augment_to is None else AugmentOptions(self.augment_to)


class RecommendRequest(ListOptions):
    history: list[ItemId] = Field(max_length=MAX_HISTORY, description="raw item ids, oldest first ([] for none)")
    shown: list[ItemId] = Field(default_factory=list, max_length=MAX_HISTORY,
                                description="items already shown to this user, for the repetition penalty")


class BatchRequest(ListOptions):
    histories: list[list[ItemId]] = Field(max_length=MAX_BATCH, description="one history per user, as in /recommend")
    shown: list[list[ItemId]] | None = Field(None, max_length=MAX_BATCH,
                                             description="per history, the items already shown to that user")


class BatchResponse(BaseModel):
    results: list[RecommendationList] = Field(description="one list per history, in the request's order")


class Health(BaseModel):
    status: Literal["ok"]


class Problem(BaseModel):
    detail: str = Field(description="what is wrong with the request, in one line")


class Reloaded(BaseModel):
    reloaded: bool = Field(description="false when the run folder's files had not changed: nothing was loaded")
    model: ModelInfo = Field(description="the version serving from now on")


PROXY_HEADERS = (b"forwarded", b"x-forwarded-for", b"x-real-ip")
"""A request carrying one of these was relayed by a proxy: its loopback address is the proxy's, not the client's."""


REFUSALS: dict[int | str, dict[str, Any]] = {
    400: {"model": Problem, "description": "the body is not valid: not JSON, a wrong type, an unknown field, or a "
          "value out of range (the message names the field)"},
    413: {"model": Problem, "description": f"the body is over {MAX_BODY_BYTES} bytes"},
}


def _problem(errors: Sequence[Any]) -> str:
    """One line naming each wrong field and why, without echoing the input (it may be NaN, or not even text)."""
    lines = []
    for error in errors[:MAX_PROBLEMS]:
        if error["type"] == "json_invalid":
            lines.append(f"the body is not valid JSON: {error.get('ctx', {}).get('error', error['msg'])} "
                         f"(at character {error['loc'][-1]})")
            continue
        where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"][1:])
        where = where.lstrip(".")
        if error["type"] == "string_unicode":  # a field name holding a lone surrogate
            lines.append(f"{where or 'a field name'}: {LONE_SURROGATE}")
        elif not where:
            lines.append("the body must be a JSON object, sent as application/json; the fields are in the API docs, "
                         "/docs")
        elif error["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown field (the fields are in the API docs, /docs)")
        elif error["type"] == "value_error":  # ours: the message without pydantic's "Value error, " prefix
            lines.append(f"{where}: {error['ctx']['error']}")
        else:
            lines.append(f"{where}: {error['msg']}")
    if len(errors) > MAX_PROBLEMS:
        lines.append(f"and {len(errors) - MAX_PROBLEMS} more")
    return "; ".join(lines).encode("utf-8", "backslashreplace").decode("utf-8")


class LimitBody:
    """Refuses bodies over ``limit`` bytes with 413, whether or not the client declared their length.

    The body is read here first (at most ``limit`` bytes are held), then handed on.
    """

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _too_large(send, self.limit)
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending its body: nobody to answer
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                await _too_large(send, self.limit)
                return
        body = b"".join(chunks)

        async def replay() -> Message:
            nonlocal body
            message: Message = {"type": "http.request", "body": body, "more_body": False}
            body = b""
            return message

        await self.app(scope, replay, send)


async def _too_large(send: Send, limit: int) -> None:
    body = f'{{"detail": "request body over {limit} bytes"}}'.encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _label(response: Response, served: Recommender) -> None:
    """Name in ``response`` the version that computed it."""
    response.headers["x-fedtail-model"] = served.info.model_id
    response.headers["x-fedtail-catalog"] = served.info.catalog_sha256
    response.headers["x-fedtail-catalog-version"] = str(served.info.catalog_version)


def _from_loopback(request: Request) -> bool:
    """The client is on this machine and no proxy relayed it: ``--host 0.0.0.0`` does not open the admin endpoint."""
    if request.client is None or any(name in PROXY_HEADERS for name, _ in request.scope["headers"]):
        return False
    try:
        return ipaddress.ip_address(request.client.host).is_loopback
    except ValueError:
        return False


def create_app(live: LiveRecommender) -> FastAPI:
    app = FastAPI(title="fedtail recommendations", description=__doc__)

    @app.exception_handler(RequestValidationError)
    async def refuse(request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _problem(error.errors())}, status_code=400)

    @app.get("/health")
    def health() -> Health:
        return Health(status="ok")

    # Each handler reads live.current once: a reload during the request cannot change the version it computes with.
    @app.get("/model")
    def model(response: Response) -> ModelInfo:
        served = live.current
        _label(response, served)
        return served.info

    @app.post("/recommend", responses=REFUSALS)
    def recommend(request: RecommendRequest, response: Response) -> RecommendationList:
        served = live.current
        try:
            answer = served.recommend(request.history, request.k, request.exclude_history, request.explain,
                                      *request.options(served), request.shown)
        except ConfigError as error:
            raise HTTPException(status_code=400, detail=str(error)) from None
        _label(response, served)
        return answer

    @app.post("/recommend/batch", responses=REFUSALS)
    def recommend_batch(request: BatchRequest, response: Response) -> BatchResponse:
        served = live.current
        try:
            lists = served.recommend_many(request.histories, request.k, request.exclude_history, request.explain,
                                          *request.options(served), request.shown)
        except ConfigError as error:
            raise HTTPException(status_code=400, detail=str(error)) from None
        _label(response, served)
        return BatchResponse(results=lists)

    @app.post("/admin/reload", responses={
        403: {"model": Problem, "description": "the client is not on loopback, or a proxy relayed the request"},
        409: {"model": Problem, "description": "the run folder's new files cannot be served (the message names the "
              "file and why); the version that was serving still serves"},
    })
    def reload(request: Request, response: Response) -> Reloaded:
        """Load the run folder's model and catalogue now if they changed, and serve them from the next request on."""
        if not _from_loopback(request):
            raise HTTPException(status_code=403, detail="/admin/reload answers only clients on loopback, unrelayed")
        try:
            result = live.reload()
        except ReloadError as error:
            raise HTTPException(status_code=409, detail=str(error)) from None
        _label(response, result.served)
        return Reloaded(reloaded=result.reloaded, model=result.served.info)

    document = app.openapi

    def openapi() -> dict[str, Any]:
        """FastAPI documents a 422 for every body; this service answers 400 instead (``refuse``), as REFUSALS says."""
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = document()  # also kept as app.openapi_schema: the edits below are made once
        for operations in schema["paths"].values():
            for operation in operations.values():
                operation["responses"].pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(LimitBody)
    return app
