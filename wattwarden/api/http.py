"""The connection layer of the agent's HTTP server: uvicorn (h11) with production limits.

Strict HTTP/1.1 parsing (a bad or duplicate Content-Length is a 400, an unread body is never parsed
as the next request), a real listen backlog, a connection cap below the process's file-descriptor
limit, a deadline for a request's headers and body, a keep-alive timeout, Nagle off, and JSON
bodies for the errors this layer answers itself. It serves any ASGI application on its own thread
and event loop; what the application does is ``wattwarden.api.server``'s business.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import resource
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import h11
import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("wattwarden.api.server")

MAX_BODY_BYTES = 64 * 1024
ACCEPT_BURST = 16
"""Connections accepted per event-loop wakeup (asyncio's accept loop), before the cap applies."""
FD_RESERVE = 64
"""File descriptors kept free of connections at least: the agent's own files, and one burst."""


@dataclass(frozen=True)
class HttpLimits:
    """What one client may hold of the server."""

    max_connections: int | None = None
    """Open connections at most; ``None`` derives it from the file-descriptor limit."""
    backlog: int = 2048
    """Listen backlog: connections the kernel queues before we accept them."""
    keep_alive_s: int = 30
    """An idle connection (before its first request or between two) is closed after this."""
    request_deadline_s: float = 5.0
    """From a request's first byte, its headers and body must arrive within this."""
    max_body_bytes: int = MAX_BODY_BYTES
    shutdown_s: int = 3
    """``close()`` lets requests in flight finish for this long."""

    def connection_cap(self) -> int:
        """The cap: as set, or the soft RLIMIT_NOFILE less a reserve for the agent's own files."""
        if self.max_connections is not None:
            return self.max_connections
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            soft = 65536
        return max(16, min(1024, soft - max(FD_RESERVE, soft // 4)))


def _raw_response(status: HTTPStatus, message: str) -> bytes:
    """A whole JSON error response, for the protocol layer to write before it closes."""
    body = json.dumps({"error": message}).encode()
    head = (
        f"HTTP/1.1 {status.value} {status.phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\ncache-control: no-store\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class _Config(uvicorn.Config):
    """uvicorn's config, carrying our limits to each connection's protocol."""

    def __init__(self, app: ASGIApp, *, limits: HttpLimits, **kwargs: Any) -> None:
        # handed over as a factory: uvicorn otherwise calls the app with no arguments to guess
        # whether it is one, and takes an app whose __call__ accepts that (a wrapper's) for one
        super().__init__(lambda: app, factory=True, **kwargs)
        self.limits = limits
        self.connection_cap = limits.connection_cap()


class _Protocol(H11Protocol):
    """uvicorn's h11 protocol with a connection cap and a deadline on receiving a request.

    uvicorn closes a connection that idles between requests, but not one that trickles a
    request's headers or body (slowloris), nor a fresh one that sends nothing: here a request must
    arrive whole within ``request_deadline_s`` of its first byte (else 408 and close), and a fresh
    connection idles no longer than the keep-alive timeout. Beyond the cap, a new connection
    displaces the longest-idle one; when every connection is busy it gets a quick 503.
    """

    config: _Config

    def __init__(
        self,
        config: _Config,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._deadline: asyncio.TimerHandle | None = None
        self._idle_since = time.monotonic()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Admit the connection under the cap, turn Nagle off, and start its idle timer."""
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:  # asyncio only does it for sockets made with proto IPPROTO_TCP
            # keep-alive clients (EnergyMeter) would otherwise wait out delayed ACKs: ~40 ms
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if len(self.connections) > self.config.connection_cap and not self._displace():
            log.debug("connection cap %d reached; refusing %s", self.config.connection_cap,
                      self.client)  # fmt: skip
            transport.write(_raw_response(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections"))
            transport.close()
            return
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the connection; a client going away is not an error."""
        self._cancel_deadline()
        if exc is not None:
            log.debug("connection from %s lost: %s", self.client, exc)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Feed h11, then watch the request's deadline."""
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        """Serve any pipelined request, then watch its deadline."""
        super().on_response_complete()
        self._idle_since = time.monotonic()
        self._watch()

    def _idle(self) -> bool:
        cycle = self.cycle
        return (
            self._deadline is None
            and self.conn.their_state is h11.IDLE
            and (cycle is None or cycle.response_complete)
            and not self.transport.is_closing()
        )

    def _displace(self) -> bool:
        """Close the longest-idle other connection; False when every other one is busy."""
        idle = [p for p in self.connections if p is not self and isinstance(p, _Protocol)]
        idle = [p for p in idle if p._idle()]
        if not idle:
            return False
        victim = min(idle, key=lambda p: p._idle_since)
        log.debug("connection cap reached; closing idle connection from %s", victim.client)
        victim.timeout_keep_alive_handler()
        return True

    def _watch(self) -> None:
        """Arm the deadline while a request is partly received; disarm it once it is whole."""
        their = self.conn.their_state
        receiving = their is h11.SEND_BODY or (
            their is h11.IDLE and bool(self.conn.trailing_data[0])
        )
        if not receiving:
            self._cancel_deadline()
        elif self._deadline is None and not self.transport.is_closing():
            self._deadline = self.loop.call_later(
                self.config.limits.request_deadline_s, self._too_slow
            )

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        log.debug("closing connection from %s: request not received in %.1f s",
                  self.client, self.config.limits.request_deadline_s)  # fmt: skip
        cycle = self.cycle
        if cycle is None or cycle.response_complete or not cycle.response_started:
            message = "request not received in time"
            self.transport.write(_raw_response(HTTPStatus.REQUEST_TIMEOUT, message))
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """A malformed request gets a JSON 400, and the connection closes."""
        self.transport.write(_raw_response(HTTPStatus.BAD_REQUEST, f"malformed request: {msg}"))
        self.transport.close()


def _loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Clients that reset or fail a TLS handshake are routine: DEBUG, not an ERROR traceback."""
    exc = context.get("exception")
    if isinstance(exc, ConnectionError | ssl.SSLError | TimeoutError):
        log.debug("connection: %s: %s", context.get("message"), exc)
    elif isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
        log.warning("out of file descriptors accepting connections; retrying in a second")
    else:
        loop.default_exception_handler(context)


class _Server(uvicorn.Server):
    """uvicorn's server that says when it is serving."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.serving = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """Start, then tell :meth:`ApiServer.start`."""
        asyncio.get_running_loop().set_exception_handler(_loop_exception)
        await super().startup(sockets)
        # asyncio accepts up to its ``backlog`` connections per wakeup, before any of them is
        # checked against the cap: keep that burst small, and the kernel's queue long.
        assert isinstance(self.config, _Config)
        for sock in sockets or []:
            sock.listen(self.config.limits.backlog)
        self.serving.set()


class HttpServer:
    """An ASGI application served by uvicorn, on its own thread and event loop."""

    def __init__(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None = None,
        *,
        limits: HttpLimits | None = None,
    ) -> None:
        """Bind now (so a taken port fails early, before any GPU is touched); serve on start."""
        self.limits = limits or HttpLimits()
        self._ssl = ssl_context
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(self.limits.backlog)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        bound = sock.getsockname()
        self._address = (str(bound[0]), int(bound[1]))
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The bound host and port (port 0 resolves to the real one)."""
        return self._address

    def start(self, app: ASGIApp, *, timeout_s: float = 10.0) -> None:
        """Serve ``app`` from a daemon thread; return once it accepts connections."""
        tls = self._ssl
        config = _Config(
            app,
            limits=self.limits,
            http=_Protocol,
            ws="none",
            lifespan="off",
            log_config=None,
            log_level=logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.WARNING,
            access_log=False,
            server_header=False,
            proxy_headers=False,
            backlog=ACCEPT_BURST,
            timeout_keep_alive=self.limits.keep_alive_s,
            timeout_graceful_shutdown=self.limits.shutdown_s,
            ssl_context_factory=None if tls is None else (lambda _config, _default: tls),
        )
        server = self._server = _Server(config)

        def serve() -> None:
            try:
                asyncio.run(server.serve(sockets=[self._sock]))
            finally:
                server.serving.set()  # wakes start() if serving failed

        self._thread = threading.Thread(target=serve, name="wattwarden-http", daemon=True)
        self._thread.start()
        if not server.serving.wait(timeout_s) or not server.started:
            raise RuntimeError("the HTTP server did not start; see the log above")

    def close(self) -> None:
        """Stop accepting, let requests in flight finish (bounded), and close the socket."""
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(self.limits.shutdown_s + 2.0)
            if self._thread.is_alive():
                log.warning("HTTP server did not stop within %d s", self.limits.shutdown_s + 2)
        self._sock.close()
