"""Ten publishers at once, while bad connections come and go beside them."""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import struct
import threading
import time

import pytest

import media
from media import SMALL, CorePublisher, assert_exact, ffmpeg_log, read_hls, wait_closed, wait_for_endlist, wait_proc

N_PUBLISHERS = 10


def _client_lines(server, port: int) -> list[str]:
    return server.log_lines(rf"127\.0\.0\.1:{port}\b")


def _assert_reason(server, port: int, pattern: str, what: str, timeout: float = 5.0) -> str:
    """A log line for this client connection gives a specific reason."""
    deadline = time.monotonic() + timeout
    while True:
        lines = _client_lines(server, port)
        hits = [l for l in lines if "reason=" in l and re.search(pattern, media.log_reason(l), re.I)]
        if hits or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert hits, (
        f"{what} (client port {port}): no log line with a reason matching /{pattern}/; "
        f"lines for this client:\n" + ("\n".join(lines) or "(none)") + f"\n--- log tail:\n{server.log_tail(60)}"
    )
    return hits[0]


def _garbage(port: int, result: dict) -> None:
    s = socket.create_connection(("127.0.0.1", port))
    result["port"] = s.getsockname()[1]
    try:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + os.urandom(3000))
    except OSError:
        pass
    result["closed"], result["after"] = wait_closed(s, 10)
    s.close()


def _stall_mid_handshake(port: int, result: dict) -> None:
    """C0 and half of C1, then silence: the server must time the handshake out."""
    s = socket.create_connection(("127.0.0.1", port))
    result["port"] = s.getsockname()[1]
    s.sendall(b"\x03" + os.urandom(700))
    result["closed"], result["after"] = wait_closed(s, 15)
    s.close()


def _close_mid_handshake(port: int, result: dict) -> None:
    """C0+C1, read S0/S1, then close without sending C2."""
    s = socket.create_connection(("127.0.0.1", port))
    result["port"] = s.getsockname()[1]
    s.sendall(b"\x03" + os.urandom(1536))
    media.recv_exactly(s, 1537)
    s.close()
    result["closed"] = True


def _vanish_mid_chunk(port: int, clip: media.Clip, result: dict) -> None:
    """Publish ~1.5 s with the client core, then send half of a video message and
    vanish (RST)."""
    pub = CorePublisher("127.0.0.1", port, result["name"])
    result["port"] = pub.local_port
    pub.open()
    bodies = media.flv_tag_bodies(clip)
    start = time.monotonic()
    counts = {"video": 0, "audio": 0}
    for kind, ts, body in bodies:
        if ts >= 1500:
            break
        delay = start + ts / 1000 - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        pub.send(kind, ts, body)
        if not body[1:2] == b"\x00":  # not a sequence header
            counts[kind] += 1
    big = max((b for k, t, b in bodies if k == "video" and t >= 1500), key=len)
    pub.conn.send_video(1600, big)
    data = pub.conn.data_to_send()
    pub.sock.sendall(data[: len(data) // 2])
    time.sleep(0.2)
    pub.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    pub.sock.close()
    result["sent"] = counts
    result["closed"] = True


@pytest.mark.timeout(180)
def test_ten_publishers_and_bad_connections(server_factory, clips, ffmpeg_publisher):
    server = server_factory(rtmp={"handshake_timeout": 2.0})
    specs = [dataclasses.replace(SMALL, tone=300 + 60 * i) for i in range(N_PUBLISHERS)]
    streams = [(f"multi{i}", clips.get(spec)) for i, spec in enumerate(specs)]
    procs = [ffmpeg_publisher(clip.path, server.rtmp_url(name)) for name, clip in streams]
    time.sleep(1.0)  # the publishers are up; now the bad ones arrive

    bad = {
        "garbage": ({}, _garbage, ()),
        "stall": ({}, _stall_mid_handshake, ()),
        "close-in-handshake": ({}, _close_mid_handshake, ()),
        "vanish": ({"name": "vanisher"}, _vanish_mid_chunk, (clips.get(SMALL),)),
    }
    errors: dict[str, BaseException] = {}

    def run(key, fn, result, extra):
        try:
            fn(server.rtmp_port, *extra, result) if extra else fn(server.rtmp_port, result)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors[key] = exc

    threads = [
        threading.Thread(target=run, args=(k, fn, res, extra), daemon=True)
        for k, (res, fn, extra) in bad.items()
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, f"bad clients failed in an unexpected way: {errors!r}"

    failures: list[str] = []

    def collect(fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AssertionError as exc:
            failures.append(str(exc))
            return None

    for (name, clip), proc in zip(streams, procs):
        rc = wait_proc(proc, 40, f"publisher {name}")
        assert rc == 0, f"publisher {name} failed ({rc}):\n{ffmpeg_log(proc)}\n{server.log_tail()}"
    exact = 0
    for name, clip in streams:
        wait_for_endlist(server.hls_url(name), 10)
        out = read_hls(server.hls_url(name))
        if collect(assert_exact, clip, out.segments, segment_target=2.0, label=f"publisher {name}"):
            exact += 1

    # The bad connections: each one closed, each with a specific reason in the log.
    if not bad["garbage"][0]["closed"]:
        failures.append("garbage connection was never closed")
    if not bad["stall"][0]["closed"]:
        failures.append("stalled handshake was never closed")
    elif bad["stall"][0]["after"] >= 2.0 + 3.0:
        failures.append(
            f"stalled handshake closed after {bad['stall'][0]['after']:.1f}s, handshake_timeout is 2 s"
        )
    expectations = {
        "garbage": (r"version|handshake|protocol|invalid|garbage", "garbage instead of a handshake"),
        "stall": (r"time ?out|timed out|within|deadline|too slow", "stalled handshake"),
        # (strict wording for a truncated handshake is test_bad_input_live's job)
        "close-in-handshake": (r"handshake|incomplete|truncat|partial|reset|disconnect|lost", "closed during the handshake"),
        "vanish": (r"reset|lost|incomplete|mid|partial|broken|truncat", "vanished mid-chunk"),
    }
    reasons = {
        key: collect(_assert_reason, server, bad[key][0]["port"], pattern, what)
        for key, (pattern, what) in expectations.items()
    }
    print("reasons logged:\n" + "\n".join(f"{k}: {v}" for k, v in reasons.items()))

    # What the vanished publisher sent before vanishing is an exact prefix, and
    # its playlist was ended.
    text = wait_for_endlist(server.hls_url("vanisher"), 10)
    out = read_hls(server.hls_url("vanisher"))
    report = collect(
        assert_exact, clips.get(SMALL), out.segments, segment_target=2.0, prefix=True, label="vanished publisher"
    )
    sent = bad["vanish"][0]["sent"]
    if report and (report.video_frames, report.audio_frames) != (sent["video"], sent["audio"]):
        failures.append(
            f"the vanished publisher sent {sent} complete frames before vanishing; the output holds "
            f"{report.video_frames} video and {report.audio_frames} audio frames:\n{text}"
        )
    assert server.alive()
    server.assert_no_tracebacks()
    assert not failures, f"{exact}/{N_PUBLISHERS} publishers exact; problems:\n" + "\n\n".join(failures)
