"""Plain ASGI middleware: the requests-by-status counter (which also answers an unexpected
error), the Host check, JSON-only POST bodies, the API-key check, and the request body's limits
(size and time).

Plain ASGI rather than Starlette's ``BaseHTTPMiddleware``, so a streamed response passes through
untouched and a client's disconnect still reaches the route that streams.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .protocol import ApiError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger("gpt2_edge.serve")

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def error_bytes(error: ApiError) -> bytes:
    return json.dumps(error.body(), separators=(",", ":")).encode()


async def send_error(send: Send, error: ApiError) -> None:
    """Answer with ``error`` in OpenAI's JSON shape."""
    body = error_bytes(error)
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
    while reading it, and one that has not all arrived ``timeout_s`` after the request's head
    with 408 (and the connection closed): a client trickling its body holds a connection and a
    task for no longer than that. The body is buffered here, up to the limit, then handed on."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

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
        loop = asyncio.get_running_loop()
        deadline = None if self.timeout_s is None else loop.time() + self.timeout_s
        while True:
            try:
                if deadline is None:
                    message = await receive()
                else:
                    message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except asyncio.TimeoutError:
                return await send_error(
                    send,
                    ApiError(
                        408,
                        f"the request body did not arrive within {self.timeout_s:g} s",
                        type="timeout_error",
                        code="body_timeout",
                        headers={"Connection": "close"},
                    ),
                )
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
    """Counts every response by route and status (unknown paths as ``other``, to bound the labels),
    and answers an error nothing else handled: one traceback in the log, 500 in OpenAI's shape to
    the client, counted like any other status. ``in_flight(+1 / -1)`` follows the requests under
    way but for the ``quiet`` routes (health checks and scrapes), for a drain to wait on."""

    def __init__(
        self,
        app: ASGIApp,
        count: Callable[[str, int], None],
        routes: frozenset[str],
        in_flight: Callable[[int], None] | None = None,
        quiet: frozenset[str] = frozenset({"/health", "/metrics"}),
    ) -> None:
        self.app = app
        self.count = count
        self.routes = routes
        self.in_flight = in_flight
        self.quiet = quiet

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in self.routes else "other"
        started = False

        async def counting_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.count(route, message["status"])
            await send(message)

        tracked = self.in_flight is not None and scope["path"] not in self.quiet
        if tracked:
            self.in_flight(1)  # type: ignore[misc]
        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            # Here rather than in Starlette's outermost handler, which answers but re-raises (a
            # second traceback, from the server) and answers outside this counter.
            log.exception("unhandled error on %s %s", scope.get("method"), scope["path"])
            if not started:  # else the response is cut short: the client sees it end early
                error = ApiError(500, "internal server error", type="server_error", code="internal_error")
                await send_error(counting_send, error)
        finally:
            if tracked:
                self.in_flight(-1)  # type: ignore[misc]


def _split_host(value: str) -> tuple[str, int | None]:
    """``name[:port]`` or ``[v6]:port`` -> (lower-case name without brackets, port or None)."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        name, sep, port = value.rpartition(":")
        if not sep or not port.isdigit():
            name, port = value, ""
    port_n = int(port) if port.isdigit() else None
    return name.rstrip("."), port_n


class HostCheckMiddleware:
    """Answer only requests whose ``Host`` names this server: a web page that rebinds its own DNS
    name to 127.0.0.1 reaches a loopback server by that name, so a keyless server refuses names
    it was not told about (400). Allowed: the loopback names at the port the connection came in
    on, and ``allowed`` (``name`` at any port, ``name:port``, or ``*``: anything). The
    ``open_paths`` (``/health``) answer any name, as they answer without an API key."""

    def __init__(
        self, app: ASGIApp, allowed: tuple[str, ...] = (), open_paths: frozenset[str] = frozenset({"/health"})
    ) -> None:
        self.app = app
        self.any = "*" in allowed
        self.names: set[str] = set()
        self.name_ports: set[tuple[str, int]] = set()
        for entry in allowed:
            name, port = _split_host(entry)
            if port is None:
                self.names.add(name)
            else:
                self.name_ports.add((name, port))
        self.open_paths = open_paths

    def allows(self, host: str, scope: Scope) -> bool:
        name, port = _split_host(host)
        if port is None:
            port = 443 if scope.get("scheme") in ("https", "wss") else 80
        if name in self.names or (name, port) in self.name_ports:
            return True
        server = scope.get("server")
        local_port = server[1] if server and len(server) > 1 else None
        return name in LOOPBACK_NAMES and (local_port is None or port == local_port)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.any or scope["type"] != "http" or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        host = next((v for k, v in scope["headers"] if k == b"host"), None)
        if host is None:  # HTTP/1.0 without Host: no browser sends that
            return await self.app(scope, receive, send)
        text = host.decode("latin-1")
        if self.allows(text, scope):
            return await self.app(scope, receive, send)
        error = ApiError(
            400,
            f"this server does not answer for the host {text!r}: start it with --allowed-host NAME to "
            "answer for that name, or with an API key",
            code="invalid_host",
        )
        await send_error(send, error)


class JsonBodyMiddleware:
    """A POST body must say it is JSON (``Content-Type: application/json``), else 415: a web page
    may send any site a ``text/plain`` or form POST without asking (no CORS preflight), but not
    a JSON one."""

    METHODS = frozenset({"POST", "PUT", "PATCH"})

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in self.METHODS:
            return await self.app(scope, receive, send)
        ctype = next((v for k, v in scope["headers"] if k == b"content-type"), b"")
        media = ctype.split(b";", 1)[0].strip().lower()
        if media == b"application/json":
            return await self.app(scope, receive, send)
        shown = ctype.decode("latin-1") or "none"
        error = ApiError(
            415,
            f"the request body must be JSON, sent with Content-Type: application/json (got {shown})",
            code="unsupported_media_type",
        )
        await send_error(send, error)
