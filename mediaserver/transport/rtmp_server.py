"""The RTMP listener: asyncio glue around the sans-I/O `ServerConnection`.

Bytes from the socket go into the protocol core; its events become session
messages; its output goes back to the socket. Every way a connection can go
wrong ends in `disconnect(reason)`, which logs the reason once.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from typing import Any, Callable

import msgspec

from .. import wire
from ..auth import PublishAuth, PublishDenied, key_from_query
from ..handover import MOVE_VERSION, MovedConnection, MovedSession
from ..config import LimitsConfig, RtmpConfig
from ..logsetup import event
from ..proto import flv, rtmp
from ..proto.errors import ProtocolError
from ..proto.rtmp_state import export_state
from ..runtime.session import Session
from ..runtime.streams import PublishRefused, Streams

log = logging.getLogger("mediaserver.rtmp")

APP = "live"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
AVC = 7
AAC = 10
_SWEEP_INTERVAL = 0.5


class RtmpConnection(asyncio.Protocol):
    def __init__(self, server: RtmpServer, core: rtmp.ServerConnection | None = None) -> None:
        self.server = server
        self.config = server.config
        self.streams = server.streams
        self.core = core or rtmp.ServerConnection(
            max_message_size=self.config.max_message_size,
            out_chunk_size=self.config.out_chunk_size,
        )
        self.adopted = core is not None
        """Handed over by the previous worker, with its state."""
        self.last_read_at = 0.0
        self.first_read_at: float | None = None
        """First read after an adoption (the end of this stream's pause)."""
        self.paused_since = 0.0
        self.paused_for_move = False
        self.moved = False
        self.moved_last_read_at = 0.0
        self.moved_paused_at = 0.0
        self.resumed_at = 0.0
        """For an adopted connection: the old worker's last read, and when it stopped reading."""
        self.eof = False
        self.transport: asyncio.Transport | None = None
        self.client = "?"
        self.protocol = "rtmp"
        self.host = "?"
        self.accepted_at = time.monotonic()
        self.last_activity = self.accepted_at
        self.connected = False
        """The client's `connect` command arrived: the handshake deadline no longer applies."""
        self.closed = False
        self.session: Session | None = None
        self.stream_name: str | None = None
        self.stream_id: int | None = None
        self.frames_in = {"video": 0, "audio": 0}
        self.published_at = 0.0
        self._authorizing = False
        self._held: list[Any] = []
        """Events that arrived while a publish waited for its webhook."""
        self._handlers: dict[type, Callable[[Any], None]] = {
            rtmp.VideoMessage: self._on_video,
            rtmp.AudioMessage: self._on_audio,
            rtmp.ConnectRequest: self._on_connect,
            rtmp.PublishRequest: self._on_publish,
            rtmp.Metadata: self._on_metadata,
            rtmp.Unpublish: self._on_unpublish,
        }

    # -- asyncio.Protocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.adopted:
            # Nothing may be read before the old worker has our acknowledgement.
            self.transport.pause_reading()  # type: ignore[union-attr]
            self.server.connections.add(self)
            return
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            host = peer[0]
            self.host = host
            self.client = f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
        refusal = self.server.admit(self)
        if refusal:
            self.closed = True
            event(log, logging.WARNING, "connection refused", client=self.client, reason=refusal)
            transport.close()
            return
        self.server.connections.add(self)
        event(log, logging.DEBUG, "connection accepted", client=self.client)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.last_activity = self.last_read_at = time.monotonic()
        if self.first_read_at is None and self.adopted:
            self.first_read_at = self.last_read_at
        try:
            events = self.core.feed(data)
        except ProtocolError as exc:
            self._flush()
            self.disconnect(f"protocol error: {exc}", level=logging.WARNING)
            return
        except Exception as exc:  # a parser bug must cost this connection only, with a reason
            self.disconnect(
                f"internal error parsing input: {type(exc).__name__}: {exc}", level=logging.ERROR
            )
            return
        self._dispatch(events)
        self._flush()

    def _dispatch(self, events: list[Any]) -> None:
        handlers = self._handlers
        for index, ev in enumerate(events):
            if self._authorizing:
                self._held.extend(events[index:])
                return
            handler = handlers.get(type(ev))
            if handler is not None:
                handler(ev)
                if self.closed:
                    return

    def eof_received(self) -> bool | None:
        self.eof = True
        return None  # close: the publisher is gone, what it sent has been handled

    def connection_lost(self, exc: Exception | None) -> None:
        if self.moved:
            self.server.connections.discard(self)
            return
        reason = "client disconnected" if exc is None else f"connection lost: {exc}"
        where = self.core.where()
        if where:
            reason = f"{reason} {where}"
        self._end_publish(reason)
        if not self.closed:
            self.closed = True
            level = logging.WARNING if where else logging.INFO
            event(log, level, "connection closed", client=self.client, stream=self.stream_name, reason=reason)
        self.server.connections.discard(self)

    # -- events --------------------------------------------------------------

    def _on_connect(self, ev: Any) -> None:
        app = str(ev.app).strip("/")
        if app != APP:
            self.core.reject_connect(f"unknown application {app!r}; publish to rtmp://HOST/{APP}/NAME")
            self._flush()
            self.disconnect(f"connect to unknown application {app!r}", level=logging.WARNING)
            return
        self.connected = True
        self.core.accept_connect()

    def _on_publish(self, ev: Any) -> None:
        name = str(ev.name)
        if self.session is not None or self._authorizing:
            self.core.reject_publish(ev.stream_id, "NetStream.Publish.BadName", "already publishing")
            self._flush()
            self.disconnect("second publish on one connection", level=logging.WARNING)
            return
        if not NAME_PATTERN.fullmatch(name):
            self.core.reject_publish(ev.stream_id, "NetStream.Publish.BadName", f"invalid stream name {name!r}")
            self._flush()
            self.disconnect(f"invalid stream name {name!r}", level=logging.WARNING)
            return
        auth = self.server.auth
        key = key_from_query(ev.query)
        if auth.config.webhook:
            # The webhook answers later: hold this connection's input meanwhile.
            self._authorizing = True
            if self.transport is not None:
                self.transport.pause_reading()
            asyncio.get_running_loop().create_task(self._authorize(ev, name, key))
            return
        try:
            auth.check_key(name, key)
        except PublishDenied as exc:
            self._refuse(ev, name, str(exc))
            return
        self._start_publish(ev, name)

    async def _authorize(self, ev: Any, name: str, key: str) -> None:
        reason = ""
        try:
            await self.server.auth.authorize("rtmp", name, key, self.client)
        except PublishDenied as exc:
            reason = str(exc)
        if self.closed:
            return
        self._authorizing = False
        if reason:
            self._refuse(ev, name, reason)
            return
        self._start_publish(ev, name)
        held, self._held = self._held, []
        self._dispatch(held)
        self._flush()
        if not self.closed and self.transport is not None and not self._authorizing:
            self.transport.resume_reading()

    def _refuse(self, ev: Any, name: str, reason: str) -> None:
        self.core.reject_publish(ev.stream_id, "NetStream.Publish.BadAuth", reason)
        self._flush()
        self.disconnect(f"publish denied: {reason}", level=logging.WARNING, stream=name)

    def _start_publish(self, ev: Any, name: str) -> None:
        try:
            self.session = self.streams.publish(name, self, self._backpressure)
        except PublishRefused as exc:
            self.core.reject_publish(ev.stream_id, "NetStream.Publish.BadName", str(exc))
            self._flush()
            self.disconnect(f"publish refused: {exc}", level=logging.WARNING, stream=name)
            return
        self.stream_name = name
        self.stream_id = ev.stream_id
        self.published_at = time.monotonic()
        self.core.accept_publish(ev.stream_id)

    def _on_metadata(self, ev: Any) -> None:
        if self.session is not None:
            self.session.deliver(wire.Metadata(values=dict(ev.values)))

    def _on_video(self, ev: Any) -> None:
        session = self.session
        if session is None:
            return  # media before publish: nothing to attach it to
        try:
            tag = flv.parse_video(ev.payload)
        except ProtocolError as exc:
            self.disconnect(f"bad video tag: {exc}", level=logging.WARNING)
            return
        if tag.codec_id != AVC:
            self.disconnect(
                f"unsupported video codec id {tag.codec_id}; only H.264 (7) is passed through",
                level=logging.WARNING,
            )
            return
        if tag.is_config:
            session.deliver(wire.VideoConfig(data=bytes(tag.data)))
        elif not tag.is_end and len(tag.data):
            self.frames_in["video"] += 1
            session.deliver(wire.Video(ev.timestamp, tag.cts, tag.keyframe, tag.data))

    def _on_audio(self, ev: Any) -> None:
        session = self.session
        if session is None:
            return
        try:
            tag = flv.parse_audio(ev.payload)
        except ProtocolError as exc:
            self.disconnect(f"bad audio tag: {exc}", level=logging.WARNING)
            return
        if tag.sound_format != AAC:
            self.disconnect(
                f"unsupported audio format {tag.sound_format}; only AAC (10) is passed through",
                level=logging.WARNING,
            )
            return
        if tag.is_config:
            session.deliver(wire.AudioConfig(data=bytes(tag.data)))
        elif len(tag.data):
            self.frames_in["audio"] += 1
            session.deliver(wire.Audio(ev.timestamp, tag.data))

    def _on_unpublish(self, ev: Any) -> None:
        if self.stream_id is not None and ev.stream_id == self.stream_id:
            self._end_publish("publisher unpublished")

    # -- helpers -------------------------------------------------------------

    def _flush(self) -> None:
        out = self.core.data_to_send()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    def _backpressure(self, pause: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if pause:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def _end_publish(self, reason: str) -> None:
        session, self.session = self.session, None
        if session is not None and self.stream_name is not None:
            self.streams.unpublish(self.stream_name, session, reason)
            self.server.auth.notify_unpublish("rtmp", self.stream_name, self.client, reason)

    def disconnect(self, reason: str, level: int = logging.INFO, **fields: Any) -> None:
        """Close this connection (once), ending its publish; `reason` is logged."""
        if self.closed:
            return
        self.closed = True
        fields.setdefault("stream", self.stream_name)
        event(log, level, "connection closed", client=self.client, reason=reason, **fields)
        self._end_publish(reason)
        if self.transport is not None:
            self.transport.close()

    @property
    def bytes_in(self) -> int:
        return self.core.bytes_received

    def sweep(self, now: float) -> None:
        """Apply the handshake and idle deadlines (called by the server's timer)."""
        if not self.connected and now - self.accepted_at > self.config.handshake_timeout:
            self.disconnect(
                f"handshake not completed within {self.config.handshake_timeout:g} s",
                level=logging.WARNING,
            )
        elif now - self.last_activity > self.config.idle_timeout:
            self.disconnect(f"idle for more than {self.config.idle_timeout:g} s", level=logging.WARNING)

    # -- hand-over to another worker -----------------------------------------

    def movable_state(self) -> str | None:
        """Why this connection cannot move now (None: it can)."""
        if self.closed or self.transport is None or self.transport.is_closing():
            return "closed"
        if self.eof:
            return "half-closed"
        if self.core.failed is not None:
            return "failed"
        if self._authorizing or self._held:
            return "waiting for the publish webhook"
        if self.transport.get_write_buffer_size():
            return "output not yet sent"
        session = self.session
        if session is not None and (session.mailbox or session.suspended or session.stopped):
            return "session busy"
        return None

    def export(self) -> MovedConnection:
        self._flush()
        moved_session = None
        session = self.session
        if session is not None and self.stream_name is not None:
            writer = self.streams.writers[self.stream_name]
            moved_session = MovedSession(
                name=self.stream_name,
                logic_version=session.generation.version,
                logic_state=msgspec.to_builtins(session.state),
                writer=writer.to_state(),
                segment_target=writer.segment_target,
                playlist_size=writer.playlist_size,
                handled=session.handled,
                crashes=session.crashes,
                quarantined=session.quarantined,
                started_wall=time.time() - (time.monotonic() - session.started),
            )
        return MovedConnection(
            version=MOVE_VERSION, client=self.client, host=self.host,
            accepted_at=self.accepted_at, last_activity=self.last_activity, connected=self.connected,
            core=export_state(self.core), stream_name=self.stream_name, stream_id=self.stream_id,
            frames_in=dict(self.frames_in), published_at=self.published_at,
            last_read_at=self.last_read_at or self.accepted_at, session=moved_session,
            paused_at=self.paused_since if self.paused_for_move else 0.0,
        )

    def socket_fd(self) -> int:
        assert self.transport is not None
        return self.transport.get_extra_info("socket").fileno()

    def pause_for_move(self) -> None:
        assert self.transport is not None
        self.transport.pause_reading()
        self.paused_for_move = True
        self.paused_since = time.monotonic()

    def resume_after_failed_move(self) -> None:
        """The successor did not take this connection: go on reading as before."""
        if not self.paused_for_move:
            return
        self.paused_for_move = False
        if self.transport is not None and not self.transport.is_closing():
            session = self.session
            if session is None or not session.reading_paused:
                self.transport.resume_reading()

    def detach_moved(self) -> None:
        """The successor acknowledged: forget this connection without a word to the peer."""
        self.moved = True
        self.closed = True
        session, self.session = self.session, None
        if session is not None and self.stream_name is not None:
            self.streams.release(self.stream_name, session)
        self.server.connections.discard(self)
        if self.transport is not None:
            # close(), not shutdown(): the successor holds the same socket, so no FIN is sent.
            self.transport.abort()

    def resume_after_adopt(self) -> None:
        self.resumed_at = time.monotonic()
        if self.transport is not None and not self.transport.is_closing():
            session = self.session
            if session is None or not session.reading_paused:
                self.transport.resume_reading()

    def pause_report(self) -> dict[str, Any]:
        """pause_ms: the old worker's last read -> our first (the issue's measure; it includes
        the publisher's own gap between two sends); held_ms: the old worker stopped reading ->
        we started (no process read this socket meanwhile: the hand-over's own share)."""
        pause_ms = held_ms = None
        if self.first_read_at is not None and self.moved_last_read_at:
            pause_ms = round((self.first_read_at - self.moved_last_read_at) * 1000, 3)
        if self.resumed_at and self.moved_paused_at:
            held_ms = round((self.resumed_at - self.moved_paused_at) * 1000, 3)
        return {"client": self.client, "stream": self.stream_name, "pause_ms": pause_ms, "held_ms": held_ms}


class RtmpServer:
    def __init__(
        self, config: RtmpConfig, streams: Streams, auth: PublishAuth, limits: LimitsConfig | None = None
    ) -> None:
        self.config = config
        self.streams = streams
        self.auth = auth
        self.limits = limits or LimitsConfig()
        self.connections: set[RtmpConnection] = set()
        self._servers: list[asyncio.AbstractServer] = []
        self._listening: list[socket.socket] | None = None
        self._sweeper: asyncio.Task[None] | None = None

    def admit(self, connection: RtmpConnection) -> str:
        """Why `connection` may not be served (a limit), or "" when it may."""
        if len(self.connections) >= self.limits.max_connections:
            return f"connection limit of {self.limits.max_connections} reached"
        same = sum(1 for c in self.connections if c.host == connection.host)
        if same >= self.limits.max_connections_per_client:
            return (
                f"limit of {self.limits.max_connections_per_client} connections "
                f"per client address reached for {connection.host}"
            )
        return ""

    async def start(self, sockets: list[socket.socket] | None = None, accept: bool = True) -> None:
        """Listen on the configured address, or on `sockets` (bound by the keeper);
        `accept` False: not yet (a successor accepts once the hand-over is done)."""
        self._listening = sockets
        if accept:
            await self.resume_accepting()
        self._sweeper = asyncio.create_task(self._sweep_forever())

    async def resume_accepting(self) -> None:
        if self._servers:
            return
        loop = asyncio.get_running_loop()
        if self._listening is None:
            self._servers = [await loop.create_server(
                lambda: RtmpConnection(self), self.config.host, self.config.port, reuse_address=True
            )]
            return
        # A server closes the socket it was given: give it a copy, keep the original.
        self._servers = [
            await loop.create_server(lambda: RtmpConnection(self), sock=sock.dup())
            for sock in self._listening
        ]

    async def adopt(
        self, sock: socket.socket, moved: MovedConnection, core: rtmp.ServerConnection, logic_state: Any
    ) -> RtmpConnection:
        """A connection handed over by the previous worker, reading paused until `resume_after_adopt`."""
        connection = RtmpConnection(self, core)
        connection.client, connection.host = moved.client, moved.host
        connection.accepted_at, connection.last_activity = moved.accepted_at, moved.last_activity
        connection.connected = moved.connected
        connection.stream_name, connection.stream_id = moved.stream_name, moved.stream_id
        connection.frames_in = dict(moved.frames_in) or {"video": 0, "audio": 0}
        connection.published_at = moved.published_at
        connection.moved_last_read_at = moved.last_read_at
        connection.moved_paused_at = moved.paused_at
        if moved.session is not None and moved.stream_name is not None:
            connection.session = self.streams.adopt(
                moved.stream_name, connection, connection._backpressure, logic_state, moved.session
            )
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(lambda: connection, sock)
        except BaseException:
            if connection.session is not None and moved.stream_name is not None:
                self.streams.release(moved.stream_name, connection.session)
            raise
        event(log, logging.INFO, "connection adopted", client=connection.client, stream=connection.stream_name)
        return connection

    @property
    def addresses(self) -> list[tuple[str, int]]:
        if self._listening is not None:
            return [sock.getsockname()[:2] for sock in self._listening]
        return [sock.getsockname()[:2] for server in self._servers for sock in server.sockets]

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_INTERVAL)
            now = time.monotonic()
            for connection in list(self.connections):
                connection.sweep(now)

    def stop_accepting(self) -> None:
        """Accept nothing more; the listening sockets stay open in the keeper."""
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()

    async def close(self, reason: str) -> None:
        self.stop_accepting()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for connection in list(self.connections):
            connection.disconnect(reason)
