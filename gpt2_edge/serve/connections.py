"""The server's sockets under uvicorn: bound before the model loads, a header timeout and a cap on
open connections (neither of which uvicorn has).

uvicorn parses HTTP in a protocol object per connection; ``guarded_protocol`` is its h11 protocol
with two more rules:

- a connection has ``header_timeout_s`` from its start (or from the end of its previous response)
  to send a whole request head; then it is answered 408 and closed, however slowly it trickles
  (uvicorn's keep-alive timer stops at the first byte);
- one more than ``max_connections`` open connections is answered 503 at once and closed, and the
  others go on being served.

The body's own timeout is the app's (``middleware.BodyLimitMiddleware``), so it holds behind any
server. uvicorn is imported by ``guarded_protocol`` alone: ``bind`` serves the Ray path too.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import socket
import time
from typing import TYPE_CHECKING, Any

from ..errors import Gpt2EdgeError

if TYPE_CHECKING:
    from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("gpt2_edge.serve")

_WARN_EVERY_S = 10.0  # a flood of refused connections logs one line per this many seconds


def _response(status: int, reason: str, message: str, code: str, headers: str = "") -> bytes:
    body = json.dumps(
        {"error": {"message": message, "type": "server_error", "param": None, "code": code}},
        separators=(",", ":"),
    ).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        f"connection: close\r\n{headers}\r\n"
    )
    return head.encode("latin-1") + body


def guarded_protocol(header_timeout_s: float, max_connections: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a request-head timeout and a connection cap (pass it to
    ``uvicorn.Config(http=...)``)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    timed_out = _response(
        408,
        "Request Timeout",
        f"the request head did not arrive within {header_timeout_s:g} s",
        "header_timeout",
    )
    too_many = _response(
        503,
        "Service Unavailable",
        f"the server has its {max_connections} connections open; retry later",
        "too_many_connections",
        "retry-after: 1\r\n",
    )
    last_warning = [0.0]

    class GuardedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                now = time.monotonic()
                if now - last_warning[0] > _WARN_EVERY_S:
                    last_warning[0] = now
                    log.warning("refusing connections over --max-connections %d", max_connections)
                self.transport.write(too_many)
                self.transport.close()
                return
            self._wait_for_head()

        def _wait_for_head(self) -> None:
            self._stop_waiting()
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_timed_out)

        def _stop_waiting(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing():
                self.transport.write(timed_out)
                self.transport.close()

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request's head is in: its cycle began
                self._stop_waiting()

        def on_response_complete(self) -> None:
            # Keep-alive: the next head has as long (armed first: a pipelined request's head,
            # handled inside, stops it again).
            if not self.transport.is_closing():
                self._wait_for_head()
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_waiting()
            super().connection_lost(exc)

    return GuardedH11Protocol


class ListenError(Gpt2EdgeError):
    """The address cannot be listened on (in use, not ours, not known)."""


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``, made before anything slow (the model) so a port
    in use is one line at once, not a traceback after loading."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ListenError(f"cannot listen on {where}: unknown host ({e.strerror}); check --host") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            hint = "another process listens there; stop it or choose another --port"
            raise ListenError(f"cannot listen on {where}: address already in use; {hint}") from None
        if e.errno == errno.EACCES:
            hint = "ports below 1024 need privileges; choose another --port"
            raise ListenError(f"cannot listen on {where}: permission denied; {hint}") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise ListenError(
                f"cannot listen on {where}: no such address on this machine; check --host"
            ) from None
        raise ListenError(f"cannot listen on {where}: {e.strerror or e}") from None
    sock.set_inheritable(False)
    return sock
