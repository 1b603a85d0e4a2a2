"""Thumbnails and audio levels of a real published stream, checked against the input."""

from __future__ import annotations

import json
import subprocess
import time

import av
import numpy as np

from media import FFMPEG, http_get, wait_proc


def make_clip(path, seconds=8):
    """Moving test pattern + a 1 kHz tone at 0.5 (left) and 0.25 (right) full scale."""
    subprocess.run(
        [FFMPEG, "-v", "error", "-y",
         "-f", "lavfi", "-i", f"testsrc2=size=640x360:rate=30:duration={seconds}",
         "-f", "lavfi", "-i", f"aevalsrc=0.5*sin(2*PI*1000*t)|0.25*sin(2*PI*1000*t):s=48000:d={seconds}",
         "-c:v", "libx264", "-preset", "ultrafast", "-g", "30", "-bf", "0", "-pix_fmt", "yuv420p",
         "-c:a", "aac", "-b:a", "192k", "-f", "flv", str(path)],
        check=True,
    )
    return path


def decode_input_keyframe(path, dts_ms):
    with av.open(str(path)) as src:
        stream = src.streams.video[0]
        for packet in src.demux(stream):
            if packet.dts is not None and packet.dts == dts_ms:
                assert packet.is_keyframe
                frames = stream.codec_context.decode(packet)
                return frames[0] if frames else stream.codec_context.decode(None)[0]
    raise AssertionError(f"no input frame at dts {dts_ms}")


def ffmpeg_levels(path, start_ms, end_ms):
    """Peak and RMS per channel of the input's decoded audio in [start, end), by ffmpeg's astats."""
    result = subprocess.run(
        [FFMPEG, "-v", "info", "-nostats", "-i", str(path), "-vn", "-af",
         f"atrim=start={start_ms / 1000}:end={end_ms / 1000},"
         "astats=measure_overall=none:measure_perchannel=Peak_level+RMS_level",
         "-f", "null", "-"],
        capture_output=True, text=True, check=True,
    )
    peaks = [float(line.rsplit(":", 1)[1]) for line in result.stderr.splitlines() if "Peak level dB" in line]
    rms = [float(line.rsplit(":", 1)[1]) for line in result.stderr.splitlines() if "RMS level dB" in line]
    return peaks, rms


def decode_jpeg(data):
    codec = av.CodecContext.create("mjpeg", "r")
    frames = codec.decode(av.Packet(data))
    return frames[0]


def test_thumbnail_matches_the_published_keyframe_and_levels_match_the_tone(server_factory, tmp_path, ffmpeg_publisher):
    clip = make_clip(tmp_path / "tone.flv")
    server = server_factory(previews={"thumbnail_interval": 2.0, "levels_interval": 1.0, "levels_window": 0.5})
    proc = ffmpeg_publisher(clip, server.rtmp_url("pv"))
    thumbnail = None
    levels = None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (thumbnail is None or not levels):
        time.sleep(0.5)
        status = http_get(server.http_url("/live/pv/status.json"))
        if status.status == 200:
            info = json.loads(status.body)
            levels = info["levels"] or None
        response = http_get(server.http_url("/live/pv/thumbnail.jpg"))
        if response.status == 200:
            thumbnail = response
    assert thumbnail is not None, server.log_tail()
    assert thumbnail.header("Content-Type") == "image/jpeg"
    dts = int(thumbnail.header("X-Frame-Dts"))
    picture = decode_jpeg(thumbnail.body)
    assert (picture.width, picture.height) == (320, 180)
    source = decode_input_keyframe(clip, dts).reformat(width=320, height=180, format="rgb24")
    got = picture.reformat(format="rgb24").to_ndarray().astype(np.int16)
    want = source.to_ndarray().astype(np.int16)
    mad = float(np.mean(np.abs(got - want)))
    assert mad < 6.0, f"thumbnail differs from the input keyframe at {dts} ms: mean abs diff {mad:.2f}"

    assert levels is not None and len(levels) == 2, levels
    # RMS of a sine of amplitude A is A/sqrt(2): -9.03 and -15.05 dBFS here.
    for channel, amplitude in zip(levels, (0.5, 0.25)):
        want = 20 * np.log10(amplitude / np.sqrt(2))
        assert abs(channel["rms_db"] - want) < 0.5, (channel, want)
    # AAC coding noise lifts sample peaks above the tone's amplitude, so peaks
    # are checked against ffmpeg's own measurement of the published audio over
    # the same window.
    start, end = info["levels_window_dts"]
    assert 400 <= end - start <= 600, info
    peaks, rms = ffmpeg_levels(clip, start, end)
    for channel, peak, ref_rms in zip(levels, peaks, rms):
        assert abs(channel["peak_db"] - peak) < 0.5, (channel, peaks)
        assert abs(channel["rms_db"] - ref_rms) < 0.5, (channel, rms)
    assert wait_proc(proc, 60) == 0

    # Unknown streams: clear 404s.
    assert http_get(server.http_url("/live/nosuch/thumbnail.jpg")).status == 404
    assert http_get(server.http_url("/live/nosuch/status.json")).status == 404
    server.assert_no_tracebacks()
