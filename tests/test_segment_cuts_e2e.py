"""Segment cuts with real publishers: keyframes 1999 ms apart, an encoder-inserted keyframe.

The cut rule (logic/segments.py) cuts as close to the 2 s target as the
keyframes allow; here the whole server is driven over RTMP and the HLS output
is read as a player would, then compared frame by frame with what was sent.
"""

from __future__ import annotations

import dataclasses
import subprocess

import pytest

import media
from media import FFMPEG, ClipSpec, HlsPoller, assert_exact, read_hls, read_clip, wait_proc

TARGET = 2.0
FRAME = 1 / 30


def _final(server, name: str, poller: HlsPoller) -> media.HlsOutput:
    ended = poller.wait_endlist(15)
    poller.stop()
    assert ended, f"no #EXT-X-ENDLIST; last playlist:\n{poller.last_text}\n{server.log_tail()}"
    poller.assert_clean()
    out = read_hls(server.hls_url(name))
    assert out.endlist
    return out


def _assert_2_s_segments(out: media.HlsOutput, keyframes_ms: list[int]) -> None:
    assert "#EXT-X-TARGETDURATION:2\n" in out.text, out.text
    durations = [s.duration for s in out.segments]
    assert all(d <= TARGET + FRAME + 0.001 for d in durations[:-1]), durations
    # Every segment starts on its own keyframe: one segment per keyframe sent.
    starts = [s.video[0].dts for s in out.segments]
    assert [round((t - starts[0]) / 90) for t in starts] == [k - keyframes_ms[0] for k in keyframes_ms], (
        starts, keyframes_ms)


def _retimed_1999(clip: media.Clip) -> media.Clip:
    """The clip with every other GOP 1 ms short, as OBS's 2 s keyframe interval
    comes out in RTMP's ms: keyframes 1999, 2000, 1999... ms apart."""
    def shift(t: int) -> int:
        return t - (t // 2000 + 1) // 2

    packets = [dataclasses.replace(p, dts=shift(p.dts), pts=shift(p.dts) + p.cts) for p in clip.packets]
    return dataclasses.replace(clip, packets=packets)


@pytest.mark.timeout(120)
def test_keyframes_1999_ms_apart_give_2_s_segments(server, clips):
    clip = _retimed_1999(clips.get(ClipSpec(gop=60, duration=10.0)))
    keys = [p.dts for p in clip.video if p.keyframe]
    assert {b - a for a, b in zip(keys, keys[1:])} == {1999, 2000}, keys
    name = "obs1999"
    poller = HlsPoller(server.hls_url(name), interval=0.1, max_segments=server.config["hls"]["playlist_size"])
    poller.start()
    media.core_publish(clip, "127.0.0.1", server.rtmp_port, name, paced=True, speed=2.0)
    out = _final(server, name, poller)
    _assert_2_s_segments(out, keys)
    assert_exact(clip, out.segments, segment_target=TARGET, label="keyframes 1999/2000 ms apart")
    server.assert_no_tracebacks()


def _clip_with_forced_keyframes(path, seconds: float, keyframes_s: list[float]):
    """x264 with a 2 s GOP and keyframes forced where a scene cut would put them;
    x264 counts its GOP from the last IDR, as it does after a scene cut."""
    args = [
        FFMPEG, "-hide_banner", "-nostdin", "-v", "error", "-y",
        "-f", "lavfi", "-i", f"testsrc2=size=320x180:rate=30:duration={seconds}",
        "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={seconds}",
        "-c:v", "libx264", "-pix_fmt", "yuv420p", "-preset", "ultrafast", "-tune", "zerolatency",
        "-g", "60", "-keyint_min", "60", "-sc_threshold", "0", "-x264-params", "scenecut=0",
        "-force_key_frames", ",".join(f"{t:g}" for t in keyframes_s),
        "-c:a", "aac", "-ac", "2", "-b:a", "96k", "-f", "flv", str(path),
    ]
    subprocess.run(args, check=True, capture_output=True, timeout=120)
    return read_clip(path)


@pytest.mark.timeout(120)
def test_an_encoder_inserted_early_keyframe_is_a_cut(server, tmp_path, ffmpeg_publisher):
    # 1.833 s into the second segment; the GOP goes on 2 s from there.
    clip = _clip_with_forced_keyframes(tmp_path / "scenecut.flv", 8.0, [0, 2, 3.833, 5.833, 7.833])
    keys = [p.dts for p in clip.video if p.keyframe]
    assert [k - keys[0] for k in keys] == [0, 2000, 3833, 5833, 7833], keys
    name = "scenecut"
    poller = HlsPoller(server.hls_url(name), interval=0.1, max_segments=server.config["hls"]["playlist_size"])
    poller.start()
    proc = ffmpeg_publisher(clip.path, server.rtmp_url(name))
    assert wait_proc(proc, 30) == 0, media.ffmpeg_log(proc)
    out = _final(server, name, poller)
    _assert_2_s_segments(out, keys)
    # The first segment opens on the first audio frame, a frame before the
    # first keyframe here, so it is 2.021 s; then the cut at the forced keyframe.
    assert [round(s.duration, 3) for s in out.segments[1:-1]] == [1.833, 2.0, 2.0]
    assert_exact(clip, out.segments, segment_target=TARGET, label="keyframe forced at 3.833 s")
    server.assert_no_tracebacks()
