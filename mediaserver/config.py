"""Typed configuration: TOML decoded by msgspec, with embedded defaults.

Every section and key has a default, so `mediaserver serve` runs with no file.
An unknown key or a wrong type is a `ConfigError` that names the key.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

import msgspec

from .tomlfile import read_toml


class ConfigError(Exception):
    """The config file cannot be used; the message names the offending key."""


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class RtmpConfig(_Section):
    host: str = "0.0.0.0"
    port: int = 1935
    handshake_timeout: float = 10.0
    """Seconds a client may take from TCP accept to a finished handshake."""
    idle_timeout: float = 30.0
    """Seconds without any byte from a client before it is dropped."""
    max_message_size: int = 8 * 1024 * 1024
    """Largest RTMP message accepted; a bigger announced length closes the connection."""
    out_chunk_size: int = 4096
    mailbox_limit: int = 512
    """Messages queued for a suspended or busy session before reading pauses."""


class HttpConfig(_Section):
    host: str = "0.0.0.0"
    port: int = 8080
    header_timeout: float = 10.0
    """Seconds a client has to send a whole request header, from the connection
    (or its first byte after a response); then it is closed (nginx's
    client_header_timeout)."""
    keepalive_timeout: float = 15.0
    """Seconds an idle keep-alive connection stays open after a response."""
    max_connections: int = 1000
    """Open HTTP connections in total; more are answered 503 and closed."""
    max_connections_per_client: int = 64
    """Open HTTP connections from one client address; more get 429 and are closed."""


class AdminConfig(_Section):
    host: str = "127.0.0.1"
    port: int = 8081
    token: str = ""


class WebRtcConfig(_Section):
    """WHIP ingest (`POST /live/NAME/whip` on the HTTP listener)."""

    enabled: bool = True
    host_addresses: list[str] = []
    """Addresses the peer connections gather host candidates on; empty: every
    non-loopback address of the machine (aioice's default)."""
    port_min: int = 0
    port_max: int = 0
    """UDP port range for peer connections (one port each); 0/0: ephemeral ports."""
    udp_port: int = 0
    """One UDP port shared by every peer connection (MediaMTX's and Pion's
    single-port mode; routed by ICE ufrag, then by address); 0: a port per
    connection, from port_min..port_max or ephemeral."""
    advertise_hosts: list[str] = []
    """Extra addresses put in the SDP answer beside each host candidate, same
    port: the public address of a server behind a 1:1 NAT or port forwarding."""
    media_timeout: float = 10.0
    """Seconds without any media before a WHIP publish is ended (EXT-X-ENDLIST)."""
    connect_timeout: float = 5.0
    """Seconds an answered offer has to complete ICE and DTLS; then it is ended
    and its UDP ports freed. Nothing of the stream exists before that."""
    ice_remote_networks: list[str] = []
    """Networks (CIDR or addresses) the server may send ICE checks to beside
    the address the offer was POSTed from; candidates elsewhere are ignored,
    so an offer cannot aim the server's STUN checks at a third party."""

    def __post_init__(self) -> None:
        if not self.connect_timeout > 0:
            raise ValueError(f"webrtc.connect_timeout must be > 0 seconds, not {self.connect_timeout!r}")
        for network in self.ice_remote_networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError as exc:
                raise ValueError(f"webrtc.ice_remote_networks: {network!r} is not an address or network: {exc}") from None
    sync_wait: float = 3.0
    """Seconds media is held at the start for the RTCP sender reports that line
    audio and video up; without them, arrival times are used."""
    keyframe_interval: float = 0.0
    """Seconds between keyframe requests (PLI) when the publisher sends none by
    itself; 0: the HLS segment target."""
    aac_bitrate: int = 128000
    vp8_transcode: bool = True
    """Take VP8 (transcoded to H.264) from a publisher that offers no H.264."""
    vp8_max_width: int = 1280
    vp8_max_height: int = 720
    vp8_max_fps: float = 30.0
    vp8_preset: str = "veryfast"
    vp8_bitrate: int = 2500000


class HlsConfig(_Section):
    segment_target: float = 2.0
    """Seconds; a segment is cut on the first keyframe at or after this duration."""
    playlist_size: int = 6
    """Segments listed in the live playlist; older ones are deleted from disk."""
    timestamp_jump: float = 10.0
    """A publisher timestamp step larger than this (or backwards by more than 1 s)
    is a jump: the segment is cut there and marked EXT-X-DISCONTINUITY."""


class StreamKey(_Section):
    name: str
    """A stream name or a shell-style pattern (`studio-*`)."""
    key: str


class PreviewsConfig(_Section):
    thumbnail_interval: float = 5.0
    """Seconds between thumbnails (from the next keyframe); 0 turns them off."""
    thumbnail_width: int = 320
    levels_interval: float = 2.0
    """Seconds between audio-level measurements; 0 turns them off."""
    levels_window: float = 0.5
    """Seconds of audio each measurement decodes."""
    workers: int = 2
    """Threads decoding thumbnails and audio, off the event loop."""


class PublishConfig(_Section):
    on_conflict: Literal["refuse", "replace"] = "refuse"
    """What a second publisher on a live name gets: refused (nginx-rtmp's default),
    or it replaces the first one (MediaMTX's behaviour)."""
    keys: list[StreamKey] = []
    """When any key is configured, every publish needs the key of a rule matching
    its name: `?key=` in RTMP, the bearer token in WHIP."""
    webhook: str = ""
    """URL POSTed a JSON body before each publish; only a 2xx answer lets it start."""
    webhook_timeout: float = 3.0
    unpublish_webhook: str = ""
    """URL POSTed when a publish ends (like nginx-rtmp's on_publish_done)."""


class LimitsConfig(_Section):
    max_connections: int = 1000
    """Open RTMP connections in total; more are closed at once with a logged
    reason. WHIP peer connections are counted on their own against the same
    figure (a POST beyond it gets 503)."""
    max_connections_per_client: int = 20
    """Open RTMP connections from one client address; WHIP peer connections
    likewise, on their own (a POST beyond it gets 429)."""
    max_streams: int = 500
    """Live streams; a publish beyond it is refused."""
    http_max_header_bytes: int = 8190
    """Longest HTTP request line or header field; longer ones get 400."""
    http_max_headers: int = 64


class SupervisorConfig(_Section):
    max_restarts: int = 5
    """A session whose handler raises more than this many times..."""
    restart_window: float = 10.0
    """...within this many seconds is stopped with a clear reason."""


class RelupConfig(_Section):
    directory: str = "relups"
    """Relup packages are loaded from here and nowhere else."""
    auto_revert_crashes: int = 3
    """Handler crashes on a new generation, within `auto_revert_window` seconds
    of its relup, that make the server revert it by itself."""
    auto_revert_window: float = 60.0


class Config(_Section):
    data_dir: str = "mediaserver-data"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    rtmp: RtmpConfig = msgspec.field(default_factory=RtmpConfig)
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)
    webrtc: WebRtcConfig = msgspec.field(default_factory=WebRtcConfig)
    admin: AdminConfig = msgspec.field(default_factory=AdminConfig)
    hls: HlsConfig = msgspec.field(default_factory=HlsConfig)
    publish: PublishConfig = msgspec.field(default_factory=PublishConfig)
    previews: PreviewsConfig = msgspec.field(default_factory=PreviewsConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    supervisor: SupervisorConfig = msgspec.field(default_factory=SupervisorConfig)
    relup: RelupConfig = msgspec.field(default_factory=RelupConfig)


def load_config(path: str | Path | None) -> Config:
    """Read `path` (TOML) into a `Config`; None gives the embedded defaults."""
    if path is None:
        return Config()
    config = read_toml(path, Config, ConfigError)
    _check_ranges(config, path)
    return config


def _check_ranges(config: Config, path: str | Path) -> None:
    checks = [
        ("rtmp.port", config.rtmp.port, 0 <= config.rtmp.port <= 65535),
        ("http.port", config.http.port, 0 <= config.http.port <= 65535),
        ("admin.port", config.admin.port, 0 <= config.admin.port <= 65535),
        ("hls.segment_target", config.hls.segment_target, config.hls.segment_target > 0),
        ("hls.playlist_size", config.hls.playlist_size, config.hls.playlist_size >= 1),
        ("hls.timestamp_jump", config.hls.timestamp_jump, config.hls.timestamp_jump > 0),
        ("rtmp.handshake_timeout", config.rtmp.handshake_timeout, config.rtmp.handshake_timeout > 0),
        ("rtmp.idle_timeout", config.rtmp.idle_timeout, config.rtmp.idle_timeout > 0),
        ("publish.webhook_timeout", config.publish.webhook_timeout, config.publish.webhook_timeout > 0),
        ("limits.max_connections", config.limits.max_connections, config.limits.max_connections >= 1),
        ("limits.max_connections_per_client", config.limits.max_connections_per_client, config.limits.max_connections_per_client >= 1),
        ("limits.max_streams", config.limits.max_streams, config.limits.max_streams >= 1),
        ("limits.http_max_header_bytes", config.limits.http_max_header_bytes, 256 <= config.limits.http_max_header_bytes <= 65536),
        ("limits.http_max_headers", config.limits.http_max_headers, 1 <= config.limits.http_max_headers <= 1000),
        ("previews.thumbnail_interval", config.previews.thumbnail_interval, config.previews.thumbnail_interval >= 0),
        ("previews.thumbnail_width", config.previews.thumbnail_width, 16 <= config.previews.thumbnail_width <= 1920),
        ("previews.levels_interval", config.previews.levels_interval, config.previews.levels_interval >= 0),
        ("previews.levels_window", config.previews.levels_window, 0.05 <= config.previews.levels_window <= 10),
        ("previews.workers", config.previews.workers, 1 <= config.previews.workers <= 16),
        ("supervisor.max_restarts", config.supervisor.max_restarts, config.supervisor.max_restarts >= 0),
        ("supervisor.restart_window", config.supervisor.restart_window, config.supervisor.restart_window > 0),
        ("relup.auto_revert_crashes", config.relup.auto_revert_crashes, config.relup.auto_revert_crashes >= 1),
        ("relup.auto_revert_window", config.relup.auto_revert_window, config.relup.auto_revert_window > 0),
        ("rtmp.mailbox_limit", config.rtmp.mailbox_limit, config.rtmp.mailbox_limit >= 1),
        ("webrtc.port_min", config.webrtc.port_min, 0 <= config.webrtc.port_min <= 65535),
        (
            "webrtc.port_max",
            config.webrtc.port_max,
            config.webrtc.port_max == config.webrtc.port_min == 0
            or 1 <= config.webrtc.port_min <= config.webrtc.port_max <= 65535,
        ),
        ("webrtc.udp_port", config.webrtc.udp_port, 0 <= config.webrtc.udp_port <= 65535),
        ("webrtc.media_timeout", config.webrtc.media_timeout, config.webrtc.media_timeout > 0),
        ("webrtc.sync_wait", config.webrtc.sync_wait, 0 <= config.webrtc.sync_wait <= 30),
        ("webrtc.keyframe_interval", config.webrtc.keyframe_interval, config.webrtc.keyframe_interval >= 0),
        ("webrtc.aac_bitrate", config.webrtc.aac_bitrate, 32000 <= config.webrtc.aac_bitrate <= 512000),
        ("webrtc.vp8_max_width", config.webrtc.vp8_max_width, 16 <= config.webrtc.vp8_max_width <= 7680),
        ("webrtc.vp8_max_height", config.webrtc.vp8_max_height, 16 <= config.webrtc.vp8_max_height <= 4320),
        ("webrtc.vp8_max_fps", config.webrtc.vp8_max_fps, 1 <= config.webrtc.vp8_max_fps <= 120),
        (
            "rtmp.max_message_size",
            config.rtmp.max_message_size,
            1024 <= config.rtmp.max_message_size <= 64 * 1024 * 1024,
        ),
        (
            "rtmp.out_chunk_size",
            config.rtmp.out_chunk_size,
            128 <= config.rtmp.out_chunk_size <= 65536,
        ),
    ]
    for key, value, ok in checks:
        if not ok:
            raise ConfigError(f"config file {path}: `{key}` = {value!r} is out of range")
    if config.webrtc.udp_port and config.webrtc.port_min:
        raise ConfigError(
            f"config file {path}: `webrtc.udp_port` (one shared port) and `webrtc.port_min`/`port_max` "
            "(a port per connection) cannot both be set"
        )
    for host in config.webrtc.advertise_hosts:
        # An SDP candidate needs a literal address; ipaddress takes ASCII digits
        # only (str.isdigit would let '²' through).
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(
                f"config file {path}: `webrtc.advertise_hosts` entry {host!r} is not an IPv4 or IPv6 address"
            ) from None
