"""An aiohttp listener that closes slow and idle clients and caps connections.

aiohttp has no header timeout (a client sending one header byte every few
seconds is kept forever) and no connection limit. nginx's answers are copied:

- a header timeout: from the connection, or from the first byte after a
  response, a whole request header must arrive within `header_timeout`;
- a keep-alive timeout: an idle connection is closed `keepalive_timeout` after
  its last response;
- connection caps in total (503) and per client address (429), answered with a
  fixed response and closed before aiohttp sees the connection.

Each aiohttp protocol is wrapped by a `_Guarded` protocol that owns one timer.
"A request's header is complete" is learnt from a middleware (the handler only
runs once the header was parsed) and "its response is sent" from aiohttp's
access-log hook, which runs after the last byte is written; both are public
aiohttp interfaces, so no private handler state is read.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, cast

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from ..logsetup import event

log = logging.getLogger("mediaserver.http")

HEADER = "header"
KEEPALIVE = "keepalive"


def _refusal(status: str, reason: str) -> bytes:
    body = reason.encode() + b"\n"
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body


class _Refused(asyncio.Protocol):
    """A connection over a cap: one fixed response, then closed."""

    def __init__(self, response: bytes) -> None:
        self.response = response

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop transports are not asyncio.Transport subclasses
        transport.write(self.response)
        transport.close()

    def data_received(self, data: bytes) -> None:
        pass


class _Guarded(asyncio.Protocol):
    """Forwards everything to aiohttp's protocol; closes on the header or keep-alive deadline."""

    def __init__(self, listener: GuardedListener, inner: Any) -> None:
        self.listener = listener
        self.inner = inner
        self.transport: asyncio.Transport | None = None
        self.address = "?"
        self.client = "?"
        self.in_request = False
        self.timer: asyncio.TimerHandle | None = None
        self.timer_kind = ""
        self.closed_reason: str | None = None

    # -- the deadline --------------------------------------------------------
    def arm(self, kind: str) -> None:
        if self.timer is not None:
            self.timer.cancel()
        delay = self.listener.header_timeout if kind == HEADER else self.listener.keepalive_timeout
        self.timer_kind = kind
        self.timer = asyncio.get_running_loop().call_later(delay, self._expired)

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.timer_kind = ""

    def _expired(self) -> None:
        self.timer = None
        if self.in_request or self.transport is None or self.transport.is_closing():
            return
        if self.timer_kind == HEADER:
            reason = f"no complete request header within {self.listener.header_timeout:g} s"
            level = logging.INFO
        else:
            reason = f"idle for {self.listener.keepalive_timeout:g} s after the last response"
            level = logging.DEBUG
        self.closed_reason = reason
        event(log, level, "HTTP connection closed", client=self.client, reason=reason)
        self.listener.closed_by_timeout[self.timer_kind] += 1
        self.transport.abort()

    def request_started(self) -> None:
        self.in_request = True
        self.disarm()

    def response_sent(self) -> None:
        self.in_request = False
        if self.transport is not None and not self.transport.is_closing():
            self.arm(KEEPALIVE)

    # -- asyncio.Protocol ----------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop transports are not asyncio.Transport subclasses
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.address = str(peer[0]) if peer else "?"
        self.client = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.listener.handlers[self.inner] = self
        self.arm(HEADER)
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        # The first byte after a response starts the next request's header clock.
        if self.timer_kind == KEEPALIVE and not self.in_request:
            self.arm(HEADER)
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm()
        self.listener.handlers.pop(self.inner, None)
        self.listener.forget(self.address)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class _SentHook(AbstractAccessLogger):
    """aiohttp calls an access logger after a response's last byte: that restarts the idle clock."""

    listener: GuardedListener

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        guarded = self.listener.handlers.get(request.protocol)
        if guarded is not None:
            guarded.response_sent()

    @property
    def enabled(self) -> bool:
        return True


class GuardedListener:
    """An aiohttp application on one address (start, addresses, close), with the guards."""

    def __init__(
        self,
        app: web.Application,
        host: str,
        port: int,
        *,
        header_timeout: float,
        keepalive_timeout: float,
        max_connections: int,
        max_connections_per_client: int,
        **runner_options: Any,
    ) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.header_timeout = header_timeout
        self.keepalive_timeout = keepalive_timeout
        self.max_connections = max_connections
        self.max_connections_per_client = max_connections_per_client
        self.runner_options = runner_options
        self.handlers: dict[Any, _Guarded] = {}
        self.per_address: dict[str, int] = {}
        self.open = 0
        self.refused = {"total": 0, "per_client": 0}
        self.closed_by_timeout = {HEADER: 0, KEEPALIVE: 0}
        self._runner: web.AppRunner | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self._listening: list[Any] | None = None
        # Outermost, so that no other middleware's work runs under the header clock.
        app.middlewares.insert(0, self._middleware)

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        guarded = self.handlers.get(request.protocol)
        if guarded is not None:
            guarded.request_started()
        return await handler(request)

    def forget(self, address: str) -> None:
        self.open -= 1
        left = self.per_address.get(address, 0) - 1
        if left > 0:
            self.per_address[address] = left
        else:
            self.per_address.pop(address, None)

    def _protocol(self, server: web.Server) -> asyncio.Protocol:
        return _Admission(self, server)

    async def start(self, sockets: list[Any] | None = None, accept: bool = True) -> None:
        """Listen on host:port, or on `sockets` (bound by the keeper; `resume_accepting` later
        when `sockets` is given and `accept` is False)."""
        self._listening = sockets
        hook = type("SentHook", (_SentHook,), {"listener": self})
        self._runner = web.AppRunner(
            self.app,
            handle_signals=False,
            access_log=log,
            access_log_class=hook,
            # aiohttp's own idle close stays as a backstop behind ours.
            keepalive_timeout=self.keepalive_timeout + self.header_timeout,
            **self.runner_options,
        )
        await self._runner.setup()
        server = self._runner.server
        assert server is not None
        if accept:
            await self.resume_accepting()

    async def resume_accepting(self) -> None:
        if self._servers:
            return
        assert self._runner is not None and self._runner.server is not None
        server = self._runner.server
        loop = asyncio.get_running_loop()
        if self._listening is None:
            self._servers = [await loop.create_server(
                lambda: self._protocol(server), self.host, self.port, reuse_address=True
            )]
        else:
            # A server closes the socket it is given: it gets a copy, the original stays.
            self._servers = [
                await loop.create_server(lambda: self._protocol(server), sock=sock.dup())
                for sock in self._listening
            ]

    def stop_accepting(self) -> None:
        servers, self._servers = self._servers, []
        for each in servers:
            each.close()

    @property
    def addresses(self) -> list[tuple[str, int]]:
        if self._listening is not None:
            return [s.getsockname()[:2] for s in self._listening]
        return [s.getsockname()[:2] for each in self._servers for s in each.sockets]

    async def close(self) -> None:
        self.stop_accepting()
        if self._runner is not None:
            await self._runner.cleanup()


class _Admission(asyncio.Protocol):
    """Decides at accept time, when the peer address is known, which protocol takes the connection.

    asyncio picks a protocol before it knows the peer, so this one swaps itself
    for the real one (`transport.set_protocol`) in `connection_made`.
    """

    def __init__(self, listener: GuardedListener, server: web.Server) -> None:
        self.listener = listener
        self.server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop transports are not asyncio.Transport subclasses
        listener = self.listener
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if peer else "?"
        client = f"{peer[0]}:{peer[1]}" if peer else "?"
        protocol: asyncio.Protocol
        if listener.open >= listener.max_connections:
            listener.refused["total"] += 1
            reason = f"the server's limit of {listener.max_connections} open HTTP connections is reached"
            event(log, logging.WARNING, "HTTP connection refused", client=client, reason=reason)
            protocol = _Refused(_refusal("503 Service Unavailable", reason))
        elif listener.per_address.get(address, 0) >= listener.max_connections_per_client:
            listener.refused["per_client"] += 1
            reason = f"the limit of {listener.max_connections_per_client} open HTTP connections per client address is reached"
            event(log, logging.WARNING, "HTTP connection refused", client=client, reason=reason)
            protocol = _Refused(_refusal("429 Too Many Requests", reason))
        else:
            listener.open += 1
            listener.per_address[address] = listener.per_address.get(address, 0) + 1
            protocol = _Guarded(listener, self.server())
        transport.set_protocol(protocol)
        protocol.connection_made(transport)

    def data_received(self, data: bytes) -> None:  # pragma: no cover - replaced before any data
        pass
