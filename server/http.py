"""The recommendation HTTP service: FastAPI over ``server.serving.Recommender``.

Bad requests get a 4xx with a message (422 for a body of the wrong shape,
400 for values out of range, 413 for an oversized body), never a 5xx.
OpenAPI docs are at /docs.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.errors import ConfigError
from server.serving import MAX_K, Recommender

MAX_BODY_BYTES = 1_000_000
MAX_HISTORY = 10_000
MAX_BATCH = 1_000


class RecommendRequest(BaseModel):
    history: list[str | int] = Field(default_factory=list, max_length=MAX_HISTORY, description="raw item ids, oldest first")
    k: int = Field(10, ge=1, le=MAX_K)
    exclude_history: bool = True
    explain: bool = Field(True, description="name the history item behind each recommendation (costs one forward "
                          "pass per history item)")


class BatchRequest(BaseModel):
    histories: list[list[str | int]] = Field(max_length=MAX_BATCH)
    k: int = Field(10, ge=1, le=MAX_K)
    exclude_history: bool = True
    explain: bool = True


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


def create_app(recommender: Recommender) -> FastAPI:
    app = FastAPI(title="fedtail recommendations", description=__doc__)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/model")
    def model() -> dict[str, Any]:
        return recommender.info.as_dict()

    @app.post("/recommend")
    def recommend(request: RecommendRequest) -> dict[str, Any]:
        try:
            return recommender.recommend(
                [str(i) for i in request.history], request.k, request.exclude_history, request.explain
            ).as_dict()
        except ConfigError as error:
            raise HTTPException(status_code=400, detail=str(error)) from None

    @app.post("/recommend/batch")
    def recommend_batch(request: BatchRequest) -> dict[str, Any]:
        try:
            lists = recommender.recommend_many(
                [[str(i) for i in h] for h in request.histories], request.k, request.exclude_history, request.explain
            )
        except ConfigError as error:
            raise HTTPException(status_code=400, detail=str(error)) from None
        return {"results": [result.as_dict() for result in lists]}

    app.add_middleware(LimitBody)
    return app
