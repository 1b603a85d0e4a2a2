"""The HLS writer: MPEG-TS segments from our packetiser, playlists written atomically and at once."""


import av
import m3u8
import pytest

from mediaserver.hls.playlist import SegmentEntry, render, target_duration
from mediaserver.hls.segmenter import HlsWriter, aac_rate_and_channels

from flv_clip import flv_clip


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return flv_clip(tmp_path_factory.mktemp("clip") / "clip.flv", "160x120")


def test_playlist_is_complete_when_end_segment_returns(tmp_path, clip):
    video, audio, packets = clip
    writer = HlsWriter(tmp_path, playlist_size=3, segment_target=1.0)
    writer.set_codec("video", video)
    writer.set_codec("audio", audio)
    writer.start_segment(0, False)
    for kind, dts, pts, key, data in packets:
        writer.write(kind, dts, pts, key, data)
    writer.end_segment(0, 3000)
    playlist = m3u8.loads((tmp_path / "index.m3u8").read_text())
    assert [s.uri for s in playlist.segments] == ["seg0.ts"]
    assert playlist.segments[0].duration == pytest.approx(3.0)
    with av.open(str(tmp_path / "seg0.ts")) as seg:
        counts = {"video": 0, "audio": 0}
        for packet in seg.demux():
            if packet.size:
                counts[packet.stream.type] += 1
    assert counts == {
        "video": sum(1 for p in packets if p[0] == "video"),
        "audio": sum(1 for p in packets if p[0] == "audio"),
    }
    writer.end_stream()
    assert m3u8.loads((tmp_path / "index.m3u8").read_text()).is_endlist


def test_window_slides_deletes_old_segments_and_counts_discontinuities(tmp_path, clip):
    video, _, packets = clip
    writer = HlsWriter(tmp_path, playlist_size=2, segment_target=1.0)
    writer.set_codec("video", video)
    first_key = next(p for p in packets if p[0] == "video" and p[3])
    for seq in range(6):
        writer.start_segment(seq, seq == 1)
        writer.write("video", first_key[1] + seq * 1000, first_key[2] + seq * 1000, True, first_key[4])
        writer.end_segment(seq, 1000)
    playlist = m3u8.loads((tmp_path / "index.m3u8").read_text())
    assert playlist.media_sequence == 4
    assert playlist.discontinuity_sequence == 1
    on_disk = sorted(p.name for p in tmp_path.glob("seg*.ts"))
    assert "seg0.ts" not in on_disk and "seg5.ts" in on_disk


def test_target_duration_covers_every_segment():
    entries = [SegmentEntry(0, "a", 2.0, False), SegmentEntry(1, "b", 3.6, False)]
    assert target_duration(entries, 2.0) == 4
    text = render(entries, target=4, discontinuity_sequence=0, ended=True)
    parsed = m3u8.loads(text)
    assert parsed.target_duration == 4 and parsed.is_endlist


def test_aac_config_parse():
    assert aac_rate_and_channels(b"\x11\x90") == (48000, 2)
    assert aac_rate_and_channels(b"\x12\x08") == (44100, 1)


def test_target_duration_never_goes_down(tmp_path, clip):
    video, _, packets = clip
    writer = HlsWriter(tmp_path, playlist_size=2, segment_target=2.0)
    writer.set_codec("video", video)
    key = next(p for p in packets if p[0] == "video" and p[3])
    targets = []
    for seq, duration in enumerate([2000, 4400, 2000, 2000, 2000]):
        writer.start_segment(seq, False)
        writer.write("video", key[1] + seq * 5000, key[2] + seq * 5000, True, key[4])
        writer.end_segment(seq, duration)
        targets.append(m3u8.loads((tmp_path / "index.m3u8").read_text()).target_duration)
    # The 4.4 s segment has left the window by the end, but the target stays.
    assert targets == [2, 4, 4, 4, 4]
