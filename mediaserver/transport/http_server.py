"""The public HTTP listener: HLS playlists and segments, WHIP, status, /healthz.

Only names matching the stream-name pattern and the two file shapes the HLS
writer produces are served, so no request can reach a file outside a
stream's directory.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any, Callable

from aiohttp import web

from ..config import HttpConfig, LimitsConfig
from . import static_files
from .http_guard import GuardedListener
from .rtmp_server import NAME_PATTERN
from .safe_files import read_regular

SEGMENT_PATTERN = re.compile(r"seg[0-9]{1,20}\.ts")
PLAYLIST = "index.m3u8"
CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, HEAD, OPTIONS",
    "Access-Control-Allow-Headers": "Range, Origin, Accept",
    "Access-Control-Expose-Headers": "Content-Length, Content-Range",
}
STATUS_INTERVAL = 1.0
"""Seconds a status.json body is served from memory (it is rebuilt at most
once per interval per URL, whatever the request rate)."""
PLAYLIST_POLL = 0.05
"""Seconds between looks for the first playlist of a stream being published."""
PLAYLIST_WAIT_SEGMENTS = 3
"""A request for a live stream's playlist waits up to this many segment
targets for the first segment before it is 404."""


def _ranged(request: web.Request, body: bytes, headers: dict[str, str]) -> web.Response:
    """The whole body, or the one byte range asked for (players may probe segments with Range)."""
    headers = {**headers, "Accept-Ranges": "bytes"}
    try:
        wanted = request.http_range
    except ValueError:
        wanted = slice(None, None)
    if wanted.start is None and wanted.stop is None:
        return web.Response(body=body, headers=headers)
    size = len(body)
    start, stop, _ = wanted.indices(size)
    if start >= stop:
        raise web.HTTPRequestRangeNotSatisfiable(headers={**CORS, "Content-Range": f"bytes */{size}"})
    headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
    return web.Response(status=206, body=memoryview(body)[start:stop], headers=headers)


class TimedCache:
    """Bodies by key, each rebuilt when older than `interval` seconds."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.entries: dict[str, tuple[float, bytes]] = {}
        self.builds = 0

    def get(self, key: str, build: Callable[[], bytes]) -> bytes:
        now = time.monotonic()
        entry = self.entries.get(key)
        if entry is not None and now - entry[0] < self.interval:
            return entry[1]
        if len(self.entries) > 1024:
            # Keys are stream names a client chose: drop the stale ones, not all.
            self.entries = {k: v for k, v in self.entries.items() if now - v[0] < self.interval}
        body = build()
        self.builds += 1
        self.entries[key] = (now, body)
        return body


class HttpServer:
    def __init__(
        self,
        config: HttpConfig,
        hls_root: Path,
        metrics: Any = None,
        limits: LimitsConfig | None = None,
        streams: Any = None,
        whip: Any = None,
    ) -> None:
        self.config = config
        self.streams = streams
        self.limits = limits or LimitsConfig()
        self.hls_root = hls_root
        self.metrics = metrics
        self.status_cache = TimedCache(STATUS_INTERVAL)
        self.app = web.Application(client_max_size=64 * 1024)
        self.app.router.add_get("/healthz", self.healthz)
        self.app.router.add_get("/metrics", self.metrics_page)
        static_files.add_routes(self.app, admin=False)
        if whip is not None:
            # Before the catch-all /live/{name}/{file} routes below.
            whip.add_routes(self.app)
        self.app.router.add_get("/live/{name}/thumbnail.jpg", self.thumbnail)
        self.app.router.add_get("/live/{name}/status.json", self.stream_status)
        self.app.router.add_get("/status.json", self.all_status)
        self.app.router.add_get("/live/{name}/{file}", self.hls_file)
        self.app.router.add_route("OPTIONS", "/live/{name}/{file}", self.preflight)
        self.listener = GuardedListener(
            self.app,
            config.host,
            config.port,
            header_timeout=config.header_timeout,
            keepalive_timeout=config.keepalive_timeout,
            max_connections=config.max_connections,
            max_connections_per_client=config.max_connections_per_client,
            max_line_size=self.limits.http_max_header_bytes,
            max_field_size=self.limits.http_max_header_bytes,
            max_headers=self.limits.http_max_headers,
        )
        if metrics is not None:
            metrics.watch_http(self.listener)

    async def start(self, sockets: list[Any] | None = None, accept: bool = True) -> None:
        await self.listener.start(sockets, accept)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return self.listener.addresses

    async def close(self) -> None:
        await self.listener.close()

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n", headers={"Cache-Control": "no-cache"})

    def _stream_info(self, name: str) -> dict[str, Any] | None:
        streams = self.streams
        if streams is None or name not in streams.writers:
            return None
        live = streams.live.get(name)
        previews = streams.previews.get(name)
        rates = self.metrics.rates.rates(name) if self.metrics is not None and live else (0.0, 0.0)
        writer = streams.writers[name]
        return {
            "name": name,
            "live": live is not None,
            "protocol": live.publisher.protocol if live else None,
            "client": live.publisher.client if live else None,
            "uptime": round(time.monotonic() - live.session.started, 1) if live else 0.0,
            "bitrate_bps": round(rates[0]),
            "fps": round(rates[1], 2),
            "segments": writer.segments_written,
            "playlist": f"/live/{name}/index.m3u8",
            "thumbnail": f"/live/{name}/thumbnail.jpg" if previews and previews.has_thumbnail else None,
            "levels": previews.levels if previews else [],
            "levels_window_dts": list(previews.levels_window) if previews else None,
            "levels_age": round(time.time() - previews.levels_at, 1) if previews and previews.levels_at else None,
        }

    async def stream_status(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if not NAME_PATTERN.fullmatch(name):
            raise web.HTTPNotFound(text=f"unknown stream {name!r}\n", headers=CORS)
        body = self.status_cache.get(name, lambda: json.dumps(self._stream_info(name)).encode())
        if body == b"null":
            raise web.HTTPNotFound(text=f"unknown stream {name!r}\n", headers=CORS)
        return web.Response(body=body, content_type="application/json", headers={**CORS, "Cache-Control": "no-cache"})

    def _all_status(self) -> bytes:
        names = sorted(self.streams.live) if self.streams is not None else []
        return json.dumps({"streams": [self._stream_info(name) for name in names]}).encode()

    async def all_status(self, request: web.Request) -> web.Response:
        # "/" cannot be a stream name, so it keys the whole list in the same cache.
        body = self.status_cache.get("/", self._all_status)
        return web.Response(body=body, content_type="application/json", headers={**CORS, "Cache-Control": "no-cache"})

    async def thumbnail(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        previews = self.streams.previews.get(name) if self.streams is not None else None
        if previews is not None:
            await previews.current_thumbnail()
        if previews is None or previews.thumbnail is None:
            raise web.HTTPNotFound(text=f"no thumbnail for stream {name!r} yet\n", headers=CORS)
        return web.Response(
            body=previews.thumbnail,
            headers={
                **CORS,
                "Content-Type": "image/jpeg",
                "Cache-Control": "no-cache",
                "X-Frame-Dts": str(previews.thumbnail_dts),
            },
        )

    async def metrics_page(self, request: web.Request) -> web.Response:
        if self.metrics is None:
            raise web.HTTPNotFound(text="metrics are not enabled\n")
        return web.Response(
            body=self.metrics.page(),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8", "Cache-Control": "no-cache"},
        )

    async def preflight(self, request: web.Request) -> web.Response:
        return web.Response(status=204, headers=CORS)

    async def hls_file(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        file = request.match_info["file"]
        if not NAME_PATTERN.fullmatch(name):
            raise web.HTTPNotFound(text=f"unknown stream {name!r}\n", headers=CORS)
        directory = self.hls_root / name
        if file == PLAYLIST:
            body = read_regular(directory, file)
            if body is None:
                body = await self._first_playlist(name, directory)
            if body is None:
                raise web.HTTPNotFound(text=f"no playlist for stream {name!r}\n", headers=CORS)
            return web.Response(
                body=body,
                headers={
                    **CORS,
                    "Content-Type": "application/vnd.apple.mpegurl",
                    "Cache-Control": "no-cache, no-store",
                },
            )
        if SEGMENT_PATTERN.fullmatch(file):
            body = read_regular(directory, file)
            if body is None:
                raise web.HTTPNotFound(text=f"no segment {file!r} in stream {name!r}\n", headers=CORS)
            return _ranged(request, body, {**CORS, "Content-Type": "video/mp2t", "Cache-Control": "max-age=3600"})
        raise web.HTTPNotFound(text=f"no such file {file!r}\n", headers=CORS)

    async def _first_playlist(self, name: str, directory: Path) -> bytes | None:
        """A stream being published whose first segment is not complete yet: wait for its playlist.

        A player started together with the broadcast would otherwise fail at
        once. Bounded: PLAYLIST_WAIT_SEGMENTS segment targets, then None (404);
        it stops waiting as soon as the publish ends.
        """
        streams = self.streams
        if streams is None or name not in streams.live:
            return None
        deadline = time.monotonic() + PLAYLIST_WAIT_SEGMENTS * streams.config.hls.segment_target
        while time.monotonic() < deadline and name in streams.live:
            await asyncio.sleep(PLAYLIST_POLL)
            body = read_regular(directory, PLAYLIST)
            if body is not None:
                return body
        return None
