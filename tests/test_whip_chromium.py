"""WHIP ingest with a real browser: headless Chromium (Debian's) publishes its fake
camera and microphone from tests/data/whip_publish.html.

The page is opened from file:// and POSTs to the server's http://127.0.0.1 WHIP
endpoint, so the publish goes through the server's CORS (preflighted POST with
application/sdp, Location exposed, preflighted DELETE), as a publishing web app
on another origin would. No trickle: the offer carries every candidate.

What Chromium says it sent (outbound-rtp framesSent/framesEncoded, from
pc.getStats() after the tracks are stopped and the counters settle) is compared
with what the HLS output holds: the frame count within 5 %, the HLS video
duration against the wall time frames were being sent, the audio duration
against the video duration. The fake camera runs at about 20 fps whatever is
asked; the rate is measured, never assumed.

Two publishes: Chromium's own codec order (the offer lists H.264, which the
server passes through) and VP8 forced with setCodecPreferences (the server
transcodes VP8 -> H.264; its fps cap is raised so that no frame is dropped).
"""

from __future__ import annotations

import shutil
import time
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from playwright import sync_api

from media import demux_segment, read_hls, wait_for_endlist

TESTS = Path(__file__).resolve().parent
PAGE = TESTS / "data" / "whip_publish.html"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
    # Keep the encoder at full speed in a background/headless tab.
    "--disable-background-timer-throttling", "--disable-renderer-backgrounding",
]
PUBLISH_SECONDS = 9.0
TICKS = 90000
AAC_FRAME = 1024 / 48000


@pytest.fixture
def chromium():
    """Debian's Chromium (tests/install-system-deps.sh installs it); a missing one fails the test."""
    assert Path(CHROMIUM).exists(), f"no Chromium at {CHROMIUM}: run tests/install-system-deps.sh"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, timeout=30000)
        try:
            yield browser
        finally:
            browser.close()


def publish_from_chromium(browser, server, name: str, codec: str = "") -> dict[str, Any]:
    """Open the page, publish for PUBLISH_SECONDS once frames flow, stop; returns window.whip."""
    page = browser.new_page()
    console: list[str] = []
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
    query = urllib.parse.urlencode({"whip": server.http_url(f"/live/{name}/whip"), "codec": codec})
    page.goto(f"{PAGE.as_uri()}?{query}", timeout=15000)
    try:
        page.wait_for_function(
            "() => ['publishing', 'error'].includes(window.whip.state)", timeout=20000, polling=100
        )
    except sync_api.TimeoutError:
        state = page.evaluate("() => ({state: whip.state, errors: whip.errors, status: whip.status})")
        raise AssertionError(f"no frames sent within 20 s: {state}\nconsole: {console}\n{server.log_tail()}")
    started = page.evaluate("() => ({state: whip.state, errors: whip.errors, codecs: whip.offeredVideoCodecs})")
    assert started["state"] == "publishing", f"{started}\nconsole: {console}\n{server.log_tail()}"
    time.sleep(PUBLISH_SECONDS)
    page.set_default_timeout(15000)
    whip = page.evaluate("() => whipStop()")
    whip["console"] = console
    page.close()
    assert whip["state"] == "stopped" and not whip["errors"], f"{whip['errors']}\nconsole: {console}"
    assert whip["deleteStatus"] == 200, whip["deleteStatus"]
    return whip


def check_hls(server, name: str, whip: dict[str, Any], server_codec: str) -> dict[str, Any]:
    """The HLS output against what Chromium sent; returns the measured figures."""
    wait_for_endlist(server.hls_url(name), 10)
    out = read_hls(server.hls_url(name))  # every segment through ffprobe, stderr must stay empty
    assert out.endlist
    video, audio, sizes = [], [], set()
    for segment in out.segments:
        params: dict = {}
        v, a = demux_segment(segment.data, segment.seq, segment.uri, params=params)
        video += v
        audio += a
        assert params["video"][0] == "h264", params
        assert params["audio"][:2] == ("aac", 48000), params
        sizes.add(params["video"][1:])

    stats = whip["finalStats"]["video"]
    sent = stats["framesSent"]
    wall = (whip["lastFrameAt"] - whip["firstFrameAt"]) / 1000  # first to last frame, +-100 ms polling
    fps_sent = (sent - 1) / wall
    dts = np.array([f.dts for f in video], dtype=np.int64)
    steps = np.diff(dts)
    video_duration = float(dts[-1] - dts[0] + np.median(steps)) / TICKS  # first to last frame, + one frame
    audio_duration = len(audio) * AAC_FRAME
    figures = {
        "server_codec": server_codec,
        "chromium_codec": stats["codec"],
        "frames_sent": sent,
        "frames_encoded": stats["framesEncoded"],
        "keyframes_encoded": stats["keyFramesEncoded"],
        "hls_video_frames": len(video),
        "hls_keyframes": sum(f.keyframe for f in video),
        "hls_audio_frames": len(audio),
        "send_wall_s": round(wall, 3),
        "fps_sent": round(fps_sent, 2),
        "hls_fps": round(float((len(video) - 1) / ((dts[-1] - dts[0]) / TICKS)), 2),
        "hls_video_s": round(float(video_duration), 3),
        "hls_audio_s": round(audio_duration, 3),
        "sizes": sorted(sizes),
        "resolution_changes": stats["qualityLimitationResolutionChanges"],
        "quality_limitation": stats["qualityLimitationReason"],
        "segments": len(out.segments),
    }
    print(f"\n{name}: {figures}")
    label = f"codec {server_codec} (Chromium: {stats['codec']}); {figures}"

    assert stats["framesEncoded"] == sent, label
    assert sent >= 0.9 * PUBLISH_SECONDS * 15, f"too few frames sent for a {PUBLISH_SECONDS} s publish: {label}"
    assert abs(len(video) - sent) <= 0.05 * sent, f"HLS frame count vs Chromium's framesSent: {label}"
    assert abs(video_duration - wall) <= 0.05 * wall + 0.1, f"HLS video duration vs wall time of sending: {label}"
    assert abs(audio_duration - video_duration) <= 0.05 * video_duration, f"audio vs video duration: {label}"
    # A continuous timeline: no step back, no gap of more than a few frame intervals.
    assert steps.min() > 0 and steps.max() <= 4 * np.median(steps), (sorted(set(steps.tolist()))[-5:], label)
    audio_steps = np.diff([f.dts for f in audio])
    assert audio_steps.min() > 0 and audio_steps.max() <= 3 * 1920, (sorted(set(audio_steps.tolist()))[-5:], label)
    assert video[0].keyframe, label
    if stats["qualityLimitationResolutionChanges"] == 0:
        assert sizes == {(stats["frameWidth"], stats["frameHeight"])} == {(640, 360)}, label
    server.assert_no_tracebacks()
    return figures


def started_codec(server, name: str) -> str:
    lines = server.wait_for_log(rf"WHIP publish started.*stream={name}\b", timeout=5)
    assert len(lines) == 1, lines
    codec = lines[0].split("video=")[1].split()[0]
    assert codec in ("h264", "vp8"), lines
    return codec


@pytest.mark.timeout(90)
def test_chromium_publishes_with_its_default_codec(server, chromium):
    whip = publish_from_chromium(chromium, server, "browser")
    codec = started_codec(server, "browser")
    chromium_codec = whip["finalStats"]["video"]["codec"]
    assert chromium_codec == {"h264": "video/H264", "vp8": "video/VP8"}[codec], (codec, chromium_codec)
    # Chromium offers H.264 by default, so the server must have chosen passthrough.
    if "H264" in whip["offeredVideoCodecs"]:
        assert codec == "h264", f"offered {whip['offeredVideoCodecs']}, server ran {codec}"
    figures = check_hls(server, "browser", whip, codec)
    assert server.log_lines("WHIP publish ended.*stream=browser.*publisher sent DELETE"), figures


@pytest.mark.timeout(90)
def test_chromium_vp8_is_transcoded_to_h264(server_factory, chromium):
    # The transcoder's frame-rate cap raised out of the way: every VP8 frame must come out.
    server = server_factory(webrtc={"host_addresses": ["127.0.0.1"], "vp8_max_fps": 120.0})
    whip = publish_from_chromium(chromium, server, "browservp8", codec="vp8")
    assert whip["offeredVideoCodecs"] in (["VP8"], ["VP8", "rtx"]), whip["offeredVideoCodecs"]
    codec = started_codec(server, "browservp8")
    assert codec == "vp8"
    assert whip["finalStats"]["video"]["codec"] == "video/VP8"
    figures = check_hls(server, "browservp8", whip, codec)
    assert server.log_lines("WHIP publish ended.*stream=browservp8.*publisher sent DELETE"), figures
