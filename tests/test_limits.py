"""Limits hit by real connections: refused with a reason, live streams untouched."""

from __future__ import annotations

import socket
import time

from media import SMALL, assert_exact, read_hls, wait_for_endlist, wait_proc


def connect(server, source: str) -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", server.rtmp_port))
    sock.settimeout(3)
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, socket.timeout):
        return False


def test_connection_and_stream_limits(server_factory, clips, ffmpeg_publisher):
    server = server_factory(
        limits={"max_connections": 6, "max_connections_per_client": 3, "max_streams": 1},
        rtmp={"handshake_timeout": 30.0},
    )
    steady = ffmpeg_publisher(clips.path(SMALL), server.rtmp_url("steady"))
    server.wait_for_log("publish started.*stream=steady")

    # 127.0.0.1 already has the publisher: two more fit, the third is refused.
    held = [connect(server, "127.0.0.1") for _ in range(2)]
    extra = connect(server, "127.0.0.1")
    assert closed_by_server(extra)
    server.wait_for_log("limit of 3 connections per client address reached for 127.0.0.1")

    # Other addresses fill the total of 6; the 7th connection is refused.
    held += [connect(server, "127.0.0.2"), connect(server, "127.0.0.3"), connect(server, "127.0.0.4")]
    time.sleep(0.2)
    seventh = connect(server, "127.0.0.5")
    assert closed_by_server(seventh)
    server.wait_for_log("connection limit of 6 reached")
    for sock in held:
        sock.close()

    # A second stream is beyond max_streams.
    time.sleep(0.3)
    other = ffmpeg_publisher(clips.path(SMALL), server.rtmp_url("other"))
    assert wait_proc(other, 30) != 0
    server.wait_for_log("limit of 1 live streams is reached")

    # A client opening connections in a loop changes nothing for the stream.
    for _ in range(200):
        sock = socket.create_connection(("127.0.0.1", server.rtmp_port))
        sock.close()

    assert wait_proc(steady, 60) == 0
    wait_for_endlist(server.hls_url("steady"), 10)
    assert_exact(clips.get(SMALL), read_hls(server.hls_url("steady")).segments, segment_target=2.0, label="steady")
    server.assert_no_tracebacks()


def test_http_header_limits(server):
    with socket.create_connection(("127.0.0.1", server.http_port)) as sock:
        headers = b"".join(b"X-%d: y\r\n" % i for i in range(500))
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
        assert sock.recv(200).startswith(b"HTTP/1.0 400")
    with socket.create_connection(("127.0.0.1", server.http_port)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 20000 + b"\r\n\r\n")
        assert sock.recv(200).startswith(b"HTTP/1.0 400")
