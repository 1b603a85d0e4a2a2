"""Publish authorisation with real clients: stream keys and a real HTTP webhook."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from media import SMALL, assert_exact, read_hls, wait_for_endlist, wait_proc


class Hook:
    """A local webhook: answers by stream name (allow, deny, fail, hang; okslow: allow after 3 s)."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                hook.requests.append(body)
                name = body.get("name", "")
                if name.startswith(("hang", "okslow")) and body["action"] == "publish":
                    time.sleep(3)
                status = 204 if name.startswith(("ok", "steady")) or body["action"] == "unpublish" else (
                    500 if name.startswith("fail") else 403
                )
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class GarbageServer:
    """Answers every connection with bytes that are not HTTP."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/hook"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.recv(65536)
            conn.sendall(b"\x00\x01garbage that is not HTTP\r\n\r\n")
            conn.close()


@pytest.fixture
def hook():
    h = Hook()
    yield h
    h.close()


def publish(server, ffmpeg_publisher, clips, name, query=""):
    proc = ffmpeg_publisher(clips.path(SMALL), server.rtmp_url(name) + query)
    return wait_proc(proc, 60)


def test_stream_keys(server_factory, clips, ffmpeg_publisher):
    server = server_factory(publish={"keys": [{"name": "cam*", "key": "s3cret"}]})
    assert publish(server, ffmpeg_publisher, clips, "cam1", "?key=s3cret") == 0
    wait_for_endlist(server.hls_url("cam1"), 10)
    assert_exact(clips.get(SMALL), read_hls(server.hls_url("cam1")).segments, segment_target=2.0, label="keyed")
    assert publish(server, ffmpeg_publisher, clips, "cam2", "?key=wrong") != 0
    assert publish(server, ffmpeg_publisher, clips, "cam3") != 0
    assert publish(server, ffmpeg_publisher, clips, "other", "?key=s3cret") != 0
    assert server.log_lines("wrong or missing stream key for stream 'cam2'")
    assert server.log_lines("wrong or missing stream key for stream 'cam3'")
    assert server.log_lines("no stream key is configured for stream 'other'")
    assert not (server.hls_dir("cam2") / "index.m3u8").exists()


def test_webhook_allows_and_denies_with_reasons(server_factory, clips, ffmpeg_publisher, hook):
    garbage = GarbageServer()
    server = server_factory(
        publish={"webhook": hook.url, "webhook_timeout": 1.0, "unpublish_webhook": hook.url}
    )
    steady = ffmpeg_publisher(clips.path(SMALL), server.rtmp_url("steady"))
    assert publish(server, ffmpeg_publisher, clips, "ok1", "?key=abc") == 0
    for name, reason in (("deny1", "answered 403"), ("fail1", "answered 500"), ("hang1", "did not answer within 1 s")):
        started = time.monotonic()
        assert publish(server, ffmpeg_publisher, clips, name) != 0
        assert time.monotonic() - started < 10
        lines = server.log_lines(f"publish webhook {reason}")
        assert any(f"stream={name}" in line for line in lines), server.log_tail()
    assert wait_proc(steady, 60) == 0
    wait_for_endlist(server.hls_url("steady"), 10)
    assert_exact(clips.get(SMALL), read_hls(server.hls_url("steady")).segments, segment_target=2.0, label="beside")

    publishes = [r for r in hook.requests if r["action"] == "publish"]
    ok = next(r for r in publishes if r["name"] == "ok1")
    assert ok["protocol"] == "rtmp" and ok["key"] == "abc" and ok["client"].startswith("127.0.0.1:")
    unpublished = {r["name"] for r in hook.requests if r["action"] == "unpublish"}
    assert {"ok1", "steady"} <= unpublished

    # A hook that answers garbage denies too.
    second = server_factory(publish={"webhook": garbage.url, "webhook_timeout": 1.0})
    assert publish(second, ffmpeg_publisher, clips, "ok2") != 0
    assert second.log_lines("publish webhook unreachable"), second.log_tail()
