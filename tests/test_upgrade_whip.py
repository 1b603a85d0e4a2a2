"""WHIP publishers across `mediaserver upgrade`: kept by the old worker until they end.

RTMP connections move to the new worker; a live WHIP publish (aiortc) stays on
the old worker, which serves only it until it ends (or the drain timeout).
The publisher's DELETE reaches the new worker's HTTP listener, which passes it
through the keeper to the old worker. With `webrtc.udp_port` (one UDP port for
every peer connection) the new worker opens the port only once the old worker
has let it go; until then an offer gets 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import whip_client
from installs import server_status, upgrade
from media import SMALL, assert_exact, ffmpeg_log, ffmpeg_publish, read_hls, wait_for_endlist, wait_proc
from test_whip import file_video_payloads, hls_frames, motion_clip, whip_url  # noqa: F401 - fixture

whip_client.loopback_only()


def _whip_in_thread(server, name: str, clip, **kwargs):
    result: dict = {}

    def run() -> None:
        try:
            result["result"] = asyncio.run(whip_client.publish(whip_url(server, name), clip, **kwargs))
        except BaseException as exc:  # reported by the test
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


@pytest.mark.timeout(120)
@pytest.mark.parametrize("shared_port", [False, True], ids=["port-per-connection", "one-udp-port"])
def test_whip_publisher_stays_on_the_old_worker_until_it_ends(server_factory, clips, motion_clip, tmp_path, shared_port):
    webrtc = {"udp_port": whip_client_port()} if shared_port else {}
    server = server_factory(webrtc=webrtc)
    rtmp_clip = clips.get(SMALL)
    ff = ffmpeg_publish(rtmp_clip.path, server.rtmp_url("r"), log_path=tmp_path / "ff.log")
    thread, whip = _whip_in_thread(server, "w", motion_clip, duration=6.0)
    try:
        server.wait_for_log(r"WHIP publish started.*stream=w", timeout=15)
        server.wait_for_log(r"publish started stream=r")
        old = server.worker_pid()
        time.sleep(1.0)
        code, report = upgrade(server)
        assert code == 0 and report["ok"], report
        assert report["moved"] == 1 and "w" in report["kept"], report
        new = report["new_pid"]
        # Both workers run while the old one finishes its WHIP publish.
        assert sorted(server.worker_pids()) == sorted([old, new])
        status = server_status(server)
        assert [s["name"] for s in status["sessions"]] == ["r"] and status["sessions"][0]["pid"] == new
        retiring = [w for w in status["keeper"]["workers"] if w["pid"] == old]
        assert retiring and retiring[0]["status"] == "retiring" and retiring[0]["kept"] == ["w"], status["keeper"]
        if shared_port:
            # The port is still the old worker's: a new offer is told to come back.
            busy = asyncio.run(whip_client.publish(whip_url(server, "x"), motion_clip, duration=1.0))
            assert busy.status == 503, busy
        thread.join(30)
        assert not thread.is_alive() and "error" not in whip, whip
        result = whip["result"]
        assert result.status == 201
        assert result.delete_status == 200, "the DELETE must reach the old worker through the keeper"
        wait_for_endlist(server.hls_url("w"), 10)
        # The old worker exits once its last publisher has ended.
        deadline = time.monotonic() + 10
        while old in server.worker_pids():
            assert time.monotonic() < deadline, f"old worker {old} did not exit:\n{server.log_tail()}"
            time.sleep(0.1)
        assert wait_proc(ff, 60) == 0, ffmpeg_log(ff)
    finally:
        if ff.poll() is None:
            ff.kill()
    # Every WHIP frame it sent, in order, byte for byte.
    _, video, _ = hls_frames(server.hls_url("w"))
    sent = file_video_payloads(motion_clip)
    assert result.sent["video"] == len(sent)
    assert [f.payload for f in video] == sent
    wait_for_endlist(server.hls_url("r"), 10)
    out = read_hls(server.hls_url("r"))
    assert_exact(rtmp_clip, out.segments, segment_target=2.0, label="RTMP moved beside a kept WHIP publish")
    # The new worker has the UDP port (or its own ports) now: a new WHIP publish works.
    again = asyncio.run(whip_client.publish(whip_url(server, "w2"), motion_clip, duration=2.0))
    assert again.status == 201 and again.delete_status == 200, again
    server.assert_no_tracebacks()


def whip_client_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
