"""Bad bytes on real sockets against a running server while a good stream publishes.

Each bad connection must be closed with a specific reason in the log, the good
stream's output must stay exact, and the server's memory must not jump.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import time

import pytest

import media
from media import (
    AV,
    assert_exact,
    connect_command,
    ffmpeg_log,
    read_hls,
    rtmp_chunks,
    rtmp_command,
    rtmp_handshake,
    wait_closed,
    wait_for_endlist,
    wait_for_playlist,
    wait_proc,
)

HANDSHAKE_TIMEOUT = 1.0
ROUNDS = 8
"""Every fast attack is repeated; memory is measured around all of them."""


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    return s


def _send_quietly(s: socket.socket, data: bytes) -> None:
    try:
        s.sendall(data)
    except OSError:
        pass  # the server may already have closed: that is fine


def _rst(s: socket.socket) -> None:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def garbage(port: int) -> tuple[int, socket.socket]:
    s = _connect(port)
    _send_quietly(s, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(1600))  # a TLS hello
    return s.getsockname()[1], s


def truncated_handshake(port: int) -> tuple[int, socket.socket]:
    """C0 and 1000 of C1's 1536 bytes, then the client half-closes."""
    s = _connect(port)
    _send_quietly(s, b"\x03" + os.urandom(1000))
    s.shutdown(socket.SHUT_WR)
    return s.getsockname()[1], s


def chunk_size_zero(port: int) -> tuple[int, socket.socket]:
    s = _connect(port)
    rtmp_handshake(s)
    _send_quietly(s, rtmp_chunks(2, 0, 1, 0, struct.pack(">I", 0)))
    return s.getsockname()[1], s


def huge_message(port: int) -> tuple[int, socket.socket]:
    """A video message header announcing 16 MiB - 1 (max 24-bit length), then data."""
    s = _connect(port)
    rtmp_handshake(s)
    _send_quietly(s, connect_command("live", f"rtmp://127.0.0.1:{port}/live"))
    header = bytes([0x06]) + (0).to_bytes(3, "big") + (0xFFFFFF).to_bytes(3, "big") + bytes([9])
    header += (1).to_bytes(4, "little")
    body = os.urandom(128)
    _send_quietly(s, header + body + b"".join(bytes([0xC6]) + body for _ in range(2000)))
    return s.getsockname()[1], s


def amf_garbage(port: int) -> tuple[int, socket.socket]:
    s = _connect(port)
    rtmp_handshake(s)
    # A command message whose body is not AMF0: an unknown type marker, then noise.
    _send_quietly(s, rtmp_chunks(3, 0, 20, 0, b"\x02\x00\x07connect\x00\x3f\xf0\x00\x00\x00\x00\x00\x00\x42" + os.urandom(60)))
    return s.getsockname()[1], s


def amf_truncated(port: int) -> tuple[int, socket.socket]:
    s = _connect(port)
    rtmp_handshake(s)
    # A string that announces 60000 bytes but carries 5.
    _send_quietly(s, rtmp_chunks(3, 0, 20, 0, b"\x02\xea\x60conne"))
    return s.getsockname()[1], s


def publish_before_connect(port: int) -> tuple[int, socket.socket]:
    s = _connect(port)
    rtmp_handshake(s)
    _send_quietly(s, rtmp_command("createStream", 2, None))
    _send_quietly(s, rtmp_command("publish", 3, None, "sneaky", "live", stream_id=1, csid=8))
    return s.getsockname()[1], s


def vanish_mid_chunk(port: int) -> tuple[int, socket.socket]:
    s = _connect(port)
    rtmp_handshake(s)
    msg = rtmp_chunks(3, 0, 20, 0, media.amf0("connect", 1, {"app": "live", "tcUrl": "rtmp://x/live", "pad": "x" * 600}))
    _send_quietly(s, msg[: len(msg) // 2])
    time.sleep(0.05)
    port_ = s.getsockname()[1]
    _rst(s)
    return port_, s


def slow_handshake(port: int) -> tuple[int, socket.socket, float]:
    """C0+C1 one byte every 50 ms: never done within handshake_timeout."""
    s = _connect(port)
    local = s.getsockname()[1]
    start = time.monotonic()
    data = b"\x03" + os.urandom(1536)
    try:
        for i in range(len(data)):
            s.sendall(data[i : i + 1])
            time.sleep(0.05)
            if time.monotonic() - start > HANDSHAKE_TIMEOUT + 5:
                break
    except OSError:
        pass
    return local, s, time.monotonic() - start


def _connected(port: int) -> socket.socket:
    """Past `connect`: its answer has arrived, so the server's size limit is the full one."""
    s = _connect(port)
    rtmp_handshake(s)
    _send_quietly(s, connect_command("live", f"rtmp://127.0.0.1:{port}/live"))
    received = b""
    while b"NetConnection.Connect.Success" not in received:
        chunk = s.recv(65536)
        assert chunk, "the server closed the connection instead of answering connect"
        received += chunk
    return s


def _type0(csid: int, length: int, type_id: int = 9) -> bytes:
    return bytes([csid]) + (0).to_bytes(3, "big") + length.to_bytes(3, "big") + bytes([type_id]) + (1).to_bytes(4, "little")


def announced_lengths(port: int) -> tuple[int, socket.socket]:
    """Before connect, chunk streams announcing 8 MiB each (133 bytes used to hold 72 MiB)."""
    s = _connect(port)
    rtmp_handshake(s)
    _send_quietly(s, b"".join(_type0(csid, 8 * 1024 * 1024 - 1) + b"x" * 10 for csid in range(4, 13)))
    return s.getsockname()[1], s


def many_chunk_streams(port: int) -> tuple[int, socket.socket]:
    """After connect, every chunk stream id there is, each with a small message."""
    s = _connected(port)
    _send_quietly(s, b"".join(bytes([0, i]) + _type0(0, 10, 8)[1:] + b"x" * 10 for i in range(256)))
    return s.getsockname()[1], s


def zero_length_flood(port: int) -> tuple[int, socket.socket]:
    """One zero-length message header, then 256 KiB of one-byte zero-length messages."""
    s = _connected(port)
    _send_quietly(s, _type0(4, 0, 8) + b"\xc4" * 262_144)
    return s.getsockname()[1], s


def amf0_values_flood(port: int) -> tuple[int, socket.socket]:
    """A data message of a million AMF0 NULLs after connect."""
    s = _connected(port)
    # The client's chunk size stays 128: the message goes in 128-byte chunks.
    _send_quietly(s, rtmp_chunks(4, 0, 18, 1, media.amf0("@setDataFrame", "onMetaData") + b"\x05" * 1_000_000))
    return s.getsockname()[1], s


def delete_stream_nan(port: int) -> tuple[int, socket.socket]:
    s = _connected(port)
    _send_quietly(s, rtmp_command("deleteStream", 0, None, float("nan")))
    return s.getsockname()[1], s


ATTACKS = {
    # name: (function, /reason pattern/)
    "garbage instead of a handshake": (garbage, r"version|handshake|protocol|invalid|unsupported"),
    "truncated handshake": (truncated_handshake, r"handshake|incomplete|truncat|partial"),
    "Set Chunk Size 0": (chunk_size_zero, r"chunk.?size"),
    "message header announcing 16 MiB": (huge_message, r"size|large|length|too big|exceed|max"),
    "AMF0 garbage": (amf_garbage, r"amf|decode|malformed|invalid|command|marker|type"),
    "AMF0 truncated": (amf_truncated, r"amf|decode|malformed|invalid|truncat|short|end"),
    "publish before connect": (publish_before_connect, r"connect"),
    "vanished mid-chunk": (vanish_mid_chunk, r"reset|lost|mid|incomplete|partial|broken|truncat"),
    "8 MiB announced before connect": (announced_lengths, r"exceeds the limit of 8192"),
    "256 chunk streams": (many_chunk_streams, r"chunk stream .*\(limit 32\)"),
    "zero-length message flood": (zero_length_flood, r"zero-length messages"),
    "a million AMF0 values": (amf0_values_flood, r"more than 10000 values"),
    "deleteStream NaN": (delete_stream_nan, r"stream id nan is not a whole number"),
}


def _reason_lines(server, port: int, pattern: str, timeout: float = 5.0) -> tuple[list[str], list[str]]:
    deadline = time.monotonic() + timeout
    while True:
        lines = server.log_lines(rf"127\.0\.0\.1:{port}\b")
        hits = [l for l in lines if "reason=" in l and re.search(pattern, media.log_reason(l), re.I)]
        if hits or time.monotonic() > deadline:
            return hits, lines
        time.sleep(0.05)


@pytest.mark.timeout(150)
def test_bad_connections_beside_a_live_stream(server_factory, clips, ffmpeg_publisher):
    server = server_factory(rtmp={"handshake_timeout": HANDSHAKE_TIMEOUT})
    clip = clips.get(AV)
    name = "steady"
    proc = ffmpeg_publisher(clip.path, server.rtmp_url(name))
    wait_for_playlist(server.hls_url(name), 10)
    rss_before = server.rss_kb()

    failures: list[str] = []
    reasons: dict[str, str] = {}
    left_open: set[str] = set()
    for round_ in range(ROUNDS):
        for what, (attack, pattern) in ATTACKS.items():
            if what in left_open:
                continue  # already failed; do not pile up open connections
            port, sock = attack(server.rtmp_port)
            if what != "vanished mid-chunk":
                closed, after = wait_closed(sock, 5)
                sock.close()
                if not closed:
                    failures.append(f"round {round_}: {what}: connection still open after 5 s")
                    left_open.add(what)
            if round_ == 0:
                hits, lines = _reason_lines(server, port, pattern)
                if not hits:
                    failures.append(
                        f"{what} (client port {port}): no log line with a reason matching /{pattern}/; "
                        f"lines for this client: {lines or '(none)'}"
                    )
                else:
                    reasons[what] = hits[0]

    port, sock, took = slow_handshake(server.rtmp_port)
    closed, after = wait_closed(sock, 5)
    sock.close()
    if not closed:
        failures.append(f"slow handshake: still open after {took + after:.1f}s")
    elif took + after > HANDSHAKE_TIMEOUT + 2.5:
        failures.append(f"slow handshake closed after {took + after:.1f}s, handshake_timeout {HANDSHAKE_TIMEOUT}s")
    hits, lines = _reason_lines(server, port, r"time ?out|timed out|within|deadline|too slow")
    if hits:
        reasons["slow handshake"] = hits[0]
    else:
        failures.append(f"slow handshake (client port {port}): no timeout reason logged; lines: {lines or '(none)'}")

    rss_after = server.rss_kb()
    assert proc.poll() is None or proc.returncode == 0, f"the good publisher died:\n{ffmpeg_log(proc)}"
    rc = wait_proc(proc, 40)
    assert rc == 0, f"the good publisher failed ({rc}):\n{ffmpeg_log(proc)}\n{server.log_tail()}"
    wait_for_endlist(server.hls_url(name), 10)
    out = read_hls(server.hls_url(name))
    try:
        assert_exact(clip, out.segments, segment_target=2.0, label="the good stream beside bad connections")
    except AssertionError as exc:
        failures.append(str(exc))

    print("reasons logged:\n" + "\n".join(f"  {k}: {v}" for k, v in reasons.items()))
    print(f"RSS before {rss_before} kB, after {rss_after} kB")
    assert not failures, "bad connections not handled as required:\n" + "\n".join(failures) + (
        f"\n--- log tail:\n{server.log_tail(60)}"
    )
    assert rss_after - rss_before < 40 * 1024, f"RSS grew from {rss_before} kB to {rss_after} kB"
    assert http_ok(server)
    assert not server.hls_dir("sneaky").exists(), "a publish before connect created a stream"
    server.assert_no_tracebacks()


def http_ok(server) -> bool:
    return media.http_get(server.http_url("/healthz")).status == 200


@pytest.mark.timeout(60)
def test_idle_publisher_is_dropped_and_its_stream_ended(server_factory, clips):
    """A publisher that goes silent (socket open, no bytes) is dropped after
    idle_timeout with a logged reason; what it sent is in the output and the
    playlist gets EXT-X-ENDLIST."""
    idle = 2.0
    server = server_factory(rtmp={"idle_timeout": idle})
    clip = clips.get(media.SMALL)
    name = "sleepy"
    pub = media.CorePublisher("127.0.0.1", server.rtmp_port, name)
    pub.open()
    counts = {"video": 0, "audio": 0}
    start = time.monotonic()
    for kind, ts, body in media.flv_tag_bodies(clip):
        if ts >= 1500:
            break
        delay = start + ts / 1000 - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        pub.send(kind, ts, body)
        if not media.is_sequence_header(body):
            counts[kind] += 1
    silent_from = time.monotonic()
    closed, after = wait_closed(pub.sock, idle + 10)
    took = time.monotonic() - silent_from
    port = pub.local_port
    pub.close()
    assert closed, f"idle publisher not dropped within {idle + 10:.0f}s"
    assert took <= idle + 1.5, f"idle publisher dropped after {took:.1f}s, idle_timeout is {idle}s"
    hits, lines = _reason_lines(server, port, r"idle|inactiv|no data|silent|time ?out")
    assert hits, f"no idle reason logged for client port {port}: {lines}\n{server.log_tail()}"
    text = wait_for_endlist(server.hls_url(name), 5)
    out = read_hls(server.hls_url(name))
    report = assert_exact(clip, out.segments, segment_target=2.0, prefix=True, label="idle publisher")
    assert (report.video_frames, report.audio_frames) == (counts["video"], counts["audio"]), (
        f"the idle publisher sent {counts} complete frames; the output holds "
        f"{report.video_frames} video and {report.audio_frames} audio frames:\n{text}"
    )
    server.assert_no_tracebacks()


BAD_NAMES = ["..", ".", "../escape1", "a/../../escape2", "/escape3", "escape4/../..", "x" * 300,
             "bad name", "nul\x00byte", "..\\escape5", "%2e%2e"]


@pytest.mark.timeout(60)
def test_stream_names_cannot_escape_the_hls_dir(server, tmp_path):
    """Publishing under names that are paths is refused, and nothing is written
    outside data_dir/hls/<name>/ for a valid name."""
    before = {p for p in server.workdir.rglob("*")}
    accepted = []
    for bad in BAD_NAMES:
        pub = media.CorePublisher("127.0.0.1", server.rtmp_port, bad)
        try:
            pub.open()
        except (AssertionError, ConnectionError, OSError):
            pass  # refused: an error status, or the connection closed
        else:
            accepted.append(bad)
        finally:
            pub.close()
    time.sleep(0.5)
    after = {p for p in server.workdir.rglob("*")}
    new = sorted(str(p.relative_to(server.workdir)) for p in after - before)
    unexpected = [p for p in new if not p.startswith("data/hls/") and not p.startswith("data/dead-letters")
                  and p != "server.log"]
    escaped = [p for p in new if "escape" in p]
    assert not accepted, f"publish accepted for path-like names {accepted!r}; new files: {new}"
    assert not escaped and not unexpected, f"files created outside the stream dirs: {escaped or unexpected}"
    assert server.alive()
    server.assert_no_tracebacks()
