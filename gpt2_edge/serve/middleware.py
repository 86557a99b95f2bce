"""Plain ASGI middleware: API-key check, request-body limit, requests-by-status counter.

Plain ASGI rather than Starlette's ``BaseHTTPMiddleware``, so a streamed response passes through
untouched and a client's disconnect still reaches the route that streams.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .protocol import ApiError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def send_error(send: Send, error: ApiError) -> None:
    """Answer with ``error`` in OpenAI's JSON shape."""
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class ApiKeyMiddleware:
    """Every path but the open ones needs ``Authorization: Bearer <key>`` (compared in constant time)."""

    def __init__(
        self, app: ASGIApp, api_key: str, open_paths: frozenset[str] = frozenset({"/health"})
    ) -> None:
        self.app = app
        self.key = api_key.encode()
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                given = value
                break
        scheme, _, token = given.partition(b" ")
        if not given:
            error = ApiError(
                401,
                "missing API key: send the header 'Authorization: Bearer <key>'",
                type="authentication_error",
                code="missing_api_key",
            )
        elif scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
            error = ApiError(401, "invalid API key", type="authentication_error", code="invalid_api_key")
        else:
            return await self.app(scope, receive, send)
        error.headers["WWW-Authenticate"] = "Bearer"
        await send_error(send, error)


class BodyLimitMiddleware:
    """Refuse a request body over ``max_bytes`` with 413, by its Content-Length or, when chunked,
    while reading it (the body is buffered here, up to the limit, then handed on)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> ApiError:
        return ApiError(
            413, f"the request body exceeds the limit of {self.max_bytes} bytes", code="request_too_large"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    return await send_error(send, ApiError(400, "invalid Content-Length header"))
                if declared > self.max_bytes:
                    return await send_error(send, self._too_large())
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await send_error(send, self._too_large())
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # later calls wait for the disconnect, as a route expects

        await self.app(scope, replay, send)


class RequestCounterMiddleware:
    """Counts every response by route and status (unknown paths as ``other``, to bound the labels)."""

    def __init__(self, app: ASGIApp, count: Callable[[str, int], None], routes: frozenset[str]) -> None:
        self.app = app
        self.count = count
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in self.routes else "other"

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.count(route, message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)
