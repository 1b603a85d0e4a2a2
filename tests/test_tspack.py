"""Our MPEG-TS packetiser and the HLS writer on it, checked byte by byte.

The checks in ts_check.py are written from the spec, separately from the
packetiser; the payload round trip goes through PyAV's (FFmpeg's) demuxer and
ffprobe, real parts a player would use.
"""

from __future__ import annotations

import io
import os
import subprocess
import time

import av
import msgspec
import pytest

from mediaserver.hls import tspack
from mediaserver.hls.elementary import AdtsFraming, H264Framing
from mediaserver.hls.segmenter import HlsWriter, UnsafeStreamPath, WriterState
from media import compared_nals, split_adts, split_annexb, split_avcc
from ts_check import cc_breaks, parse_packets, parse_pes, parse_psi, pat_programs, pmt_streams


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "clip.flv"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc2=size=320x240:rate=30",
         "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000", "-t", "4",
         "-c:v", "libx264", "-g", "30", "-bf", "2", "-preset", "ultrafast", "-c:a", "aac", "-f", "flv", str(path)],
        check=True,
    )
    with av.open(str(path)) as src:
        video = src.streams.video[0].codec_context.extradata
        audio = src.streams.audio[0].codec_context.extradata
        packets = [(p.stream.type, int(p.dts), int(p.pts), p.is_keyframe, bytes(p)) for p in src.demux() if p.size]
    return video, audio, packets


def write_segments(directory, clip, *, seconds_per_segment: int = 1, writer=None, until=None):
    """Cut `clip` at keyframes about every second, as logic would."""
    video, audio, packets = clip
    writer = writer or HlsWriter(directory, playlist_size=20, segment_target=1.0)
    writer.set_codec("video", video)
    writer.set_codec("audio", audio)
    seq, start = 0, packets[0][1]
    writer.start_segment(seq, False)
    for kind, dts, pts, key, data in packets[:until]:
        if kind == "video" and key and dts - start >= 1000 * seconds_per_segment:
            writer.end_segment(seq, dts - start)
            seq, start = seq + 1, dts
            writer.start_segment(seq, False)
        writer.write(kind, dts, pts, key, data)
    return writer, seq


# -- PSI -----------------------------------------------------------------------


@pytest.mark.parametrize("video,audio", [(True, True), (False, True), (True, False)])
def test_pat_and_pmt_parse_back_with_correct_crc(video, audio):
    ts = tspack.Packetiser()
    data = ts.psi(tspack.PID_PAT, tspack.pat_section()) + ts.psi(tspack.PID_PMT, tspack.pmt_section(video, audio))
    pat, pmt = parse_packets(data)
    assert (pat.pid, pmt.pid) == (0, 0x1000)
    assert pat_programs(parse_psi(pat)) == {1: 0x1000}
    pcr_pid, streams = pmt_streams(parse_psi(pmt))
    expected = ({0x100: 0x1B} if video else {}) | ({0x101: 0x0F} if audio else {})
    assert streams == expected
    assert pcr_pid == (0x100 if video else 0x101)


def test_psi_crc_catches_a_flipped_bit():
    ts = tspack.Packetiser()
    data = bytearray(ts.psi(tspack.PID_PMT, tspack.pmt_section(True, True)))
    data[10] ^= 0x01
    with pytest.raises(AssertionError, match="bad CRC"):
        parse_psi(parse_packets(bytes(data))[0])


# -- PES -----------------------------------------------------------------------

_EDGE_SIZES = [0, 1, 2, 150, 154, 155, 156, 160, 161, 162, 170, 171, 172, 183, 184, 185,
               338, 339, 340, 341, 352, 353, 354, 1000, 1104, 1105, 1106, 5000, 70000]


@pytest.mark.parametrize("pcr", [False, True])
@pytest.mark.parametrize("size", _EDGE_SIZES)
def test_pes_packets_parse_back(size, pcr):
    payload = os.urandom(size)
    ts = tspack.Packetiser()
    pts, dts = 123456789, 123450000
    data = ts.pes(0x100, tspack.SID_VIDEO, pts, dts, payload, pcr=dts - 9000 if pcr else None, random_access=pcr)
    packets = parse_packets(data)
    [pes] = parse_pes(packets, {0x100})
    assert pes.data == payload
    assert (pes.pts, pes.dts) == (pts, dts)
    assert pes.stream_id == 0xE0
    first = packets[0]
    assert first.pusi and all(not p.pusi for p in packets[1:])
    assert (first.pcr, first.random_access) == ((dts - 9000, True) if pcr else (None, False))
    # An adaptation field only where it carries something: the first packet
    # (PCR/RAI) and the last (stuffing).
    assert all(p.af_length is None for p in packets[1:-1])
    assert [p.cc for p in packets] == [i & 0x0F for i in range(len(packets))]
    # Nothing wasted: only the last packet is stuffed.
    header = 9 + 10
    af = 8 if pcr else 0
    assert len(packets) == max(1, -(-(size + header + af) // 184))


def test_audio_pes_has_its_length_and_pts_only():
    ts = tspack.Packetiser()
    frame = os.urandom(300)
    [pes] = parse_pes(parse_packets(ts.pes(0x101, tspack.SID_AUDIO, 900, 900, frame)), {0x101})
    assert pes.declared_length == 3 + 5 + 300
    assert (pes.pts, pes.dts, pes.data) == (900, 900, frame)


def test_continuity_counters_follow_each_pid_across_calls():
    ts = tspack.Packetiser()
    chunks = []
    for i in range(40):
        chunks.append(ts.pes(0x100, tspack.SID_VIDEO, i * 3000, i * 3000, os.urandom(100 + i * 97)))
        chunks.append(ts.pes(0x101, tspack.SID_AUDIO, i * 1920, i * 1920, os.urandom(20 + i)))
        if i % 7 == 0:
            chunks.append(ts.psi(tspack.PID_PAT, tspack.pat_section()))
    assert cc_breaks([b"".join(chunks)]) == []
    # The checker itself sees a break.
    broken = b"".join(chunks[:3] + chunks[4:])
    assert cc_breaks([broken]) != []


def test_state_carries_counters_to_a_new_packetiser():
    one = tspack.Packetiser()
    a = one.pes(0x100, tspack.SID_VIDEO, 0, 0, os.urandom(1000))
    builtins = msgspec.to_builtins(one.state)
    two = tspack.Packetiser(msgspec.convert(builtins, tspack.TsState, strict=False))
    b = two.pes(0x100, tspack.SID_VIDEO, 3000, 3000, os.urandom(1000))
    assert cc_breaks([a, b]) == []


def test_timestamps_wrap_at_33_bits():
    wrap_ms = tspack.TS_WRAP // 90  # 95443717 ms, 26.5 h
    assert tspack.ticks(wrap_ms) == (wrap_ms * 90) % (1 << 33)
    assert tspack.ticks(wrap_ms + 1) < 1000
    ts = tspack.Packetiser()
    pts = tspack.ticks(wrap_ms + 50)
    dts = tspack.ticks(wrap_ms - 10)
    [pes] = parse_pes(parse_packets(ts.pes(0x100, tspack.SID_VIDEO, pts, dts, b"x" * 500)), {0x100})
    assert (pes.pts, pes.dts) == (pts, dts)
    assert dts > pts  # the wrap happened between them
    assert tspack.pcr_for(wrap_ms + 200) == tspack.ticks(wrap_ms + 100)


# -- framing -------------------------------------------------------------------


def test_avcc_becomes_annexb_with_aud_and_parameter_sets_on_keyframes(clip):
    video, _, packets = clip
    framing = H264Framing(video)
    key = next(p for p in packets if p[0] == "video" and p[3])
    other = next(p for p in packets if p[0] == "video" and not p[3])
    key_nals = split_annexb(framing.annexb(key[4], True))
    other_nals = split_annexb(framing.annexb(other[4], False))
    assert [n[0] & 0x1F for n in key_nals[:3]] == [9, 7, 8]
    assert other_nals[0][0] & 0x1F == 9 and 7 not in [n[0] & 0x1F for n in other_nals]
    assert compared_nals(key_nals) == compared_nals(split_avcc(key[4]))
    assert compared_nals(other_nals) == compared_nals(split_avcc(other[4]))


def test_bad_avcc_is_a_clear_error(clip):
    framing = H264Framing(clip[0])
    with pytest.raises(ValueError, match="overruns"):
        framing.annexb(b"\x00\x00\x10\x00\x65abc", True)
    with pytest.raises(ValueError, match="AVCDecoderConfigurationRecord"):
        H264Framing(b"\x02\x00")


def test_adts_header_from_the_audio_config(clip):
    _, audio, packets = clip
    adts = AdtsFraming(audio)
    frame = next(p[4] for p in packets if p[0] == "audio")
    data = adts.header(len(frame)) + frame
    assert split_adts(data) == [frame]
    with av.open(io.BytesIO(data * 3), format="aac") as c:
        assert c.streams.audio[0].codec_context.sample_rate == 48000
        assert c.streams.audio[0].codec_context.channels == 1


# -- the writer ----------------------------------------------------------------


def test_writer_output_demuxes_to_the_input_payloads(tmp_path, clip):
    writer, last = write_segments(tmp_path, clip)
    writer.end_segment(last, 1000)
    writer.end_stream()
    out_video, out_audio = [], []
    segments = []
    for seq in range(last + 1):
        data = (tmp_path / f"seg{seq}.ts").read_bytes()
        segments.append(data)
        packets = parse_packets(data)
        assert [p.pid for p in packets[:2]] == [0, 0x1000], f"seg{seq}: PAT+PMT not first"
        with av.open(io.BytesIO(data), format="mpegts") as c:
            for p in c.demux():
                if p.size:
                    (out_video if p.stream.type == "video" else out_audio).append((int(p.dts), int(p.pts), bytes(p)))
        proc = subprocess.run(["ffprobe", "-v", "error", "-f", "mpegts", "-show_frames", "-of", "compact", "-"],
                              input=data, capture_output=True, timeout=60)
        assert proc.returncode == 0 and not proc.stderr, proc.stderr.decode()[:2000]
    assert cc_breaks(segments) == []
    _, _, packets = clip
    in_video = [p for p in packets if p[0] == "video"]
    in_audio = [p for p in packets if p[0] == "audio"]
    assert len(out_video) == len(in_video) and len(out_audio) == len(in_audio)
    for (dts, pts, data), src in zip(out_video, in_video):
        assert (dts, pts) == (src[1] * 90, src[2] * 90)
        assert compared_nals(split_annexb(data)) == compared_nals(split_avcc(src[4]))
    for (dts, pts, data), src in zip(out_audio, in_audio):
        assert pts == src[2] * 90
        assert split_adts(data) == [src[4]]
    proc = subprocess.run(["ffmpeg", "-v", "warning", "-i", str(tmp_path / "index.m3u8"), "-f", "null", "-"],
                          capture_output=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == b"", proc.stderr.decode()[:2000]


def test_counters_go_on_across_a_discontinuity_too(tmp_path, clip):
    """A republish's EXT-X-DISCONTINUITY would allow a restart, but FFmpeg's HLS
    demuxer reports "Packet corrupt" at one: the counters go on."""
    video, _, packets = clip
    writer = HlsWriter(tmp_path, playlist_size=10, segment_target=1.0)
    writer.set_codec("video", video)
    frames = [p for p in packets if p[0] == "video"][:30]
    for seq in range(4):
        writer.start_segment(seq, seq == 2)
        for kind, dts, pts, key, data in frames[:7]:
            writer.write(kind, dts + seq * 1000, pts + seq * 1000, key, data)
        writer.end_segment(seq, 1000)
    segs = [(tmp_path / f"seg{i}.ts").read_bytes() for i in range(4)]
    assert "#EXT-X-DISCONTINUITY\n#EXTINF:1.000,\nseg2.ts" in (tmp_path / "index.m3u8").read_text()
    assert cc_breaks(segs) == []
    assert parse_packets(segs[0])[0].cc == 0 and parse_packets(segs[2])[0].cc == 2


def test_abandoned_segment_does_not_advance_counters(tmp_path, clip):
    video, _, packets = clip
    writer = HlsWriter(tmp_path, playlist_size=10, segment_target=1.0)
    writer.set_codec("video", video)
    key = next(p for p in packets if p[0] == "video" and p[3])
    writer.start_segment(0, False)
    writer.write("video", key[1], key[2], True, key[4])
    writer.end_segment(0, 1000)
    writer.start_segment(1, False)
    writer.write("video", key[1] + 1000, key[2] + 1000, True, key[4])
    writer.start_segment(2, False)  # 1 is abandoned (logged) and deleted
    writer.write("video", key[1] + 2000, key[2] + 2000, True, key[4])
    writer.end_segment(2, 1000)
    assert not (tmp_path / "seg1.ts").exists()
    assert cc_breaks([(tmp_path / "seg0.ts").read_bytes(), (tmp_path / "seg2.ts").read_bytes()]) == []


def test_writer_state_round_trips_through_builtins_mid_segment(tmp_path, clip):
    """A writer rebuilt from its state's builtins (as a hand-over would) goes on
    writing the open segment: the files equal those of one writer doing it all."""
    one_dir, two_dir = tmp_path / "one", tmp_path / "two"
    whole, last = write_segments(one_dir, clip)
    whole.end_segment(last, 1000)
    half = len(clip[2]) // 2
    first, _ = write_segments(two_dir, clip, until=half)
    builtins = msgspec.to_builtins(first.to_state())
    assert builtins["version"] == 1 and builtins["ts"]["cc"]
    encoded = msgspec.json.encode(builtins)
    state = msgspec.convert(msgspec.json.decode(encoded), WriterState, strict=False)
    first._file.close()  # noqa: SLF001 - the old process goes away without ending anything
    first._file = None  # noqa: SLF001
    second = HlsWriter(two_dir, playlist_size=20, segment_target=1.0, state=state)
    assert second.entries == first.entries and second.next_sequence == first.next_sequence
    video, audio, packets = clip
    seq = state.open_sequence
    start = state.open_first_dts
    for kind, dts, pts, key, data in packets[half:]:
        if kind == "video" and key and dts - start >= 1000:
            second.end_segment(seq, dts - start)
            seq, start = seq + 1, dts
            second.start_segment(seq, False)
        second.write(kind, dts, pts, key, data)
    second.end_segment(seq, 1000)
    assert seq == last
    for i in range(last + 1):
        assert (one_dir / f"seg{i}.ts").read_bytes() == (two_dir / f"seg{i}.ts").read_bytes(), f"seg{i}"
    assert (one_dir / "index.m3u8").read_text() == (two_dir / "index.m3u8").read_text()
    assert second.frames_out == whole.frames_out and second.bytes_out == whole.bytes_out


def test_a_track_the_open_segment_does_not_list_waits_for_the_next(tmp_path, clip):
    video, audio, packets = clip
    writer = HlsWriter(tmp_path, playlist_size=10, segment_target=1.0)
    writer.set_codec("video", video)
    writer.start_segment(0, False)
    writer.set_codec("audio", audio)
    frame = next(p for p in packets if p[0] == "audio")
    with pytest.raises(RuntimeError, match="no open segment has a audio stream"):
        writer.write("audio", frame[1], frame[2], True, frame[4])
    writer.end_segment(0, 1000)
    writer.start_segment(1, False)
    writer.write("audio", frame[1], frame[2], True, frame[4])
    writer.end_segment(1, 1000)
    _, streams = pmt_streams(parse_psi(parse_packets((tmp_path / "seg1.ts").read_bytes())[1]))
    assert streams == {0x100: 0x1B, 0x101: 0x0F}


def test_a_new_process_continues_the_counters_of_the_playlist_it_recovers(tmp_path, clip):
    writer, last = write_segments(tmp_path, clip)
    writer.end_segment(last, 1000)
    # The process dies here (no end_stream); a new one recovers the playlist.
    again = HlsWriter(tmp_path, playlist_size=20, segment_target=1.0)
    assert again.ended and again.next_sequence == last + 1
    again.set_codec("video", clip[0])
    again.set_codec("audio", clip[1])
    again.start_segment(again.next_sequence, True)
    for kind, dts, pts, key, data in clip[2][:40]:
        again.write(kind, dts, pts, key, data)
    again.end_segment(last + 1, 1000)
    segs = [(tmp_path / f"seg{i}.ts").read_bytes() for i in range(last + 2)]
    assert cc_breaks(segs) == []
    assert "#EXT-X-DISCONTINUITY" in (tmp_path / "index.m3u8").read_text()


def test_unknown_state_field_is_refused():
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"version": 1, "surprise": 1}, WriterState)


# -- the data directory trusted only for what the writer made ----------------------------


def test_symlinked_stream_directory_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "hls"
    root.mkdir()
    (root / "evil").symlink_to(outside)
    with pytest.raises(UnsafeStreamPath, match="symlink"):
        HlsWriter(root / "evil", playlist_size=3, segment_target=1.0)
    assert list(outside.iterdir()) == []


def test_fifo_named_like_a_segment_is_refused_without_blocking(tmp_path, clip):
    writer = HlsWriter(tmp_path, playlist_size=3, segment_target=1.0)
    writer.set_codec("video", clip[0])
    os.mkfifo(tmp_path / "seg3.ts")
    started = time.monotonic()
    with pytest.raises(UnsafeStreamPath, match="regular file"):
        writer.start_segment(3, False)
    assert time.monotonic() - started < 1.0
    # The writer is still usable for the next segment.
    writer.start_segment(4, False)
    key = next(p for p in clip[2] if p[0] == "video" and p[3])
    writer.write("video", key[1], key[2], True, key[4])
    writer.end_segment(4, 1000)
    assert (tmp_path / "seg4.ts").stat().st_size > 0


def test_symlinked_segment_is_not_followed(tmp_path, clip):
    target = tmp_path / "victim"
    target.write_bytes(b"precious")
    stream = tmp_path / "stream"
    writer = HlsWriter(stream, playlist_size=3, segment_target=1.0)
    writer.set_codec("video", clip[0])
    (stream / "seg0.ts").symlink_to(target)
    with pytest.raises(UnsafeStreamPath):
        writer.start_segment(0, False)
    assert target.read_bytes() == b"precious"


def test_fifo_playlist_and_symlinked_temp_file_are_not_opened(tmp_path, clip):
    stream = tmp_path / "stream"
    stream.mkdir()
    os.mkfifo(stream / "index.m3u8")
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (stream / ".index.m3u8.tmp").symlink_to(victim)
    started = time.monotonic()
    writer = HlsWriter(stream, playlist_size=3, segment_target=1.0)  # reads no FIFO
    assert time.monotonic() - started < 1.0
    writer.set_codec("video", clip[0])
    key = next(p for p in clip[2] if p[0] == "video" and p[3])
    writer.start_segment(0, False)
    writer.write("video", key[1], key[2], True, key[4])
    writer.end_segment(0, 1000)
    assert victim.read_text() == "precious"
    assert (stream / "index.m3u8").is_file() and not (stream / "index.m3u8").is_symlink()
    assert "seg0.ts" in (stream / "index.m3u8").read_text()
