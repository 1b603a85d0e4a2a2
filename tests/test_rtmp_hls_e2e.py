"""RTMP in, HLS out, checked frame by frame against the published clip.

Every publishing test runs a viewer (`HlsPoller`) during the publish: it checks
each playlist version (parses with m3u8, media sequence never goes back,
target duration >= every rounded EXTINF and constant, window size) and
downloads every segment once; at the end the whole output is compared with the
clip by `assert_exact` (every frame once, in order, payload-identical, one
constant timestamp offset, segments start on keyframes and are no longer than
target + 1 GOP).
"""

from __future__ import annotations

import dataclasses
import functools
import http.server
import subprocess
import threading
import time

import pytest

import media
from media import (
    AV,
    AUDIO_ONLY,
    BFRAMES,
    LONG_GOP,
    SMALL,
    VIDEO_ONLY,
    HlsPoller,
    assert_exact,
    ffmpeg_log,
    read_hls,
    read_hls_dir,
    split_at_discontinuities,
    wait_for_playlist,
    wait_proc,
)

ENDLIST_WITHIN = 1.5
"""Seconds from the publisher's exit to #EXT-X-ENDLIST ("within ~1 s", plus the
poll interval)."""


def _poller(server, name: str) -> HlsPoller:
    poller = HlsPoller(server.hls_url(name), interval=0.1, max_segments=server.config["hls"]["playlist_size"])
    poller.start()
    return poller


def _finish(server, name: str, poller: HlsPoller, publisher_exit: float) -> media.HlsOutput:
    """Wait for ENDLIST, check the viewer saw a clean live playlist, and return the
    final output (which must equal what the viewer downloaded)."""
    ended = poller.wait_endlist(10)
    poller.stop()
    assert ended, (
        f"no #EXT-X-ENDLIST within 10 s of the publisher's exit; last playlist:\n{poller.last_text}\n"
        f"server log:\n{server.log_tail()}"
    )
    delay = poller.endlist_seen_at - publisher_exit
    assert delay <= ENDLIST_WITHIN, f"#EXT-X-ENDLIST appeared {delay:.2f}s after the publisher stopped"
    poller.assert_clean()
    final = read_hls(server.hls_url(name))
    assert final.endlist
    for seg in final.segments:
        seen = poller.segments.get(seg.seq)
        if seen is not None:
            assert seen.uri == seg.uri and seen.data == seg.data, (
                f"segment #{seg.seq} changed after it was listed ({seen.uri} -> {seg.uri}, "
                f"{len(seen.data)} -> {len(seg.data)} bytes)"
            )
    return final


def _check_published(server, name: str, clip, final, label: str):
    report = assert_exact(clip, final.segments, segment_target=server.config["hls"]["segment_target"], label=label)
    assert server.log_lines(rf"\b{name}\b"), f"no log line names the stream {name}:\n{server.log_tail()}"
    server.assert_no_tracebacks()
    return report


# ---------------------------------------------------------------------------
# the comparison itself, on ffmpeg's own HLS remux (no server involved)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_comparison_accepts_reference_and_catches_damage(clips, tmp_path):
    """`assert_exact` passes on ffmpeg's `-c copy -f hls` remux of a clip and
    fails, naming the frame, on every kind of damage it must catch."""
    clip = clips.get(BFRAMES)
    out_dir = tmp_path / "ref"
    out_dir.mkdir()
    subprocess.run(
        [media.FFMPEG, "-v", "error", "-i", str(clip.path), "-c", "copy", "-f", "hls",
         "-hls_time", "2", "-hls_list_size", "0", str(out_dir / "index.m3u8")],
        check=True, timeout=60,
    )
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(tmp_path))
    )
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        out = read_hls(f"http://127.0.0.1:{httpd.server_address[1]}/ref/index.m3u8")
    finally:
        httpd.shutdown()
    # The ffmpeg CLI re-times copied AAC to sample precision when the output time
    # base is finer (ms -> 90 kHz), hence the 1 ms audio tolerance for this
    # reference only; video must match exactly.
    report = assert_exact(clip, out.segments, segment_target=2.0, audio_ts_tolerance=91)
    assert report.video_frames == len(clip.video) and report.audio_frames == len(clip.audio)
    assert sum(p.cts != 0 for p in clip.video) > len(clip.video) // 2, "B-frame clip has no cts"
    assert len({p.cts for p in clip.video}) > 1

    def damaged(mutate):
        segs = [dataclasses.replace(s, _frames=None) for s in out.segments]
        for s in segs:
            s.frames()
        mutate(segs)
        with pytest.raises(AssertionError) as info:
            assert_exact(clip, segs, segment_target=2.0, audio_ts_tolerance=91)
        return str(info.value)

    assert "missing" in damaged(lambda s: s[1].video.pop(5))
    assert "duplicate" in damaged(lambda s: s[1].audio.insert(5, s[1].audio[4]))

    def alter(s):
        f = s[2].video[3]
        f.payload = (f.payload[0][:-1] + b"\x01",) + f.payload[1:]

    assert "payload differs" in damaged(alter)

    def shift(s):
        s[2].video[3].dts += 1

    assert "not continuous" in damaged(shift)

    def no_key(s):
        s[1].video.insert(0, s[0].video.pop())

    assert "non-keyframe" in damaged(no_key)
    assert "DISCONTINUITY" in damaged(lambda s: setattr(s[2], "discontinuity", True))

    def long_segment(s):
        s[1].duration = 3.5

    assert "EXTINF" in damaged(long_segment)


# ---------------------------------------------------------------------------
# publishers


@pytest.mark.parametrize(
    "spec",
    [AV, BFRAMES, AUDIO_ONLY, VIDEO_ONLY, LONG_GOP],
    ids=["h264-aac", "bframes", "audio-only", "video-only", "gop-3s"],
)
def test_ffmpeg_publish_is_exact(server, clips, ffmpeg_publisher, spec):
    """ffmpeg -re -i clip.flv -c copy -f flv rtmp://.../live/NAME: the HLS output
    holds exactly the clip."""
    clip = clips.get(spec)
    name = f"cam-{spec.kind}-bf{spec.bframes}-g{spec.gop}"
    poller = _poller(server, name)
    proc = ffmpeg_publisher(clip.path, server.rtmp_url(name))
    rc = wait_proc(proc, spec.duration + 30)
    exited = time.monotonic()
    assert rc == 0, f"ffmpeg failed ({rc}):\n{ffmpeg_log(proc)}\nserver log:\n{server.log_tail()}"
    final = _finish(server, name, poller, exited)
    report = _check_published(server, name, clip, final, f"ffmpeg {spec.kind} bf={spec.bframes}")
    if spec.has_video:
        assert report.video_frames == len(clip.video)
    if spec.has_audio:
        assert report.audio_frames == len(clip.audio)
    assert final.playlist.version == 3 or "#EXT-X-VERSION:3" in final.text


@pytest.mark.parametrize("spec,paced", [(AV, True), (BFRAMES, False)], ids=["paced", "burst"])
def test_pyav_publish_is_exact(server, clips, spec, paced):
    """PyAV's own FLV/RTMP muxer publishes the clip's packets, in real time or
    as fast as the server reads them."""
    clip = clips.get(spec)
    name = f"pyav-{'paced' if paced else 'burst'}"
    poller = _poller(server, name)
    sent = media.pyav_publish(clip, server.rtmp_url(name), paced=paced)
    exited = time.monotonic()
    assert sent == len(clip.packets)
    final = _finish(server, name, poller, exited)
    _check_published(server, name, clip, final, f"pyav paced={paced}")


def test_sliding_window_viewer_gets_every_frame(server_factory, clips, ffmpeg_publisher):
    """playlist_size=3, 1 s segments: the live playlist never lists more than 3
    segments, old segments are deleted from disk, and a viewer that follows the
    live playlist still downloads every frame exactly once."""
    server = server_factory(hls={"segment_target": 1.0, "playlist_size": 3})
    clip = clips.get(AV)
    name = "window"
    poller = _poller(server, name)
    proc = ffmpeg_publisher(clip.path, server.rtmp_url(name))
    rc = wait_proc(proc, 40)
    exited = time.monotonic()
    assert rc == 0, ffmpeg_log(proc)
    final = _finish(server, name, poller, exited)
    assert len(final.segments) <= 3
    seen = poller.ordered()
    assert len(seen) >= 6, f"expected ~8 one-second segments, the viewer saw {len(seen)}"
    assert_exact(clip, seen, segment_target=1.0, label="live viewer, window of 3")
    on_disk = sorted(p.name for p in server.hls_dir(name).glob("*.ts"))
    assert seen[0].uri not in on_disk, f"oldest segment {seen[0].uri} still on disk: {on_disk}"
    assert len(on_disk) <= 3 + 3, f"old segments not deleted: {on_disk}"
    server.assert_no_tracebacks()


def test_republish_same_name_continues_with_discontinuity(server, clips, ffmpeg_publisher):
    """Publish, stop, publish again on the same name: the playlist goes on (media
    sequence continues), with one EXT-X-DISCONTINUITY at the republish, and each
    publish is exact."""
    first, second = clips.get(AV), clips.get(dataclasses.replace(AV, tone=880))
    name = "again"
    poller = _poller(server, name)
    proc = ffmpeg_publisher(first.path, server.rtmp_url(name))
    assert wait_proc(proc, 40) == 0, ffmpeg_log(proc)
    assert poller.wait_endlist(5), f"no ENDLIST after the first publish:\n{poller.last_text}"
    seqs_first = sorted(poller.segments)
    proc = ffmpeg_publisher(second.path, server.rtmp_url(name))
    # The playlist must go live again (ENDLIST removed) while the second publish runs.
    wait_for_playlist(server.hls_url(name), 10, lambda t: "#EXT-X-ENDLIST" not in t)
    assert wait_proc(proc, 40) == 0, ffmpeg_log(proc)
    exited = time.monotonic()
    final = _finish(server, name, poller, exited)
    groups = split_at_discontinuities(final.segments)
    assert len(groups) == 2, (
        f"expected exactly one EXT-X-DISCONTINUITY (at the republish), got {len(groups) - 1}:\n{final.text}"
    )
    assert groups[1][0].seq == seqs_first[-1] + 1, (
        f"second publish starts at media sequence {groups[1][0].seq}, first ended at {seqs_first[-1]}"
    )
    assert final.text.count("#EXT-X-DISCONTINUITY\n") == 1, final.text
    assert_exact(first, groups[0], segment_target=2.0, label="first publish")
    assert_exact(second, groups[1], segment_target=2.0, label="republish")
    server.assert_no_tracebacks()


def test_second_publisher_on_live_name_is_refused(server, clips, ffmpeg_publisher):
    """on_conflict = "refuse": a second publisher on a live name fails, the log
    says why, and the first publisher's output stays exact."""
    clip = clips.get(AV)
    name = "taken"
    poller = _poller(server, name)
    first = ffmpeg_publisher(clip.path, server.rtmp_url(name))
    wait_for_playlist(server.hls_url(name), 10)
    intruder = ffmpeg_publisher(clips.get(SMALL).path, server.rtmp_url(name))
    rc = wait_proc(intruder, 15, "second publisher")
    assert rc != 0, (
        f"the second publisher on a live name was not refused (ffmpeg exited 0):\n{ffmpeg_log(intruder)}"
    )
    assert first.poll() is None, "the first publisher died when the second one was refused"
    refusals = server.log_lines(rf"{name}.*(refus|conflict|already|in use|busy)|(refus|conflict|already|in use|busy).*{name}")
    assert refusals, f"no log line explains the refusal of the second publisher:\n{server.log_tail()}"
    assert wait_proc(first, 40) == 0, ffmpeg_log(first)
    exited = time.monotonic()
    final = _finish(server, name, poller, exited)
    _check_published(server, name, clip, final, "first publisher, after a refused second one")


def test_sigterm_mid_stream_ends_playlist_and_exits_0(server, clips, ffmpeg_publisher):
    """SIGTERM while a stream is live: exit code 0, the playlist on disk ends with
    EXT-X-ENDLIST and holds an exact prefix of the clip."""
    clip = clips.get(AV)
    name = "term"
    proc = ffmpeg_publisher(clip.path, server.rtmp_url(name))
    wait_for_playlist(server.hls_url(name), 10, lambda t: t.count("#EXTINF") >= 2)
    t0 = time.monotonic()
    rc = server.stop(timeout=15)
    took = time.monotonic() - t0
    assert rc == 0, f"exit code {rc} after SIGTERM; log:\n{server.log_tail()}"
    assert took < 5, f"the server took {took:.1f}s to stop"
    out = read_hls_dir(server.hls_dir(name))
    assert out.endlist, f"playlist without EXT-X-ENDLIST after SIGTERM:\n{out.text}"
    report = assert_exact(clip, out.segments, segment_target=2.0, prefix=True, label="stopped by SIGTERM")
    assert report.video_frames >= 60, f"only {report.video_frames} video frames written"
    # The publisher's connection went away with the server.
    wait_proc(proc, 15, "publisher after server stop")
    server.assert_no_tracebacks()


def test_on_conflict_replace_hands_the_name_over(server_factory, clips, ffmpeg_publisher):
    """on_conflict = "replace": the second publisher takes the name over, the
    first is disconnected; what the first sent is an exact prefix, then one
    EXT-X-DISCONTINUITY, then exactly the second clip."""
    server = server_factory(publish={"on_conflict": "replace"})
    first_clip, second_clip = clips.get(AV), clips.get(BFRAMES)
    name = "handover"
    poller = _poller(server, name)
    first = ffmpeg_publisher(first_clip.path, server.rtmp_url(name))
    wait_for_playlist(server.hls_url(name), 10, lambda t: t.count("#EXTINF") >= 1)
    second = ffmpeg_publisher(second_clip.path, server.rtmp_url(name))
    wait_proc(first, 15, "the replaced publisher")  # it must be disconnected, whatever its exit code
    assert wait_proc(second, 40) == 0, ffmpeg_log(second)
    exited = time.monotonic()
    final = _finish(server, name, poller, exited)
    groups = split_at_discontinuities(final.segments)
    assert len(groups) == 2, f"expected one EXT-X-DISCONTINUITY at the hand-over:\n{final.text}"
    assert server.log_lines(r"replace"), f"the hand-over is not logged:\n{server.log_tail()}"
    problems = []
    for args, kwargs in (
        ((first_clip, groups[0]), {"prefix": True, "label": "replaced publisher"}),
        ((second_clip, groups[1]), {"label": "replacing publisher"}),
    ):
        try:
            assert_exact(*args, segment_target=2.0, **kwargs)
        except AssertionError as exc:
            problems.append(str(exc))
    assert not problems, "\n".join(problems)
    server.assert_no_tracebacks()


def test_name_is_free_again_right_after_its_publisher_vanishes(server, clips, ffmpeg_publisher):
    """A publisher that vanishes (TCP reset) mid-stream frees its name at once:
    a new publisher on it is accepted (on_conflict = "refuse"), and both
    outputs are exact (the first one up to where it vanished)."""
    import socket
    import struct

    clip = clips.get(AV)
    name = "phoenix"
    poller = _poller(server, name)
    pub = media.CorePublisher("127.0.0.1", server.rtmp_port, name)
    pub.open()
    counts = {"video": 0, "audio": 0}
    start = time.monotonic()
    for kind, ts, body in media.flv_tag_bodies(clip):
        if ts >= 2500:
            break
        delay = start + ts / 1000 - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        pub.send(kind, ts, body)
        if not media.is_sequence_header(body):
            counts[kind] += 1
    time.sleep(0.3)
    pub.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    pub.sock.close()
    time.sleep(0.2)
    second = dataclasses.replace(AV, tone=660)
    proc = ffmpeg_publisher(clips.path(second), server.rtmp_url(name))
    rc = wait_proc(proc, 40)
    exited = time.monotonic()
    assert rc == 0, (
        f"republish right after the first publisher vanished failed ({rc}):\n{ffmpeg_log(proc)}\n"
        f"{server.log_tail()}"
    )
    final = _finish(server, name, poller, exited)
    groups = split_at_discontinuities(final.segments)
    assert len(groups) == 2, final.text
    report = assert_exact(clip, groups[0], segment_target=2.0, prefix=True, label="vanished publisher")
    assert (report.video_frames, report.audio_frames) == (counts["video"], counts["audio"]), (
        f"the vanished publisher sent {counts} complete frames; the output holds "
        f"{report.video_frames} video and {report.audio_frames} audio frames"
    )
    assert_exact(clips.get(second), groups[1], segment_target=2.0, label="republish")
    server.assert_no_tracebacks()
