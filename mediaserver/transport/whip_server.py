"""WHIP ingest (RFC 9725): a WebRTC publish becomes an ordinary session.

`POST /live/NAME/whip` (application/sdp) creates a resource at
`/live/NAME/whip/ID` and answers with aiortc's SDP; `DELETE` on it ends the
publish. From there on a WHIP publish is what an RTMP one is to the rest of
the server: the same `wire` messages into the same session (logic, HLS,
supervision, relups). The peer connection lives here, in the transport, so a
relup switches the session between two messages and never touches ICE, DTLS
or SRTP.

Per publish, media goes: aiortc receive thread (H.264 passed through, Opus ->
AAC, VP8 -> H.264; transport/webrtc_decoders.py) -> track queue -> this
module, which maps RTP time to the session's millisecond timeline
(proto/rtp_clock.py, RTCP sender reports for A/V sync), turns Annex B into
AVCC (proto/h264.py) and delivers. A timer asks for keyframes (PLI) when the
publisher has sent none for a segment target and ends a publish whose media
stopped.

An offer is public input: it is bounded (proto/whip.py) before any peer
connection exists; an answered one that has not completed ICE and DTLS within
`webrtc.connect_timeout` is ended and its ports freed; its stream (directory,
HLS writer, metrics) is made only once it connects, the name being reserved
here meanwhile; and the server's ICE checks go only to the address the offer
was POSTed from or to `webrtc.ice_remote_networks` (ice_ports.py).

PATCH (trickle ICE, ICE restart) is not supported: the answer carries every
candidate, and a PATCH gets 405, as RFC 9725 allows.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any, Awaitable, Callable

from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpReceiver, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from aiortc.rtp import RtcpSrPacket

from .. import wire
from ..auth import PublishAuth, PublishDenied
from ..config import HlsConfig, LimitsConfig, WebRtcConfig
from ..logsetup import event
from ..proto import whip as whip_sdp
from ..proto.errors import ProtocolError
from ..proto.h264 import AccessUnits
from ..proto.rtp_clock import StreamClock
from ..runtime.streams import PublishRefused, Streams
from . import dtls_compat, ice_mux, webrtc_decoders
from .audio_jitter import AudioJitterBuffer
from .ice_ports import (
    NoFreePort,
    confine_remote_candidates,
    ice_connections,
    remote_address_filter,
    restrict_gathering,
)
from .rtmp_server import NAME_PATTERN

log = logging.getLogger("mediaserver.whip")

MASK32 = 0xFFFFFFFF
TICK = 0.2
CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "POST, DELETE, PATCH, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, If-Match",
    "Access-Control-Expose-Headers": "Location, Link, ETag, Accept-Patch",
}


def _error(status: int, reason: str, **headers: str) -> web.Response:
    return web.Response(status=status, text=reason + "\n", headers={**CORS, **headers})


def _rtp_origin(receiver: RTCRtpReceiver) -> int:
    """The RTP timestamp aiortc counts this receiver's frame timestamps from."""
    origin = receiver._RTCRtpReceiver__timestamp_mapper._origin  # type: ignore[attr-defined]
    return origin or 0


class WhipPublish:
    """One WHIP resource: a peer connection feeding one session. The `Publisher` of its stream."""

    def __init__(self, server: WhipServer, name: str, resource: str, client: str, pc: RTCPeerConnection) -> None:
        self.server = server
        self.name = name
        self.resource = resource
        self.client = client
        self.protocol = "webrtc"
        self.pc = pc
        self.session: Any = None
        self.clock: StreamClock | None = None
        self.units = AccessUnits()
        self.held: list[tuple[Any, ...]] = []
        self.frames_in = {"video": 0, "audio": 0}
        self.received_bytes = 0
        self.audio_config: bytes | None = None
        self.video_config: bytes | None = None
        self.consumers: list[asyncio.Task[Any]] = []
        self.video_mode: str | None = None
        self.dtls = "openssl"
        self.receivers: dict[str, RTCRtpReceiver] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.created = time.monotonic()
        self.connected_at: float | None = None
        self.last_media = 0.0
        self.last_keyframe = 0.0
        self.last_pli = 0.0
        self.plis_sent = 0
        self.ended = False

    @property
    def bytes_in(self) -> int:
        return self.received_bytes

    # -- media ---------------------------------------------------------------

    async def consume(self, kind: str, receiver: RTCRtpReceiver) -> None:
        track = receiver.track
        while True:
            try:
                item = await track.recv()
            except MediaStreamError:
                return
            if self.ended:
                return
            try:
                self._on_item(kind, receiver, item)
            except Exception as exc:  # one bad frame must not end the consumer silently
                event(log, logging.WARNING, "WHIP frame dropped", stream=self.name, reason=f"{type(exc).__name__}: {exc}")

    def _on_item(self, kind: str, receiver: RTCRtpReceiver, item: Any) -> None:
        now = time.time()
        self.last_media = time.monotonic()
        assert self.clock is not None
        if isinstance(item, webrtc_decoders.VideoUnit):
            self.received_bytes += item.received_bytes
            if not item.data:
                return
            try:
                unit = self.units.push(item.data)
            except ProtocolError as exc:
                event(log, logging.WARNING, "bad H.264 access unit dropped", stream=self.name, reason=str(exc))
                return
            if unit is None:
                self._request_keyframe(force=True)
                return
            config, keyframe, avcc = unit
            if keyframe:
                self.last_keyframe = self.last_media
            rtp = self.clock.frame("video", (item.rtp + _rtp_origin(receiver)) & MASK32, now)
            self.held.append(("video", rtp, config, keyframe, avcc))
        elif isinstance(item, webrtc_decoders.AacFrames):
            self.received_bytes += item.received_bytes
            origin = _rtp_origin(receiver)
            for pts, data in item.frames:
                rtp = self.clock.frame("audio", (pts + origin) & MASK32, now)
                self.held.append(("audio", rtp, item.config, data))
        elif isinstance(item, webrtc_decoders.ReceiveError):
            event(log, logging.WARNING, "WHIP frame dropped", stream=self.name, track=kind, reason=item.reason)
            return
        else:
            event(log, logging.WARNING, "unexpected frame from aiortc", stream=self.name, type=type(item).__name__)
            return
        self.flush(now)

    def flush(self, now: float) -> None:
        """Deliver the held frames whose time on the stream's timeline is known."""
        clock = self.clock
        session = self.session
        if clock is None or session is None or not self.held:
            return
        was_locked = clock.locked
        if not was_locked and clock.waiting_for_first_frames(now):
            return
        if not clock.poll(now):
            return
        if not was_locked:
            event(
                log, logging.INFO, "WHIP timeline set",
                stream=self.name,
                sync=",".join(
                    f"{kind}:{'rtcp' if track.report is not None else 'arrival'}"
                    for kind, track in clock.tracks.items() if track.first_rtp is not None
                ),
                held=len(self.held),
            )
            self._deliver_first_configs()
        delivered = 0
        for item in self.held:
            ms = clock.to_ms(item[0], item[1], now)
            if ms is None:
                break
            delivered += 1
            ts = max(ms, 0) & MASK32
            if item[0] == "video":
                _, _, config, keyframe, avcc = item
                if config is not None and config != self.video_config:
                    self.video_config = config
                    session.deliver(wire.VideoConfig(data=config))
                self.frames_in["video"] += 1
                session.deliver(wire.Video(ts, 0, keyframe, avcc))
            else:
                _, _, config, data = item
                if config != self.audio_config:
                    self.audio_config = config
                    session.deliver(wire.AudioConfig(data=config))
                self.frames_in["audio"] += 1
                session.deliver(wire.Audio(ts, data))
        del self.held[:delivered]

    def _deliver_first_configs(self) -> None:
        """Both codec configs before any frame, as an RTMP publisher sends them.

        Frames are held in arrival order; a video frame ahead of the first
        audio one must not open a segment that has no audio track.
        """
        for item in self.held:
            if item[0] == "video" and item[2] is not None and self.video_config is None:
                self.video_config = item[2]
                self.session.deliver(wire.VideoConfig(data=item[2]))
            elif item[0] == "audio" and self.audio_config is None:
                self.audio_config = item[2]
                self.session.deliver(wire.AudioConfig(data=item[2]))

    def on_sender_report(self, kind: str, packet: RtcpSrPacket) -> None:
        if self.clock is not None:
            info = packet.sender_info
            self.clock.sender_report(kind, info.ntp_timestamp, info.rtp_timestamp, time.time())

    # -- timer ---------------------------------------------------------------

    def tick(self) -> None:
        now = time.monotonic()
        self.flush(time.time())
        if self.connected_at is None:
            deadline = self.server.config.connect_timeout
            if now - self.created > deadline:
                self.end(f"ICE/DTLS did not connect within {deadline:g} s", logging.WARNING)
            return
        timeout = self.server.config.media_timeout
        if now - max(self.last_media, self.connected_at) > timeout:
            self.end(f"no media for {timeout:g} s", logging.WARNING)
            return
        self._request_keyframe(force=False)

    def _request_keyframe(self, force: bool) -> None:
        """PLI when the publisher has sent no keyframe for a segment target (at most twice a second)."""
        receiver = self.receivers.get("video")
        if receiver is None or self.video_mode != whip_sdp.VIDEO_PASSTHROUGH:
            return
        now = time.monotonic()
        if now - self.last_pli < 0.5:
            return
        if not force and now - max(self.last_keyframe, self.connected_at or now) < self.server.keyframe_interval:
            return
        sources = receiver.getSynchronizationSources()
        if not sources:
            return
        self.last_pli = now
        self.plis_sent += 1
        for source in sources:
            self._spawn(receiver._send_rtcp_pli(source.source))

    # -- life ----------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def on_connection_state(self) -> None:
        state = self.pc.connectionState
        if state == "connected" and self.connected_at is None and not self.ended:
            self.connected_at = time.monotonic()
            event(log, logging.INFO, "WHIP connected", stream=self.name, client=self.client)
            if self.server.go_live(self):
                self._request_keyframe(force=True)
        elif state == "failed":
            self.end("ICE/DTLS failed", logging.WARNING)
        elif state == "closed":
            self.end("peer connection closed")

    async def finish(self, reason: str) -> None:
        """End after writing what aiortc still holds (the publisher is done, nothing more comes)."""
        if self.ended:
            return
        for receiver in self.receivers.values():
            webrtc_decoders.drain(receiver)
        if self.consumers:
            await asyncio.wait(self.consumers, timeout=2.0)
        self.end(reason)

    def disconnect(self, reason: str) -> None:
        """Called by the streams registry (replaced, given up, shutdown)."""
        self.end(reason)

    def end(self, reason: str, level: int = logging.INFO) -> None:
        if self.ended:
            return
        self.ended = True
        # Whatever was held for synchronisation is written rather than lost.
        if self.clock is not None and self.held:
            self.clock.sync_wait = 0.0
            self.flush(time.time() + 3600)
        self.server.forget(self)
        if self.session is not None:
            self.server.streams.unpublish(self.name, self.session, reason)
            self.server.auth.notify_unpublish("webrtc", self.name, self.client, reason)
        event(log, level, "WHIP publish ended", stream=self.name, client=self.client, reason=reason)
        for task in [*self.tasks, *self.consumers]:
            if task is not asyncio.current_task():
                task.cancel()
        # Held by the server until done: the loop keeps only a weak reference to tasks.
        closing = asyncio.get_running_loop().create_task(self.pc.close())
        self.server.closing.add(closing)
        closing.add_done_callback(self.server.closing.discard)


class WhipServer:
    def __init__(
        self, config: WebRtcConfig, hls: HlsConfig, streams: Streams, auth: PublishAuth, limits: LimitsConfig
    ) -> None:
        self.config = config
        self.limits = limits
        self.starting: dict[str, int] = {}
        """Peer connections being set up, per client address (they count against the limits too)."""
        self.streams = streams
        self.auth = auth
        self.keyframe_interval = config.keyframe_interval or hls.segment_target
        self.resources: dict[str, WhipPublish] = {}
        self.reserved: dict[str, WhipPublish] = {}
        """Names answered but not yet connected: the stream (directory, writer,
        metrics) is made only when ICE and DTLS complete, but a second POST for
        the name meanwhile is a conflict all the same."""
        self.forward_delete: Callable[[str, str, str], Awaitable[tuple[int, str]]] | None = None
        """DELETE of a resource the previous worker still serves (set by the worker)."""
        self._timer: asyncio.Task[None] | None = None
        self.muxes: list[ice_mux.UdpMux] = []
        self.closing: set[asyncio.Task[None]] = set()
        """Peer connections being closed after their publish ended."""
        webrtc_decoders.install(
            webrtc_decoders.DecoderSettings(
                aac_bitrate=config.aac_bitrate,
                vp8_max_width=config.vp8_max_width,
                vp8_max_height=config.vp8_max_height,
                vp8_max_fps=config.vp8_max_fps,
                vp8_preset=config.vp8_preset,
                vp8_bitrate=config.vp8_bitrate,
                keyframe_interval=self.keyframe_interval,
            )
        )

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/live/{name}/whip", self.post)
        app.router.add_route("OPTIONS", "/live/{name}/whip", self.options)
        app.router.add_delete("/live/{name}/whip/{resource}", self.delete)
        app.router.add_patch("/live/{name}/whip/{resource}", self.patch)
        app.router.add_route("OPTIONS", "/live/{name}/whip/{resource}", self.options)
        for method in ("GET", "PUT"):
            app.router.add_route(method, "/live/{name}/whip", self.not_allowed)

    async def start(self, open_port: bool = True) -> None:
        """`open_port` False: the shared UDP port is still another worker's (`open_shared_port` later)."""
        if open_port:
            await self.open_shared_port()
        self._timer = asyncio.get_running_loop().create_task(self._tick_forever())

    async def open_shared_port(self) -> None:
        if self.config.udp_port and not self.muxes:
            self.muxes = ice_mux.open_muxes(self.config.host_addresses, self.config.udp_port)
            try:
                for mux in self.muxes:
                    await mux.open()
            except OSError:
                for mux in self.muxes:
                    mux.close()
                self.muxes = []
                raise

    def release_shared_port(self) -> None:
        for mux in self.muxes:
            mux.close()
        self.muxes = []

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            for publish in list(self.resources.values()):
                try:
                    publish.tick()
                except Exception:
                    log.exception("WHIP timer failed for stream %s", publish.name)

    def forget(self, publish: WhipPublish) -> None:
        if self.resources.get(publish.resource) is publish:
            del self.resources[publish.resource]
        if self.reserved.get(publish.name) is publish:
            del self.reserved[publish.name]

    def go_live(self, publish: WhipPublish) -> bool:
        """ICE and DTLS are done: the publish becomes a stream. False if the name was taken meanwhile."""
        if self.reserved.get(publish.name) is publish:
            del self.reserved[publish.name]
        try:
            publish.session = self.streams.publish(publish.name, publish, _ignore_backpressure)
        except PublishRefused as exc:
            publish.end(f"refused once connected: {exc}", logging.WARNING)
            return False
        event(
            log, logging.INFO, "WHIP publish started",
            stream=publish.name, client=publish.client, video=publish.video_mode or "none",
            audio="opus->aac" if "audio" in publish.receivers else "none", dtls=publish.dtls,
        )
        return True

    def _conflict(self, name: str) -> tuple[int, str] | None:
        """Checked before a peer connection is made; `streams.publish` checks again once connected."""
        if self.streams.config.publish.on_conflict == "refuse":
            pending = self.reserved.get(name)
            if pending is not None:
                return 409, f"stream {name} is already being published by {pending.client} (connecting)"
            live = self.streams.live.get(name)
            if live is not None:
                return 409, f"stream {name} is already being published by {live.publisher.client}"
        taken = len(self.streams.live) + len(self.reserved)
        if name not in self.streams.live and name not in self.reserved and taken >= self.limits.max_streams:
            return 503, f"the server's limit of {self.limits.max_streams} live streams is reached"
        return None

    async def close(self, reason: str) -> None:
        if self._timer is not None:
            self._timer.cancel()
        publishes = list(self.resources.values())
        await asyncio.gather(*(p.finish(reason) for p in publishes), return_exceptions=True)
        await asyncio.gather(*(p.pc.close() for p in publishes), *self.closing, return_exceptions=True)
        for mux in self.muxes:
            mux.close()

    # -- HTTP ----------------------------------------------------------------

    async def options(self, request: web.Request) -> web.Response:
        return web.Response(status=204, headers={**CORS, "Accept-Post": "application/sdp"})

    async def not_allowed(self, request: web.Request) -> web.Response:
        return _error(405, f"{request.method} is not allowed here; publish with POST and an SDP offer", Allow="POST, OPTIONS")

    async def patch(self, request: web.Request) -> web.Response:
        if request.match_info["resource"] not in self.resources:
            return _error(404, "no such WHIP resource")
        return _error(
            405,
            "trickle ICE and ICE restarts are not supported: the answer already carries every candidate",
            Allow="DELETE, OPTIONS",
        )

    async def delete(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        publish = self.resources.get(request.match_info["resource"])
        if publish is None and name in self.streams.foreign and self.forward_delete is not None:
            # Published through the previous worker, which keeps it until it ends: it ends it.
            status, text = await self.forward_delete(name, request.match_info["resource"], _bearer(request))
            return web.Response(status=status, text=text, headers=CORS)
        if publish is None or publish.name != name:
            return _error(404, f"no WHIP resource {request.match_info['resource']!r} for stream {name!r}")
        if self.auth.config.keys:
            try:
                self.auth.check_key(name, _bearer(request))
            except PublishDenied as exc:
                return _error(401, str(exc), **{"WWW-Authenticate": "Bearer"})
        await publish.finish("publisher sent DELETE")
        return web.Response(status=200, headers=CORS)

    async def delete_for_another_worker(self, name: str, resource: str, token: str) -> tuple[int, str]:
        publish = self.resources.get(resource)
        if publish is None or publish.name != name:
            return 404, f"no WHIP resource {resource!r} for stream {name!r}\n"
        if self.auth.config.keys:
            try:
                self.auth.check_key(name, token)
            except PublishDenied as exc:
                return 401, f"{exc}\n"
        await publish.finish("publisher sent DELETE")
        return 200, ""

    async def post(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        client = request.remote or "?"
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type != "application/sdp":
            return _error(415, f"Content-Type must be application/sdp, not {content_type or 'missing'!r}")
        if not NAME_PATTERN.fullmatch(name):
            return _error(400, f"invalid stream name {name!r}")
        if self.config.udp_port and not self.muxes:
            return _error(
                503, "the WebRTC UDP port is still held by the previous worker for its publishers; "
                "retry in a few seconds", **{"Retry-After": "5"},
            )
        if (request.content_length or 0) > whip_sdp.MAX_OFFER_BYTES:
            reason = f"SDP offer of {request.content_length} bytes is larger than {whip_sdp.MAX_OFFER_BYTES}"
            event(log, logging.WARNING, "WHIP offer refused", stream=name, client=client, reason=reason)
            return _error(413, reason)
        try:
            # A chunked body has no length to check first: aiohttp's client_max_size bounds it, inspect_offer the rest.
            offer = (await request.read()).decode("utf-8")
        except UnicodeDecodeError:
            return _error(400, "the SDP offer is not UTF-8")
        try:
            summary = whip_sdp.inspect_offer(offer, self.config.vp8_transcode)
        except ProtocolError as exc:
            event(log, logging.WARNING, "WHIP offer refused", stream=name, client=client, reason=str(exc))
            return _error(400, str(exc))
        key = _bearer(request)
        try:
            self.auth.check_key(name, key)
        except PublishDenied as exc:
            event(log, logging.WARNING, "WHIP publish denied", stream=name, client=client, reason=str(exc))
            return _error(401, str(exc), **{"WWW-Authenticate": "Bearer"})
        if self.auth.config.webhook:
            try:
                await self.auth.authorize("webrtc", name, key, client)
            except PublishDenied as exc:
                event(log, logging.WARNING, "WHIP publish denied", stream=name, client=client, reason=str(exc))
                return _error(403, str(exc))
        refusal = self._over_limit(client) or self._conflict(name)
        if refusal is not None:
            event(log, logging.WARNING, "WHIP publish refused", stream=name, client=client, reason=refusal[1])
            return _error(*refusal)
        self.starting[client] = self.starting.get(client, 0) + 1
        try:
            return await self._start(name, client, offer, summary)
        finally:
            self.starting[client] -= 1
            if not self.starting[client]:
                del self.starting[client]

    def _over_limit(self, client: str) -> tuple[int, str] | None:
        """Checked before a peer connection is made: each costs sockets and two receive threads."""
        total = len(self.resources) + sum(self.starting.values())
        if total >= self.limits.max_connections:
            return 503, f"server is at its limit of {self.limits.max_connections} WHIP connections"
        mine = sum(1 for p in self.resources.values() if p.client == client) + self.starting.get(client, 0)
        if mine >= self.limits.max_connections_per_client:
            return 429, f"{client} already has {mine} WHIP connections (limit {self.limits.max_connections_per_client})"
        return None

    async def _start(self, name: str, client: str, offer: str, summary: whip_sdp.OfferSummary) -> web.Response:
        resource = secrets.token_urlsafe(18)
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        publish = WhipPublish(self, name, resource, client, pc)
        publish.video_mode = summary.video_mode(self.config.vp8_transcode)
        try:
            self._add_transceivers(pc, summary, publish.video_mode)
            self._confine_checks(publish)
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
        except Exception as exc:
            await pc.close()
            event(log, logging.WARNING, "WHIP offer refused", stream=name, client=client, reason=str(exc))
            return _error(400, f"the SDP offer cannot be used: {exc}")
        dtls = "openssl"
        if dtls_compat.needs_gnutls(offer):
            # FFmpeg's DTLS certificate is on P-224, which aiortc's OpenSSL 4
            # refuses: its handshake is done with GnuTLS (transport/dtls_compat.py).
            if dtls_compat.available():
                dtls_compat.use_gnutls(pc)
                dtls = "gnutls"
            else:
                event(log, logging.WARNING, "no GnuTLS: FFmpeg's DTLS handshake will fail", stream=name, client=client)
        if self.muxes:
            for connection in ice_connections(pc):
                ice_mux.attach(connection, self.muxes)
        elif self.config.host_addresses or self.config.port_min:
            for connection in ice_connections(pc):
                restrict_gathering(connection, self.config.host_addresses, self.config.port_min, self.config.port_max)
        try:
            answer = await pc.createAnswer()
            await pc.setLocalDescription(answer)
        except NoFreePort as exc:
            await pc.close()
            event(log, logging.ERROR, "WHIP publish refused", stream=name, client=client, reason=str(exc))
            return _error(503, str(exc))
        except Exception as exc:
            await pc.close()
            event(log, logging.WARNING, "WHIP offer refused", stream=name, client=client, reason=str(exc))
            return _error(400, f"no answer can be made to this offer: {exc}")
        kinds: dict[str, int] = {}
        for transceiver in pc.getTransceivers():
            if transceiver.receiver.track is None or transceiver.currentDirection in ("inactive", "sendonly"):
                continue
            kind = transceiver.kind
            if kind in publish.receivers:
                continue  # one track of each kind is ingested
            publish.receivers[kind] = transceiver.receiver
            if kind == "audio":
                # aiortc's own holds all audio behind a lost packet and multiplies losses (audio_jitter.py).
                transceiver.receiver._RTCRtpReceiver__jitter_buffer = AudioJitterBuffer()  # type: ignore[attr-defined]
            kinds[kind] = 90000 if kind == "video" else 48000
        if not kinds:
            await pc.close()
            return _error(400, "the offer has no track this server can receive")
        # Checked again: another POST for the name may have been answered while this one awaited aiortc.
        refusal = self._conflict(name)
        if refusal is not None:
            await pc.close()
            event(log, logging.WARNING, "WHIP publish refused", stream=name, client=client, reason=refusal[1])
            return _error(*refusal)
        previous = self.reserved.get(name)
        if previous is not None:  # on_conflict = "replace": the newer offer wins
            previous.end(f"replaced by a new offer from {client} before it connected", logging.WARNING)
        publish.clock = StreamClock(kinds, self.config.sync_wait)
        self.resources[resource] = publish
        self.reserved[name] = publish
        pc.on("connectionstatechange", publish.on_connection_state)
        for kind, receiver in publish.receivers.items():
            self._hook_sender_reports(publish, kind, receiver)
            task = asyncio.get_running_loop().create_task(publish.consume(kind, receiver))
            publish.consumers.append(task)
        publish.dtls = dtls
        event(log, logging.INFO, "WHIP offer answered", stream=name, client=client, resource=resource)
        location = f"/live/{name}/whip/{resource}"
        return web.Response(
            status=201,
            text=whip_sdp.advertise_hosts(pc.localDescription.sdp, self.config.advertise_hosts),
            headers={**CORS, "Content-Type": "application/sdp", "Location": location, "ETag": f'"{resource}"'},
        )

    def _confine_checks(self, publish: WhipPublish) -> None:
        """ICE checks only towards the POST's address or `webrtc.ice_remote_networks`; before any candidate is added."""
        allow = remote_address_filter(publish.client, self.config.ice_remote_networks)

        ignored_count = 0

        def ignored(host: str) -> None:
            nonlocal ignored_count
            ignored_count += 1
            if ignored_count == 1:  # once per offer: an offer may name many
                event(
                    log, logging.INFO, "WHIP remote candidate ignored",
                    stream=publish.name, client=publish.client, address=host,
                    reason="not the offer's address nor in webrtc.ice_remote_networks",
                )

        for connection in ice_connections(publish.pc):
            confine_remote_candidates(connection, allow, ignored)

    def _add_transceivers(self, pc: RTCPeerConnection, summary: whip_sdp.OfferSummary, video_mode: str | None) -> None:
        """recvonly transceivers whose codec preferences make aiortc answer H.264 (else VP8) and Opus."""
        for section in summary.media:
            if section.kind == "video":
                transceiver = pc.addTransceiver("video", direction="recvonly")
                wanted = ["video/h264"] if video_mode == whip_sdp.VIDEO_PASSTHROUGH else ["video/vp8"]
                codecs = RTCRtpReceiver.getCapabilities("video").codecs
                transceiver.setCodecPreferences(
                    [c for c in codecs if c.mimeType.lower() in wanted]
                    + [c for c in codecs if c.mimeType.lower() == "video/rtx"]
                )
            elif section.kind == "audio":
                transceiver = pc.addTransceiver("audio", direction="recvonly")
                codecs = RTCRtpReceiver.getCapabilities("audio").codecs
                transceiver.setCodecPreferences([c for c in codecs if c.mimeType.lower() == "audio/opus"])

    @staticmethod
    def _hook_sender_reports(publish: WhipPublish, kind: str, receiver: RTCRtpReceiver) -> None:
        handle = receiver._handle_rtcp_packet

        async def handle_rtcp(packet: Any) -> None:
            if isinstance(packet, RtcpSrPacket):
                publish.on_sender_report(kind, packet)
            await handle(packet)

        receiver._handle_rtcp_packet = handle_rtcp  # type: ignore[method-assign]

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "name": p.name,
                "client": p.client,
                "state": p.pc.connectionState,
                "video": p.video_mode,
                "frames": dict(p.frames_in),
                "plis_sent": p.plis_sent,
                "held": len(p.held),
            }
            for p in self.resources.values()
        ]


def _bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _ignore_backpressure(pause: bool) -> None:
    """UDP cannot be paused: the session's mailbox holds what comes meanwhile."""
