"""Counters read back from a segment on disk: what a restarted writer would continue from."""

import os
import threading

import pytest

from mediaserver.hls import tspack
from mediaserver.hls.segmenter import HlsWriter
from mediaserver.hls.ts_resume import counters_after, next_counters

from flv_clip import flv_clip


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return flv_clip(tmp_path_factory.mktemp("clip") / "clip.flv", "320x180")


def test_counters_after_match_the_writer_state(tmp_path, clip):
    video, audio, packets = clip
    writer = HlsWriter(tmp_path, playlist_size=5, segment_target=1.0)
    writer.set_codec("video", video)
    writer.set_codec("audio", audio)
    sequence, start = 0, packets[0][1]
    writer.start_segment(0, False)
    for kind, dts, pts, key, data in packets:
        if kind == "video" and key and dts - start >= 1000:
            writer.end_segment(sequence, dts - start)
            sequence, start = sequence + 1, dts
            writer.start_segment(sequence, False)
        writer.write(kind, dts, pts, key, data)
    writer.end_segment(sequence, 1000)
    assert sequence >= 2, "the clip must give several segments"
    expected = {pid: cc for pid, cc in writer.to_state().ts.cc.items()}
    got = next_counters(tmp_path, f"seg{sequence}.ts")
    assert got == expected
    # Every PID of the program is there, and not all counters are trivially 0.
    assert set(got) == {tspack.PID_PAT, tspack.PID_PMT, tspack.PID_VIDEO, tspack.PID_AUDIO}
    assert any(cc for cc in got.values())


def test_packets_without_payload_do_not_count():
    packetiser = tspack.Packetiser()
    data = packetiser.pes(tspack.PID_AUDIO, tspack.SID_AUDIO, 900, 900, b"\xaa" * 500)
    # An adaptation-field-only packet (afc = 2) with a counter that must be ignored.
    af_only = bytes((0x47, tspack.PID_AUDIO >> 8, tspack.PID_AUDIO & 0xFF, 0x20 | 0x0F, 183, 0)) + b"\xff" * 182
    assert counters_after(data + af_only) == packetiser.state.cc == {tspack.PID_AUDIO: 3}


@pytest.mark.parametrize(
    "data",
    [b"", b"\x47" * 187, b"\x00" * 188, b"\x47" + b"\x00" * 187 + b"\x48" + b"\x00" * 187],
    ids=["empty", "short", "no-sync", "lost-sync"],
)
def test_not_ts_gives_no_counters(data):
    assert counters_after(data) == {}


def test_untrusted_entries_give_no_counters_and_never_block(tmp_path):
    outside = tmp_path / "outside.ts"
    outside.write_bytes(tspack.Packetiser().pes(tspack.PID_VIDEO, tspack.SID_VIDEO, 0, 0, b"\x01" * 1000))
    os.symlink(outside, tmp_path / "seg1.ts")
    os.mkfifo(tmp_path / "seg2.ts")
    (tmp_path / "seg3.ts").mkdir()
    results = {}

    def read_all():
        for name in ("seg1.ts", "seg2.ts", "seg3.ts", "seg4.ts", "../outside.ts", "index.m3u8"):
            results[name] = next_counters(tmp_path, name)

    reader = threading.Thread(target=read_all, daemon=True)
    reader.start()
    reader.join(5)
    assert not reader.is_alive(), "reading a planted FIFO blocked"
    assert results == {name: {} for name in results} and len(results) == 6
