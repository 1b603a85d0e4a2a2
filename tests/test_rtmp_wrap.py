"""Timestamp wraps, proven by starting streams just before them.

(a) ffmpeg's FLV/RTMP muxer wraps at 2**31 ms (it masks the extended
    timestamp byte with 0x7F): -output_ts_offset puts the crossing ~4.5 s in.
(b) A publisher on the project's RTMP client core sends timestamps that wrap
    mod 2**32 ~4.5 s in.
(c) RTMP timestamps near 95433 s, so the 33-bit MPEG-TS PTS (90 kHz) wraps in
    the output ~4.5 s in.

Each output must be exact and continuous across the wrap: no
EXT-X-DISCONTINUITY there, one constant offset modulo 2**33.
"""

from __future__ import annotations

import dataclasses

import pytest

import media
from media import (
    AV,
    BFRAMES,
    FFMPEG_RTMP_WRAP_MS,
    RTMP_WRAP_MS,
    TS_WRAP,
    HlsPoller,
    assert_exact,
    ffmpeg_log,
    read_hls,
    wait_proc,
)

CROSS_AT_MS = 4500
"""Where the wrap falls in the 8 s clip: mid-GOP and mid-segment."""


def _run_ffmpeg(server, ffmpeg_publisher, clip, name: str, offset_ms: int):
    poller = HlsPoller(server.hls_url(name), max_segments=server.config["hls"]["playlist_size"])
    poller.start()
    proc = ffmpeg_publisher(
        clip.path, server.rtmp_url(name),
        extra_output_args=("-output_ts_offset", f"{offset_ms / 1000:.3f}"),
    )
    rc = wait_proc(proc, 40)
    assert rc == 0, f"ffmpeg exited {rc}:\n{ffmpeg_log(proc)}\nserver log:\n{server.log_tail()}"
    return poller


def _final(server, name, poller):
    assert poller.wait_endlist(10), f"no ENDLIST; last playlist:\n{poller.last_text}\n{server.log_tail()}"
    poller.stop()
    poller.assert_clean()
    out = read_hls(server.hls_url(name))
    assert "#EXT-X-DISCONTINUITY" not in out.text, (
        f"EXT-X-DISCONTINUITY at a timestamp wrap (the publisher's clock did not jump):\n{out.text}\n"
        f"server log:\n{server.log_tail()}"
    )
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("spec", [AV, BFRAMES], ids=["h264-aac", "bframes"])
def test_ffmpeg_wrap_at_2_31_ms(server, clips, ffmpeg_publisher, spec):
    clip = clips.get(spec)
    name = f"wrap31-bf{spec.bframes}"
    offset = FFMPEG_RTMP_WRAP_MS - CROSS_AT_MS
    poller = _run_ffmpeg(server, ffmpeg_publisher, clip, name, offset)
    out = _final(server, name, poller)
    assert_exact(clip, out.segments, segment_target=2.0, label="ffmpeg across its 2**31 ms wrap")
    server.assert_no_tracebacks()


@pytest.mark.timeout(120)
def test_core_publisher_wrap_at_2_32_ms(server, clips):
    clip = clips.get(BFRAMES)
    name = "wrap32"
    poller = HlsPoller(server.hls_url(name), max_segments=server.config["hls"]["playlist_size"])
    poller.start()
    ts_base = RTMP_WRAP_MS - CROSS_AT_MS
    bodies = media.flv_tag_bodies(clip, ts_base)
    assert bodies[0][1] < RTMP_WRAP_MS <= bodies[-1][1], "the clip does not cross 2**32 ms"
    media.core_publish(clip, "127.0.0.1", server.rtmp_port, name, ts_base=ts_base, paced=True)
    out = _final(server, name, poller)
    assert_exact(clip, out.segments, segment_target=2.0, label="RTMP timestamps across 2**32 ms")
    server.assert_no_tracebacks()


@pytest.mark.timeout(120)
def test_output_crosses_33_bit_pts_wrap(server, clips, ffmpeg_publisher):
    clip = clips.get(AV)
    name = "wrap33"
    offset = int(TS_WRAP / 90) - CROSS_AT_MS  # ms, so that input*90 crosses 2**33
    poller = _run_ffmpeg(server, ffmpeg_publisher, clip, name, offset)
    out = _final(server, name, poller)
    report = assert_exact(clip, out.segments, segment_target=2.0, label="output across the 33-bit PTS wrap")
    # The server may shift timestamps by a constant; say whether the wrap was
    # really exercised (it is when the server keeps the publisher's clock).
    print(f"output offset {report.video_offset} ticks; output PTS wrapped: {report.output_wrapped}")
    server.assert_no_tracebacks()


@pytest.mark.timeout(120)
def test_publisher_clock_jump_is_the_only_discontinuity(server, clips):
    """One publish whose clock jumps forward by 60 s half way: an
    EXT-X-DISCONTINUITY at the jump and nowhere else (or a continuous output
    timeline), and each side exact with its own offset."""
    first, second = clips.get(media.SMALL), clips.get(dataclasses.replace(media.SMALL, tone=990))
    name = "jump"
    poller = HlsPoller(server.hls_url(name), max_segments=server.config["hls"]["playlist_size"])
    poller.start()
    jump_to = first.duration_ms + 60_000
    media.core_publish(first, "127.0.0.1", server.rtmp_port, name, then=[(second, jump_to)], speed=2.0)
    assert poller.wait_endlist(10), f"no ENDLIST; last playlist:\n{poller.last_text}\n{server.log_tail()}"
    poller.stop()
    poller.assert_clean()
    out = read_hls(server.hls_url(name))
    # Either answer is right: a discontinuity exactly at the jump, or an output
    # timeline that stays continuous across it. Each side must be exact.
    assert out.text.count("#EXT-X-DISCONTINUITY\n") <= 1, out.text
    assert_exact([first, second], out.segments, segment_target=2.0, label="clock jump of +60 s")
    server.assert_no_tracebacks()
