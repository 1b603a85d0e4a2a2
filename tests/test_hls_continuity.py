"""Issue 10: MPEG-TS continuity counters continue across segments.

A real ffmpeg CLI publishes over RTMP; every PID's continuity counter must go
on from one segment to the next over the whole playlist (it may restart only
at EXT-X-DISCONTINUITY), every segment starts with PAT and PMT, and ffmpeg
reading the playlist (live, and once finished) prints no warning at all.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time

import pytest

from media import AV, BFRAMES, assert_exact, ffmpeg_log, read_hls, split_at_discontinuities, wait_for_playlist, wait_proc
from ts_check import cc_breaks, parse_packets

FFMPEG = os.environ.get("FFMPEG", "ffmpeg")


def _ffmpeg_reader(url: str) -> subprocess.Popen:
    return subprocess.Popen(
        [FFMPEG, "-hide_banner", "-nostdin", "-v", "warning", "-i", url, "-f", "null", "-"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def _check_segments(segments, label: str) -> None:
    resets = {i for i, s in enumerate(segments) if s.discontinuity}
    breaks = cc_breaks([s.data for s in segments], reset_before=resets)
    assert not breaks, f"{label}: continuity counter breaks:\n" + "\n".join(breaks[:20])
    for s in segments:
        packets = parse_packets(s.data)
        assert [p.pid for p in packets[:2]] == [0x0000, 0x1000], f"{label}: {s.uri} does not start with PAT, PMT"


@pytest.fixture
def one_second(server_factory):
    return server_factory(hls={"segment_target": 1.0, "playlist_size": 30})


def test_counters_continue_across_every_segment_and_ffmpeg_is_silent(one_second, clips, ffmpeg_publisher):
    server = one_second
    clip = clips.get(BFRAMES)
    name = "cc"
    proc = ffmpeg_publisher(clip.path, server.rtmp_url(name))
    url = server.hls_url(name)
    wait_for_playlist(url, 15, lambda t: t.count(".ts") >= 2)
    live_reader = _ffmpeg_reader(url)
    try:
        assert wait_proc(proc, clip.spec.duration + 30) == 0, ffmpeg_log(proc)
        _, live_err = live_reader.communicate(timeout=30)
    finally:
        if live_reader.poll() is None:
            live_reader.kill()
            live_reader.wait(5)
    wait_for_playlist(url, 10, lambda t: "#EXT-X-ENDLIST" in t)
    out = read_hls(url)
    assert len(out.segments) >= 6, f"expected ~8 one-second segments:\n{out.text}"
    assert not any(s.discontinuity for s in out.segments), out.text
    _check_segments(out.segments, "one publish")
    assert_exact(clip, out.segments, segment_target=1.0, label="one publish")
    assert live_reader.returncode == 0 and live_err == b"", f"ffmpeg on the live playlist:\n{live_err.decode()}"
    finished = subprocess.run(
        [FFMPEG, "-hide_banner", "-nostdin", "-v", "warning", "-i", url, "-f", "null", "-"],
        capture_output=True, timeout=60,
    )
    assert finished.returncode == 0 and finished.stderr == b"", (
        f"ffmpeg on the finished playlist:\n{finished.stderr.decode()}"
    )
    server.assert_no_tracebacks()


def test_republish_continues_the_counters_through_the_discontinuity(one_second, clips, ffmpeg_publisher):
    """A republish gives EXT-X-DISCONTINUITY (its timestamps start again) but the
    counters go on, so FFmpeg's HLS demuxer (one MPEG-TS demuxer across
    segments) sees no corrupt packet there."""
    server = one_second
    first, second = clips.get(AV), clips.get(dataclasses.replace(AV, tone=880, duration=4.0))
    name = "cc-again"
    url = server.hls_url(name)
    proc = ffmpeg_publisher(first.path, server.rtmp_url(name), realtime=False)
    assert wait_proc(proc, 40) == 0, ffmpeg_log(proc)
    wait_for_playlist(url, 10, lambda t: "#EXT-X-ENDLIST" in t)
    proc = ffmpeg_publisher(second.path, server.rtmp_url(name), realtime=False)
    assert wait_proc(proc, 40) == 0, ffmpeg_log(proc)
    deadline = time.monotonic() + 10
    while True:
        out = read_hls(url)
        if out.endlist and any(s.discontinuity for s in out.segments):
            break
        assert time.monotonic() < deadline, f"no ENDLIST after the republish:\n{out.text}"
        time.sleep(0.1)
    groups = split_at_discontinuities(out.segments)
    assert len(groups) == 2, out.text
    breaks = cc_breaks([s.data for s in out.segments])
    assert not breaks, "continuity counter breaks:\n" + "\n".join(breaks[:20])
    _check_segments(out.segments, "publish + republish")
    assert_exact(first, groups[0], segment_target=1.0, label="first publish")
    assert_exact(second, groups[1], segment_target=1.0, label="republish")
    finished = subprocess.run(
        [FFMPEG, "-hide_banner", "-nostdin", "-v", "warning", "-i", url, "-f", "null", "-"],
        capture_output=True, timeout=60,
    )
    # FFmpeg's HLS demuxer ignores EXT-X-DISCONTINUITY, so it reports the
    # republish's timestamps going back ("DTS ... out of order"); that line
    # is its own, and allowed. Nothing else is.
    lines = [line for line in finished.stderr.decode().splitlines() if "out of order" not in line]
    assert finished.returncode == 0 and lines == [], "\n".join(lines)
    server.assert_no_tracebacks()


def test_publish_to_a_symlinked_stream_directory_is_refused(server, clips, ffmpeg_publisher, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = server.hls_dir("x").parent
    root.mkdir(parents=True, exist_ok=True)
    (root / "linked").symlink_to(outside)
    proc = ffmpeg_publisher(clips.get(AV).path, server.rtmp_url("linked"), realtime=False)
    rc = wait_proc(proc, 30)
    assert rc != 0, "a publish into a symlinked stream directory was accepted"
    assert server.wait_for_log(r"unsafe stream directory", timeout=5)
    assert list(outside.iterdir()) == [], "the writer followed the symlink"
    # Every other name still publishes.
    ok = ffmpeg_publisher(clips.get(AV).path, server.rtmp_url("fine"), realtime=False)
    assert wait_proc(ok, 40) == 0, ffmpeg_log(ok)
    wait_for_playlist(server.hls_url("fine"), 10, lambda t: "#EXT-X-ENDLIST" in t)
    server.assert_no_tracebacks()
