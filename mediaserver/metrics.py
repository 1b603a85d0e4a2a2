"""Prometheus metrics, read from the runtime's own counters at scrape time.

Nothing is counted per packet for metrics' sake: the transport and the HLS
writer keep plain integer counters they need anyway, and a collector reads
them when /metrics is scraped. Rates (bitrate, fps) come from a 1 Hz sampler
over a 5 s window. Counters are owned by the runtime, not by logic, so a
relup that reshapes the session state cannot break the metrics.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .runtime.relup import CodeServer, RelupReport
from .runtime.streams import Streams

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
RATE_WINDOW = 5.0
RENDER_INTERVAL = 1.0
"""Seconds a rendered /metrics page is served from memory: whatever the scrape
rate, the collectors run at most once per interval on the event loop."""


class RateSampler:
    """Bitrate and fps per stream over the last few seconds, sampled at 1 Hz."""

    def __init__(self, streams: Streams) -> None:
        self.streams = streams
        self.samples: dict[str, deque[tuple[float, int, int]]] = {}

    def sample(self) -> None:
        now = time.monotonic()
        live = self.streams.live
        for name in list(self.samples):
            if name not in live:
                del self.samples[name]
        for name, stream in live.items():
            publisher = stream.publisher
            window = self.samples.setdefault(name, deque())
            window.append((now, getattr(publisher, "bytes_in", 0), getattr(publisher, "frames_in", {}).get("video", 0)))
            while len(window) > 2 and now - window[0][0] > RATE_WINDOW:
                window.popleft()

    def rates(self, name: str) -> tuple[float, float]:
        window = self.samples.get(name)
        if not window or len(window) < 2:
            return 0.0, 0.0
        (t0, b0, f0), (t1, b1, f1) = window[0], window[-1]
        span = t1 - t0
        if span <= 0:
            return 0.0, 0.0
        return (b1 - b0) * 8 / span, (f1 - f0) / span


class _Collector(Collector):
    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        m = self.metrics
        streams, code = m.streams, m.code_server
        labels = ["stream"]
        bytes_in = CounterMetricFamily("mediaserver_stream_received_bytes", "Bytes received from the publisher", labels=labels)
        frames_in = CounterMetricFamily("mediaserver_stream_frames_in", "Media frames received", labels=["stream", "track"])
        frames_out = CounterMetricFamily("mediaserver_stream_frames_out", "Media frames written to HLS segments", labels=["stream", "track"])
        segments = CounterMetricFamily("mediaserver_stream_segments", "HLS segments completed", labels=labels)
        bitrate = GaugeMetricFamily("mediaserver_stream_bitrate_bps", f"Received bitrate over the last {RATE_WINDOW:g} s", labels=labels)
        fps = GaugeMetricFamily("mediaserver_stream_fps", f"Video frames per second over the last {RATE_WINDOW:g} s", labels=labels)
        duration = GaugeMetricFamily("mediaserver_stream_publish_seconds", "Seconds since the publish started", labels=labels)
        now = time.monotonic()
        for name, writer in streams.writers.items():
            totals = dict(streams.received.get(name, {"bytes": 0, "video": 0, "audio": 0}))
            stream = streams.live.get(name)
            if stream is not None:
                totals["bytes"] += getattr(stream.publisher, "bytes_in", 0)
                for track, count in getattr(stream.publisher, "frames_in", {}).items():
                    totals[track] += count
            bytes_in.add_metric([name], totals["bytes"])
            for track in ("video", "audio"):
                frames_in.add_metric([name, track], totals[track])
                frames_out.add_metric([name, track], writer.frames_out[track])
            segments.add_metric([name], writer.segments_written)
            if stream is not None:
                bps, rate = m.rates.rates(name)
                bitrate.add_metric([name], bps)
                fps.add_metric([name], rate)
                duration.add_metric([name], now - stream.session.started)
        yield from (bytes_in, frames_in, frames_out, segments, bitrate, fps, duration)

        connections = GaugeMetricFamily("mediaserver_connections", "Open RTMP connections")
        connections.add_metric([], len(m.rtmp_connections()))
        yield connections
        sessions = GaugeMetricFamily("mediaserver_sessions", "Live sessions", labels=["version"])
        by_version: dict[str, int] = {}
        for session in streams.sessions():
            by_version[session.generation.version] = by_version.get(session.generation.version, 0) + 1
        for version, count in by_version.items():
            sessions.add_metric([version], count)
        yield sessions
        restarts = CounterMetricFamily("mediaserver_session_restarts", "Session restarts after a handler crash")
        restarts.add_metric([], streams.restarts_total)
        yield restarts
        quarantined = CounterMetricFamily("mediaserver_quarantined_messages", "Messages quarantined to dead letters")
        quarantined.add_metric([], streams.dead_letters.count)
        yield quarantined
        relups = CounterMetricFamily("mediaserver_relups", "Relup actions by outcome", labels=["action", "outcome"])
        for key, count in code.counts.items():
            action, outcome = key.split(":")
            relups.add_metric([action, outcome], count)
        yield relups


class HttpGuardCollector(Collector):
    """The HTTP listener's open connections, refusals and timeout closes (from `http_guard`)."""

    def __init__(self, listener: Any) -> None:
        self.listener = listener

    def collect(self) -> Iterator[Any]:
        g = self.listener
        open_ = GaugeMetricFamily("mediaserver_http_connections", "Open HTTP connections on the public listener")
        open_.add_metric([], g.open)
        yield open_
        refused = CounterMetricFamily(
            "mediaserver_http_connections_refused", "HTTP connections refused at a cap", labels=["cap"]
        )
        for cap, count in g.refused.items():
            refused.add_metric([cap], count)
        yield refused
        timed_out = CounterMetricFamily(
            "mediaserver_http_connections_timed_out", "HTTP connections closed by a timeout", labels=["timeout"]
        )
        for kind, count in g.closed_by_timeout.items():
            timed_out.add_metric([kind], count)
        yield timed_out


class ServerMetrics:
    def __init__(self, streams: Streams, code_server: CodeServer, rtmp_connections: Any) -> None:
        self.streams = streams
        self.code_server = code_server
        self.rtmp_connections = rtmp_connections
        self.registry = CollectorRegistry()
        self.rates = RateSampler(streams)
        self.loop_lag = Histogram(
            "mediaserver_event_loop_lag_seconds", "Lateness of a periodic timer on the event loop",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
        self.relup_stall = Histogram(
            "mediaserver_relup_switch_seconds", "How long a relup's synchronous switch held the event loop",
            buckets=(0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1),
            registry=self.registry,
        )
        self.registry.register(_Collector(self))
        code_server.report_listeners.append(self._on_report)
        self._task: asyncio.Task[None] | None = None
        self._page = b""
        self._rendered_at = float("-inf")
        self.renders = 0

    def watch_http(self, listener: Any) -> None:
        """Export a guarded HTTP listener's connection counts."""
        self.registry.register(HttpGuardCollector(listener))

    def _on_report(self, report: RelupReport) -> None:
        if report.ok and report.action != "dry_run":
            self.relup_stall.observe(report.switch_ms / 1000.0)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._tick())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        interval = 0.25
        ticks = 0
        while True:
            expected = loop.time() + interval
            await asyncio.sleep(interval)
            self.loop_lag.observe(max(loop.time() - expected, 0.0))
            ticks += 1
            if ticks % 4 == 0:
                self.rates.sample()

    def render(self) -> bytes:
        self.renders += 1
        return generate_latest(self.registry)

    def page(self, now: float | None = None) -> bytes:
        """The last rendered page, rendered again only when it is older than RENDER_INTERVAL."""
        now = time.monotonic() if now is None else now
        if now - self._rendered_at >= RENDER_INTERVAL:
            self._page = self.render()
            self._rendered_at = now
        return self._page
