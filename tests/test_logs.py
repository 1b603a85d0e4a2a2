"""Logs: one line per event with stream, client and reason; JSON for machines."""

from __future__ import annotations

import json
import socket

from media import SMALL, wait_proc


def test_json_logs_carry_stream_client_and_reason(server_factory, clips, ffmpeg_publisher):
    server = server_factory(log_format="json")
    assert wait_proc(ffmpeg_publisher(clips.path(SMALL), server.rtmp_url("j")), 60) == 0
    with socket.create_connection(("127.0.0.1", server.rtmp_port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
        sock.recv(10)
    server.wait_for_log("handshake version")
    records = [json.loads(line) for line in server.log_text().splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    started = [r for r in records if r["message"] == "publish started"]
    assert started and started[0]["stream"] == "j" and started[0]["client"].startswith("127.0.0.1:")
    refused = [r for r in records if "handshake version 71" in r.get("reason", "")]
    assert refused and refused[0]["level"] == "warning" and refused[0]["client"].startswith("127.0.0.1:")
