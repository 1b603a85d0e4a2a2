"""The public HTTP listener under attack: cheap /metrics, slow and idle clients
closed, connection caps, planted symlinks/FIFOs/directories not followed, and a
player started with the broadcast waiting for the first playlist.

Every attack runs against a real `mediaserver serve` over real sockets.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import re
import socket
import subprocess
import threading
import time

import aiohttp
import pytest

import media
from media import AV, SMALL, assert_exact, ffmpeg_log, http_get, read_hls, wait_for_endlist, wait_for_playlist, wait_proc

HEADER_TIMEOUT = 1.0
KEEPALIVE_TIMEOUT = 1.5
SLACK = 1.0
"""Seconds beyond a timeout a close may take on a loaded 2-core machine."""


def _connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    return sock


def _closed_within(sock: socket.socket, timeout: float) -> tuple[bool, float, bytes]:
    """(closed by the server, seconds it took, bytes it sent before closing)."""
    start = time.monotonic()
    got = b""
    sock.settimeout(0.1)
    while time.monotonic() - start < timeout:
        try:
            data = sock.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            return True, time.monotonic() - start, got
        if not data:
            return True, time.monotonic() - start, got
        got += data
    return False, time.monotonic() - start, got


def _loop_lag_over(metrics_text: str, bound: str = "0.1") -> float:
    """How many event-loop lag samples were above `bound` seconds."""
    total = bucket = None
    for line in metrics_text.splitlines():
        if line.startswith("mediaserver_event_loop_lag_seconds_bucket"):
            value = float(line.rsplit(" ", 1)[1])
            if 'le="+Inf"' in line:
                total = value
            elif f'le="{bound}"' in line:
                bucket = value
    assert total is not None and bucket is not None, metrics_text[:2000]
    return total - bucket


def test_metrics_hammered_healthz_fast_stream_exact(server_factory, clips, ffmpeg_publisher):
    """100 concurrent /metrics clients for 8 s: /healthz p99 < 50 ms, no loop tick over 100 ms, stream bit-exact."""
    server = server_factory(http={"max_connections_per_client": 300})
    clip = clips.get(AV)
    name = "hammered"
    proc = ffmpeg_publisher(clip.path, server.rtmp_url(name))
    wait_for_playlist(server.hls_url(name), 10)
    lag_before = _loop_lag_over(http_get(server.http_url("/metrics")).body.decode())

    latencies: list[float] = []

    def probe(stop: float) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=5)
        try:
            while time.monotonic() < stop:
                t0 = time.monotonic()
                conn.request("GET", "/healthz")
                r = conn.getresponse()
                r.read()
                assert r.status == 200
                latencies.append(time.monotonic() - t0)
                time.sleep(0.02)
        finally:
            conn.close()

    async def attack() -> tuple[list[float], int, set[bytes]]:
        stop = time.monotonic() + 8.0
        served = 0
        bodies: set[bytes] = set()
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def scraper() -> None:
                nonlocal served
                while time.monotonic() < stop:
                    async with session.get(server.http_url("/metrics")) as r:
                        assert r.status == 200, r.status
                        body = await r.read()
                    served += 1
                    # The lag histogram's sum changes on every tick, so a new body is a new render.
                    bodies.add(body)

            # The prober runs in its own thread with a blocking socket: its figures are the
            # server's, not the delay of this process's loop busy with 100 scrapers.
            prober_thread = threading.Thread(target=probe, args=(stop,), daemon=True)
            prober_thread.start()
            await asyncio.gather(*(scraper() for _ in range(100)))
            prober_thread.join()
        return latencies, served, bodies

    latencies, served, bodies = asyncio.run(attack())
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    lag_after = _loop_lag_over(http_get(server.http_url("/metrics")).body.decode())
    print(f"/metrics served {served} in 8 s ({served / 8:.0f}/s), {len(bodies)} distinct renders; "
          f"/healthz n={len(latencies)} p50={latencies[len(latencies) // 2] * 1000:.1f} ms "
          f"p99={p99 * 1000:.1f} ms max={latencies[-1] * 1000:.1f} ms; loop ticks over 100 ms: {lag_after - lag_before:g}")
    assert served > 800, f"only {served} /metrics responses in 8 s"
    assert len(bodies) <= 8 + 2, f"{len(bodies)} distinct /metrics bodies in 8 s: rendered more than once a second"
    # Seen from outside, through the test's own 100 client coroutines on 2 shared
    # cores (29-52 ms here under -n 2); the server's loop-lag check below is the
    # tight one. Before the fix: p50 455 ms, max 16.6 s.
    assert p99 < 0.150, f"/healthz p99 {p99 * 1000:.1f} ms under the /metrics flood"
    assert lag_after - lag_before == 0, f"{lag_after - lag_before:g} event-loop ticks over 100 ms"
    rc = wait_proc(proc, 40)
    assert rc == 0, f"publisher failed ({rc}):\n{ffmpeg_log(proc)}"
    wait_for_endlist(server.hls_url(name), 10)
    assert_exact(clip, read_hls(server.hls_url(name)).segments, segment_target=2.0, label="stream beside /metrics flood")
    # status.json is cached the same way: two reads within the interval are the same body.
    a = http_get(server.http_url("/status.json")).body
    b = http_get(server.http_url("/status.json")).body
    assert a == b


@pytest.fixture
def strict_server(server_factory):
    return server_factory(
        http={
            "header_timeout": HEADER_TIMEOUT,
            "keepalive_timeout": KEEPALIVE_TIMEOUT,
            "max_connections": 40,
            "max_connections_per_client": 30,
        }
    )


def test_slowloris_and_idle_connections_closed_within_the_timeouts(strict_server):
    server = strict_server
    port = server.http_port
    slow = [_connect(port) for _ in range(10)]
    idle = [_connect(port) for _ in range(10)]
    stop = threading.Event()

    def drip() -> None:
        # One header byte every 0.3 s: never a whole header.
        for sock in slow:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        while not stop.wait(0.3):
            for sock in slow:
                try:
                    sock.sendall(b"X")
                except OSError:
                    pass

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        results = [_closed_within(sock, HEADER_TIMEOUT + SLACK + 2) for sock in slow + idle]
    finally:
        stop.set()
        dripper.join()
    for sock in slow + idle:
        sock.close()
    late = [(i, r[1]) for i, r in enumerate(results) if not r[0] or r[1] > HEADER_TIMEOUT + SLACK]
    assert not late, f"connections not closed within {HEADER_TIMEOUT}+{SLACK} s: {late}"

    # A keep-alive connection: served twice, then closed after keepalive_timeout idle, not before.
    sock = _connect(port)
    for _ in range(2):
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        response = b""
        while b"ok\n" not in response:
            chunk = sock.recv(4096)
            assert chunk, f"closed during a request: {response!r}"
            response += chunk
        assert response.startswith(b"HTTP/1.1 200"), response
        time.sleep(0.5)
    closed, took, _ = _closed_within(sock, KEEPALIVE_TIMEOUT + SLACK + 2)
    sock.close()
    took += 0.5  # the last sleep above was idle time too
    assert closed and KEEPALIVE_TIMEOUT - 0.3 <= took <= KEEPALIVE_TIMEOUT + SLACK, (
        f"idle keep-alive closed={closed} after {took:.2f} s (keepalive_timeout {KEEPALIVE_TIMEOUT})"
    )
    lines = server.log_lines(r"HTTP connection closed .*no complete request header")
    assert 1 <= len(lines) <= 20, f"{len(lines)} header-timeout lines for 20 connections:\n" + "\n".join(lines[:30])
    server.assert_no_tracebacks()
    assert http_get(server.http_url("/healthz")).status == 200


def test_connection_caps_total_and_per_address(strict_server):
    server = strict_server
    port = server.http_port
    held: list[socket.socket] = []
    try:
        held += [_connect(port, "127.0.0.1") for _ in range(30)]
        time.sleep(0.2)
        over = _connect(port, "127.0.0.1")
        closed, _, got = _closed_within(over, 3)
        over.close()
        assert closed and got.startswith(b"HTTP/1.1 429"), f"31st connection from one address: closed={closed} {got!r}"
        assert b"per client address" in got, got
        # Another address still gets in, up to the total of 40.
        held += [_connect(port, "127.0.0.2") for _ in range(10)]
        time.sleep(0.2)
        over = _connect(port, "127.0.0.3")
        closed, _, got = _closed_within(over, 3)
        over.close()
        assert closed and got.startswith(b"HTTP/1.1 503"), f"41st connection in all: closed={closed} {got!r}"
        # The held ones are real connections that aiohttp serves.
        held[-1].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        closed, _, got = _closed_within(held[-1], 3)
        assert got.startswith(b"HTTP/1.1 200"), got
    finally:
        for sock in held:
            sock.close()
    # Freed slots are counted back: a new client is served.
    deadline = time.monotonic() + 3
    while True:
        try:
            r = http_get(server.http_url("/healthz"), timeout=2)
            if r.status == 200:
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, "not served after the held connections closed"
        time.sleep(0.1)
    assert server.log_lines(r"HTTP connection refused .*reason=")
    time.sleep(1.1)  # /metrics is rendered at most once a second
    text = http_get(server.http_url("/metrics")).body.decode()
    assert 'mediaserver_http_connections_refused_total{cap="per_client"} 1.0' in text, text[-1500:]
    assert 'mediaserver_http_connections_refused_total{cap="total"} 1.0' in text, text[-1500:]
    server.assert_no_tracebacks()


def test_planted_links_fifos_and_directories_are_404(server_factory, tmp_path):
    server = server_factory()
    hls = server.data_dir / "hls"
    token_path = server.data_dir / "admin.token"
    assert token_path.exists(), list(server.data_dir.iterdir())
    token = token_path.read_bytes().strip()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "index.m3u8").write_text("#EXTM3U\n#OUTSIDE\n")
    (outside / "seg0.ts").write_bytes(b"G" * 188)
    planted = hls / "planted"
    planted.mkdir(parents=True)
    (planted / "index.m3u8").symlink_to("/etc/passwd")
    (planted / "seg1.ts").symlink_to(token_path)
    (planted / "seg2.ts").symlink_to(outside / "seg0.ts")
    os.mkfifo(planted / "seg3.ts")
    (planted / "seg4.ts").mkdir()
    (planted / "thumbnail.jpg").symlink_to(token_path)
    fifo = hls / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "index.m3u8")
    dirs = hls / "dirs"
    (dirs / "index.m3u8").mkdir(parents=True)
    (hls / "linked").symlink_to(outside)  # the stream directory itself a link
    paths = [
        "/live/planted/index.m3u8", "/live/planted/seg1.ts", "/live/planted/seg2.ts", "/live/planted/seg3.ts",
        "/live/planted/seg4.ts", "/live/planted/thumbnail.jpg", "/live/planted/status.json",
        "/live/fifo/index.m3u8", "/live/dirs/index.m3u8", "/live/linked/index.m3u8", "/live/linked/seg0.ts",
    ]
    for path in paths:
        t0 = time.monotonic()
        r = http_get(server.http_url(path), timeout=3)
        took = time.monotonic() - t0
        assert r.status == 404, f"{path}: {r.status} {r.body[:200]!r}"
        assert b"root:" not in r.body and token not in r.body and b"OUTSIDE" not in r.body, (path, r.body[:200])
        assert took < 1.0, f"{path} took {took:.2f} s"
    # The FIFOs were never opened: a writer opening them would not find a reader.
    for f in (planted / "seg3.ts", fifo / "index.m3u8"):
        try:
            fd = os.open(f, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            assert exc.errno == 6, exc  # ENXIO: no reader, as it should be
        else:
            os.close(fd)
            raise AssertionError(f"{f} has a reader: the server opened the FIFO")
    # The loop was never blocked: /healthz right away.
    t0 = time.monotonic()
    assert http_get(server.http_url("/healthz"), timeout=2).status == 200
    assert time.monotonic() - t0 < 0.5
    server.assert_no_tracebacks()


def test_player_started_with_the_broadcast_plays(server_factory, clips, ffmpeg_publisher, tmp_path):
    """`ffmpeg -i URL` started as soon as the publish starts (no segment yet) reads the stream."""
    server = server_factory()
    clip = clips.get(SMALL)
    name = "together"
    publisher = ffmpeg_publisher(clip.path, server.rtmp_url(name))
    server.wait_for_log(rf"publish started stream={name}\b", 10)
    assert not (server.hls_dir(name) / "index.m3u8").exists(), "the first segment was already there: no wait tested"
    log_path = tmp_path / "player.log"
    with open(log_path, "wb") as log:
        player = subprocess.Popen(
            [media.FFMPEG, "-hide_banner", "-nostdin", "-v", "error", "-i", server.hls_url(name),
             "-map", "0:v", "-f", "null", "-progress", "pipe:1", "-"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
        )
    try:
        out, _ = player.communicate(timeout=40)
    finally:
        if player.poll() is None:
            player.kill()
            player.wait()
    assert player.returncode == 0, f"player exit {player.returncode}: {log_path.read_text()}\n{server.log_tail()}"
    frames = [int(m) for m in re.findall(rb"^frame=(\d+)", out, re.M)]
    assert frames and frames[-1] > 0, out[-500:]
    assert wait_proc(publisher, 30) == 0, ffmpeg_log(publisher)
    print(f"player read {frames[-1]} video frames of {len(clip.video)}")


def test_unknown_stream_playlist_is_404_at_once(server):
    t0 = time.monotonic()
    assert http_get(server.hls_url("nobody"), timeout=3).status == 404
    assert time.monotonic() - t0 < 0.5


MALFORMED = [
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"GET / HTTP/9.9\r\n\r\n",
    b"GET /\x00 HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
    b"GET / HTTP/1.1\r\nX: " + b"a" * 10000 + b"\r\n\r\n",
]


def test_malformed_requests_logged_once_with_a_reason_no_traceback(server):
    for _ in range(3):
        for request in MALFORMED:
            with _connect(server.http_port) as sock:
                sock.sendall(request)
                closed, _, got = _closed_within(sock, 3)
                assert re.match(rb"HTTP/1\.[01] 400 ", got), (request[:60], got[:200])
    # A flood: the log keeps at most RATE_LIMIT lines a second, and says how many it dropped.
    for _ in range(200):
        with _connect(server.http_port) as sock:
            sock.sendall(MALFORMED[0])
            _closed_within(sock, 3)
    time.sleep(1.1)
    with _connect(server.http_port) as sock:
        sock.sendall(MALFORMED[1])
        _closed_within(sock, 3)
    lines = server.log_lines(r"bad HTTP request refused")
    print("\n".join(lines[:8]))
    assert lines and all("reason=" in line for line in lines), lines[:5]
    assert len(lines) < 100, f"{len(lines)} lines for 219 bad requests: not rate-limited"
    assert server.log_lines(r"bad HTTP request refused .*suppressed=\d+"), "no count of suppressed lines"
    assert not server.log_lines(r"ERROR aiohttp"), server.log_lines(r"ERROR aiohttp")[:3]
    server.assert_no_tracebacks()
    assert http_get(server.http_url("/healthz")).status == 200


def test_segment_byte_ranges(server_factory, tmp_path):
    server = server_factory()
    stream = server.data_dir / "hls" / "ranged"
    stream.mkdir(parents=True)
    data = bytes(range(256)) * 4
    (stream / "seg7.ts").write_bytes(data)
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=5)
    try:
        for header, status, want in (("bytes=0-99", 206, data[:100]), ("bytes=1000-", 206, data[1000:]),
                                     ("bytes=-24", 206, data[-24:]), (None, 200, data)):
            conn.request("GET", "/live/ranged/seg7.ts", headers={"Range": header} if header else {})
            r = conn.getresponse()
            body = r.read()
            assert (r.status, body) == (status, want), (header, r.status, len(body))
        conn.request("GET", "/live/ranged/seg7.ts", headers={"Range": "bytes=5000-"})
        r = conn.getresponse()
        r.read()
        assert r.status == 416 and r.getheader("Content-Range") == f"bytes */{len(data)}"
    finally:
        conn.close()
