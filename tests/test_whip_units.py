"""The WHIP path's pure parts, without a peer connection: H.264 framing, the
RTP -> timeline clock, offer inspection, and the Opus -> AAC / VP8 -> H.264
transcoders on real encoder output."""

from __future__ import annotations

import fractions

import av
import numpy as np
import pytest

from mediaserver.media.opus_aac import OpusToAac
from mediaserver.media.vp8_h264 import Vp8ToH264
from mediaserver.proto import h264
from mediaserver.proto.errors import ProtocolError
from mediaserver.proto.rtp_clock import NTP_EPOCH_OFFSET, StreamClock, ntp_to_seconds
from mediaserver.proto.whip import advertise_hosts, inspect_offer

SPS = bytes.fromhex("6742c01e95a0a0fd01")
PPS = bytes.fromhex("68ce3c80")
IDR = bytes.fromhex("65888400aabbcc")
SLICE = bytes.fromhex("419a0011")


# -- H.264 framing -------------------------------------------------------------


def annexb(*nals: bytes, long_codes: bool = True) -> bytes:
    code = b"\x00\x00\x00\x01" if long_codes else b"\x00\x00\x01"
    return b"".join(code + n for n in nals)


def test_split_annexb_with_3_and_4_byte_start_codes():
    mixed = b"\x00\x00\x00\x01" + SPS + b"\x00\x00\x01" + PPS + b"\x00\x00\x00\x01" + IDR
    assert h264.split_annexb(mixed) == [SPS, PPS, IDR]
    assert h264.split_annexb(annexb(SLICE, long_codes=False)) == [SLICE]
    # A NAL unit that ends in a zero byte keeps it when a 3-byte code follows
    # only if that zero is not the first byte of a 4-byte code: trailing zero
    # bytes are not allowed in a NAL unit (rbsp_trailing_bits), so dropping it is right.
    assert h264.split_annexb(b"\x00\x00\x01" + SLICE + b"\x00\x00\x00\x01" + IDR) == [SLICE, IDR]
    with pytest.raises(ProtocolError, match="start code"):
        h264.split_annexb(SLICE)


def test_to_avcc_and_config_record():
    assert h264.to_avcc([SPS, IDR]) == len(SPS).to_bytes(4, "big") + SPS + len(IDR).to_bytes(4, "big") + IDR
    record = h264.avc_config(SPS, PPS)
    assert record[:6] == bytes((1, SPS[1], SPS[2], SPS[3], 0xFF, 0xE1))
    assert record[6:8] == len(SPS).to_bytes(2, "big") and record[8 : 8 + len(SPS)] == SPS
    assert record[8 + len(SPS)] == 1 and record[-len(PPS) :] == PPS
    with pytest.raises(ProtocolError):
        h264.avc_config(b"\x67", PPS)


def test_access_units_start_at_a_keyframe_with_parameter_sets_and_follow_changes():
    units = h264.AccessUnits()
    assert units.push(annexb(SLICE)) is None
    assert units.push(annexb(IDR)) is None  # a keyframe, but no SPS/PPS yet
    assert units.dropped_before_keyframe == 2
    config, key, avcc = units.push(annexb(SPS, PPS, IDR))
    assert config == h264.avc_config(SPS, PPS) and key and avcc == h264.to_avcc([SPS, PPS, IDR])
    assert units.push(annexb(SLICE)) == (None, False, h264.to_avcc([SLICE]))
    # Repeated identical parameter sets (every keyframe, as browsers send them): no new config.
    assert units.push(annexb(SPS, PPS, IDR))[0] is None
    sps2 = SPS[:-1] + b"\x02"
    assert units.push(annexb(sps2, PPS, IDR))[0] == h264.avc_config(sps2, PPS)


# -- RTP clock -----------------------------------------------------------------


def ntp(seconds: float) -> int:
    whole = int(seconds)
    return ((whole + NTP_EPOCH_OFFSET) << 32) | round((seconds - whole) * 2**32)


def test_ntp_conversion():
    assert ntp_to_seconds(ntp(1_700_000_000.25)) == pytest.approx(1_700_000_000.25, abs=1e-9)


def test_unwrap_across_32_bits_and_reordering():
    clock = StreamClock({"video": 90000}, sync_wait=3.0)
    start = 2**32 - 3000
    values = [clock.frame("video", (start + i * 3000) & 0xFFFFFFFF, now=0.0) for i in range(4)]
    assert values == [start, start + 3000, start + 6000, start + 9000]
    # A late (reordered) frame from before the wrap stays before it.
    assert clock.frame("video", start & 0xFFFFFFFF, now=0.0) == start
    assert clock.frame("video", (start + 12000) & 0xFFFFFFFF, now=0.0) == start + 12000


def test_sender_reports_align_tracks_captured_together():
    """Video and audio sampled at the same sender instant land on the same ms,
    whatever their random RTP origins and whichever arrives first."""
    clock = StreamClock({"video": 90000, "audio": 48000}, sync_wait=3.0)
    t0 = 1_800_000_000.0
    v0, a0 = 4_000_000_000, 123_456  # video wraps 32 bits during this test
    v_first = clock.frame("video", v0, now=100.0)
    a_first = clock.frame("audio", a0 + 4800, now=100.05)  # audio starts 100 ms later
    assert not clock.poll(100.1)  # held: no report yet
    assert clock.to_ms("video", v_first, 100.1) is None
    clock.sender_report("video", ntp(t0), v0, now=100.2)
    assert not clock.poll(100.2)  # still waiting for audio's report
    clock.sender_report("audio", ntp(t0 + 1.0), a0 + 48000, now=100.3)
    assert clock.poll(100.3)
    assert clock.to_ms("video", v_first, 100.3) == 0
    assert clock.to_ms("audio", a_first, 100.3) == 100
    # Two seconds later on both clocks (video past the 32-bit wrap): same ms.
    v = clock.frame("video", (v0 + 180000) & 0xFFFFFFFF, now=102.0)
    a = clock.frame("audio", a0 + 96000, now=102.0)
    assert clock.to_ms("video", v, 102.0) == clock.to_ms("audio", a, 102.0) == 2000
    # Later reports (jittery) do not move the anchors.
    clock.sender_report("video", ntp(t0 + 5.013), v0 + 450000, now=105.0)
    assert clock.to_ms("video", v, 105.0) == 2000


def test_without_reports_tracks_anchor_on_arrival_after_sync_wait():
    clock = StreamClock({"video": 90000, "audio": 48000}, sync_wait=1.0)
    v = clock.frame("video", 1000, now=50.0)
    a = clock.frame("audio", 7, now=50.25)
    assert not clock.poll(50.9)
    assert clock.poll(51.0)
    assert clock.to_ms("video", v, 51.0) == 0
    assert clock.to_ms("audio", a, 51.0) == 250
    assert clock.to_ms("video", clock.frame("video", 1000 + 9000, now=51.1), 51.1) == 100


def test_one_report_carries_the_other_track_into_the_sender_clock():
    """Audio reports, video never does: video is placed by its arrival, moved
    into the sender's clock by the offset the audio report showed."""
    clock = StreamClock({"video": 90000, "audio": 48000}, sync_wait=1.0)
    sender_ahead = 7200.0  # the sender's NTP clock is 2 h ahead of ours
    a = clock.frame("audio", 0, now=10.0)
    v = clock.frame("video", 0, now=10.0)
    clock.sender_report("audio", ntp(10.0 + sender_ahead), 0, now=10.0)
    assert not clock.poll(10.5)
    assert clock.poll(11.0)
    assert clock.to_ms("audio", a, 11.0) == 0 and clock.to_ms("video", v, 11.0) == 0


def test_track_that_starts_after_the_lock_waits_for_its_report_then_anchors():
    clock = StreamClock({"video": 90000, "audio": 48000}, sync_wait=1.0)
    t0 = 1_800_000_000.0
    v = clock.frame("video", 0, now=0.0)
    clock.sender_report("video", ntp(t0), 0, now=0.0)
    assert clock.poll(0.0)  # only video has started: locked on it
    assert clock.to_ms("video", v, 0.0) == 0
    a = clock.frame("audio", 1000, now=0.5)
    assert clock.to_ms("audio", a, 0.6) is None  # held until its report or sync_wait
    clock.sender_report("audio", ntp(t0 + 0.5), 1000, now=0.7)
    assert clock.to_ms("audio", a, 0.7) == 500


def test_waiting_for_first_frames_of_every_track_at_most_sync_wait():
    clock = StreamClock({"video": 90000, "audio": 48000}, sync_wait=1.0)
    assert not clock.waiting_for_first_frames(0.0)  # nothing has started: nothing to wait for yet
    clock.frame("video", 0, now=10.0)
    assert clock.waiting_for_first_frames(10.5)
    assert not clock.waiting_for_first_frames(11.0)  # sync_wait is over
    clock.frame("audio", 0, now=10.6)
    assert not clock.waiting_for_first_frames(10.6)


# -- SDP offers ----------------------------------------------------------------


def offer(*sections: str) -> str:
    return "\r\n".join(["v=0", "o=- 1 2 IN IP4 127.0.0.1", "s=-", "t=0 0", FINGERPRINT, *sections]) + "\r\n"


FINGERPRINT = "a=fingerprint:sha-256 " + ":".join(["AB"] * 32)


VIDEO = ["m=video 9 UDP/TLS/RTP/SAVPF 96 97 98", "a=sendonly", "a=rtpmap:96 VP8/90000", "a=rtpmap:97 rtx/90000", "a=rtpmap:98 H264/90000"]
VP8_ONLY = ["m=video 9 UDP/TLS/RTP/SAVPF 96 97", "a=sendonly", "a=rtpmap:96 VP8/90000", "a=rtpmap:97 rtx/90000"]
AUDIO = ["m=audio 9 UDP/TLS/RTP/SAVPF 111 0", "a=sendonly", "a=rtpmap:111 opus/48000/2", "a=rtpmap:0 PCMU/8000"]


def test_offer_codecs_and_video_mode():
    summary = inspect_offer(offer(*VIDEO, *AUDIO), vp8_allowed=True)
    assert summary.codecs("video") == ["vp8", "h264"]
    assert summary.video_mode(True) == "h264" and summary.has_audio()
    assert inspect_offer(offer(*VP8_ONLY, *AUDIO), vp8_allowed=True).video_mode(True) == "vp8"
    assert inspect_offer(offer(*AUDIO), vp8_allowed=False).video_mode(False) is None  # audio only is fine


@pytest.mark.parametrize(
    ("sdp", "vp8_allowed", "reason"),
    [
        ("hello", True, "must start with v=0"),
        (offer("a=group:BUNDLE 0"), True, "no audio or video section"),
        (offer(*[s.replace("sendonly", "recvonly") for s in AUDIO]), True, "sends nothing"),
        (offer(*VP8_ONLY), False, "no usable video codec: the offer has vp8; this server takes H264"),
        (offer("m=video 9 UDP/TLS/RTP/SAVPF 45", "a=sendonly", "a=rtpmap:45 AV1/90000"), True, "takes H264 or VP8"),
        (offer("m=audio 9 UDP/TLS/RTP/SAVPF 0", "a=sendonly", "a=rtpmap:0 PCMU/8000"), True, "takes Opus"),
        ("v=0\r\n" + "a=x\r\n" * 20000, True, "larger than"),
        (offer(*VIDEO, *VIDEO), True, "more than 1 video section"),
        (offer(*AUDIO, *VIDEO, *AUDIO), True, "more than 1 audio section"),
        (offer(*AUDIO, *VIDEO, "m=application 9 UDP/DTLS/SCTP webrtc-datachannel"), True,
         "media section of kind 'application'; a publish takes audio and video only"),
        (offer(*AUDIO, *VIDEO, *["a=candidate:1 1 udp 1 127.0.0.1 9 typ host"] * 65), True, "more than 64 ICE candidates"),
        (offer(*AUDIO, *VIDEO).replace(FINGERPRINT + "\r\n", ""), True,
         r"no a=fingerprint for media section 0 \(audio\), 1 \(video\)"),
    ],
)
def test_offers_refused_with_a_reason(sdp, vp8_allowed, reason):
    with pytest.raises(ProtocolError, match=reason):
        inspect_offer(sdp, vp8_allowed=vp8_allowed)


def test_fingerprint_per_section_is_enough_and_each_section_needs_one():
    bare = offer(*AUDIO, *VIDEO).replace(FINGERPRINT + "\r\n", "")
    per_section = bare.replace("a=sendonly", "a=sendonly\r\n" + FINGERPRINT)
    assert inspect_offer(per_section, vp8_allowed=True).has_audio()
    only_audio = bare.replace("a=sendonly", "a=sendonly\r\n" + FINGERPRINT, 1)
    with pytest.raises(ProtocolError, match=r"media section 1 \(video\)$"):
        inspect_offer(only_audio, vp8_allowed=True)


def test_500_media_sections_are_refused_in_microseconds():
    """The refusal stops at the first section over the limit: its cost does not grow with the offer."""
    import time

    sdp = offer(*AUDIO, *VIDEO, *(["m=video 9 UDP/TLS/RTP/SAVPF 96", "a=rtpmap:96 H264/90000"] * 500))[:60000]
    start = time.perf_counter()
    for _ in range(100):
        with pytest.raises(ProtocolError, match="more than 1 video section"):
            inspect_offer(sdp, vp8_allowed=True)
    per_offer = (time.perf_counter() - start) / 100
    assert per_offer < 0.05, f"{per_offer * 1e3:.1f} ms per refused offer"


def test_advertised_hosts_are_added_beside_gathered_candidates():
    answer = "v=0\r\na=candidate:abc 1 udp 2130706431 10.0.0.5 40000 typ host\r\na=end-of-candidates\r\n"
    out = advertise_hosts(answer, ["203.0.113.7", "198.51.100.1"])
    lines = out.split("\r\n")
    assert lines[1] == "a=candidate:abc 1 udp 2130706431 10.0.0.5 40000 typ host"
    assert lines[2] == "a=candidate:abca1 1 udp 2130706430 203.0.113.7 40000 typ host"
    assert lines[3] == "a=candidate:abca2 1 udp 2130706429 198.51.100.1 40000 typ host"
    assert advertise_hosts(answer, []) == answer


# -- transcoders -----------------------------------------------------------------


def opus_packets(seconds: float, freq: float = 440.0) -> list[tuple[int, bytes]]:
    """20 ms Opus packets of a stereo sine, as (RTP time in 48 kHz samples, payload)."""
    encoder = av.CodecContext.create("libopus", "w")
    encoder.sample_rate = 48000
    encoder.layout = "stereo"
    encoder.format = "s16"
    encoder.time_base = fractions.Fraction(1, 48000)
    encoder.open()
    total = int(seconds * 48000)
    t = np.arange(total) / 48000
    wave = (np.sin(2 * np.pi * freq * t) * 0.5 * 32767).astype(np.int16)
    out: list[tuple[int, bytes]] = []
    for start in range(0, total, 960):
        chunk = np.repeat(wave[start : start + 960], 2).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(chunk, format="s16", layout="stereo")
        frame.sample_rate = 48000
        frame.pts = start
        out += [(p.pts, bytes(p)) for p in encoder.encode(frame)]
    out += [(p.pts, bytes(p)) for p in encoder.encode(None)]
    return out


def test_opus_to_aac_keeps_the_rtp_timeline_and_fills_gaps_with_silence():
    packets = opus_packets(2.0)
    base = 1_000_000
    transcoder = OpusToAac(max_fill=0.5)
    lost = set(range(20, 30))  # 200 ms lost in the middle
    aac: list[tuple[int, bytes]] = []
    for number, (pts, payload) in enumerate(packets):
        if number not in lost:
            aac += transcoder.push(base + pts, payload)
    assert transcoder.silence_filled == 10 * 960
    assert transcoder.decode_errors == 0
    stamps = [p for p, _ in aac]
    # The first AAC frame is the encoder's priming, 1024 samples before the first Opus sample.
    assert stamps[0] == base + packets[0][0] - 1024 and np.all(np.diff(stamps) == 1024)
    # Every sample of the 2 s is accounted for (the encoder still holds its last ~2 frames).
    assert abs(len(aac) * 1024 - 2.0 * 48000) <= 3 * 1024
    # A duplicate (retransmitted) packet is ignored.
    assert transcoder.push(base + packets[5][0], packets[5][1]) == []
    # The AAC decodes, and the gap is silent while the rest is the sine.
    decoder = av.CodecContext.create("aac", "r")
    decoder.extradata = transcoder.config
    pcm = []
    for _, payload in aac:
        pcm += [f.to_ndarray()[0] for f in decoder.decode(av.Packet(payload))]
    samples = np.concatenate(pcm)
    gap = samples[20 * 960 + 2048 + 480 : 30 * 960 + 1024 - 480]  # inside the gap, past codec delay/edges
    tone = samples[5000:15000]
    assert np.sqrt(np.mean(gap**2)) < 0.01 < np.sqrt(np.mean(tone**2))


def test_opus_gap_longer_than_max_fill_jumps_instead_of_filling():
    packets = opus_packets(0.4)
    transcoder = OpusToAac(max_fill=0.5)
    aac = []
    for pts, payload in packets[:10]:
        aac += transcoder.push(pts, payload)
    for pts, payload in packets[10:]:
        aac += transcoder.push(pts + 48000, payload)  # a one-second jump
    assert transcoder.silence_filled == 0
    steps = np.diff([p for p, _ in aac])
    assert set(steps.tolist()) <= {1024, 1024 + 48000} and (steps > 1024).sum() == 1


def test_opus_garbage_is_counted_and_the_stream_goes_on():
    packets = opus_packets(0.2)
    transcoder = OpusToAac()
    out = transcoder.push(packets[0][0], packets[0][1])
    transcoder.push(packets[1][0], b"\xff" * 3)
    for pts, payload in packets[2:]:
        out += transcoder.push(pts, payload)
    assert transcoder.decode_errors == 1 and out


def vp8_frames(count: int, width: int, height: int, fps: int) -> list[tuple[int, bytes]]:
    encoder = av.CodecContext.create("libvpx", "w")
    encoder.width, encoder.height = width, height
    encoder.pix_fmt = "yuv420p"
    encoder.time_base = fractions.Fraction(1, 90000)
    encoder.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}
    encoder.open()
    out = []
    for i in range(count):
        img = np.full((height, width, 3), (i * 7) % 256, dtype=np.uint8)
        frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p")
        frame.pts = i * 90000 // fps
        out += [(p.pts, bytes(p)) for p in encoder.encode(frame)]
    out += [(p.pts, bytes(p)) for p in encoder.encode(None)]
    return out


def test_vp8_to_h264_caps_size_and_rate_and_forces_keyframes():
    frames = vp8_frames(60, 640, 480, fps=60)  # 1 s at 60 fps
    transcoder = Vp8ToH264(max_width=320, max_height=320, max_fps=30, keyframe_interval=0.5)
    units: list[tuple[int, bytes]] = []
    for rtp, payload in frames:
        units += transcoder.push(rtp, payload)
    assert 29 <= len(units) <= 31 and transcoder.frames_dropped == len(frames) - len(units)
    assert transcoder.size == (320, 240)
    keyframes = [rtp for rtp, data in units if h264.NAL_IDR in h264.nal_types(h264.split_annexb(data))]
    assert keyframes[0] == units[0][0] and len(keyframes) == 2, keyframes
    decoder = av.CodecContext.create("h264", "r")
    decoded = []
    for _, data in units:
        decoded += decoder.decode(av.Packet(data))
    decoded += decoder.decode(None)
    assert len(decoded) == len(units) and (decoded[0].width, decoded[0].height) == (320, 240)


# -- one shared UDP port -----------------------------------------------------------


def test_udp_mux_routes_by_ufrag_then_by_address_and_drops_strangers():
    from aioice import stun

    from mediaserver.transport.ice_mux import UdpMux

    class Receiver:
        def __init__(self) -> None:
            self.got: list[tuple[bytes, tuple]] = []

        def datagram_received(self, data, addr) -> None:
            self.got.append((data, addr))

    mux = UdpMux("127.0.0.1", 0)
    a, b = Receiver(), Receiver()
    mux.by_ufrag.update({"ufragA": a, "ufragB": b})

    def binding(username: str) -> bytes:
        message = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
        message.attributes["USERNAME"] = username
        return bytes(message)

    mux.datagram_received(b"\x16\xfe\xfd" + b"\x00" * 30, ("10.0.0.1", 5000))  # DTLS from nobody known
    assert mux.unrouted == 1 and not a.got and not b.got
    mux.datagram_received(binding("ufragB:remote1"), ("10.0.0.1", 5000))
    mux.datagram_received(binding("ufragA:remote2"), ("10.0.0.2", 6000, 0, 0))  # IPv6-style 4-tuple
    mux.datagram_received(b"\x80" + b"\x00" * 40, ("10.0.0.1", 5000))  # RTP: by address
    mux.datagram_received(b"\x16\xfe\xfd" + b"\x00" * 30, ("10.0.0.2", 6000))
    assert [addr for _, addr in b.got] == [("10.0.0.1", 5000)] * 2 and b.got[1][0][0] == 0x80
    assert [addr for _, addr in a.got] == [("10.0.0.2", 6000)] * 2 and a.got[1][0][0] == 0x16
    mux.datagram_received(binding("nobody:x"), ("10.0.0.3", 1))
    assert mux.unrouted == 2
    mux.forget(b)
    mux.datagram_received(b"\x80" + b"\x00" * 40, ("10.0.0.1", 5000))
    assert mux.unrouted == 3 and len(b.got) == 2 and "ufragB" not in mux.by_ufrag


# -- the jitter buffer's leftovers at the end of a publish ---------------------------


def _receiver_with(buffer, codecs):
    import queue
    import types

    from aiortc.rtcrtpreceiver import TimestampMapper

    p = "_RTCRtpReceiver__"
    return types.SimpleNamespace(
        **{
            p + "decoder_thread": object(),
            p + "jitter_buffer": buffer,
            p + "codecs": codecs,
            p + "timestamp_mapper": TimestampMapper(),
            p + "decoder_queue": queue.Queue(),
        }
    )


def _queued(receiver) -> list:
    q = receiver._RTCRtpReceiver__decoder_queue
    items = []
    while not q.empty():
        items.append(q.get_nowait())
    return items


def test_drain_queues_audio_held_behind_a_lost_packet():
    from aiortc.jitterbuffer import JitterBuffer
    from aiortc.rtcrtpparameters import RTCRtpCodecParameters
    from aiortc.rtp import RtpPacket

    from mediaserver.transport.webrtc_decoders import drain

    opus = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2, payloadType=111)
    buffer = JitterBuffer(capacity=16, prefetch=4)
    emitted = []
    for seq in range(12):
        if seq == 3:
            continue  # lost: aiortc holds everything behind it
        packet = RtpPacket(payload_type=111, sequence_number=seq, timestamp=seq * 960)
        packet._data = bytes([seq])
        _, frame = buffer.add(packet)
        if frame is not None:
            emitted.append(frame.data)
    receiver = _receiver_with(buffer, {111: opus})
    queued = drain(receiver)
    items = _queued(receiver)
    assert items[-1] is None and queued == len(items) - 1
    assert emitted + [frame.data for _, frame in items[:-1]] == [bytes([s]) for s in range(12) if s != 3]
    assert buffer._packets == [None] * 16


def test_drain_skips_incomplete_video_frames_and_keeps_complete_ones():
    from aiortc.jitterbuffer import JitterBuffer
    from aiortc.rtcrtpparameters import RTCRtpCodecParameters
    from aiortc.rtp import RtpPacket

    from mediaserver.transport.webrtc_decoders import drain

    h264 = RTCRtpCodecParameters(mimeType="video/H264", clockRate=90000, payloadType=102)
    buffer = JitterBuffer(capacity=64, is_video=True)
    # Frames of 3 packets: A (seq 0-2), B (3-5, 4 lost), C (6-8), D (9-10, its last packet lost).
    layout = [("A", 0, 3), ("B", 3, 3), ("C", 6, 3), ("D", 9, 3)]
    lost = {4, 11}
    emitted = []
    for name, first, count in layout:
        for i in range(count):
            seq = first + i
            if seq in lost:
                continue
            packet = RtpPacket(payload_type=102, sequence_number=seq, timestamp=first * 3000, marker=i == count - 1)
            packet._data = f"{name}{i}".encode()
            _, frame = buffer.add(packet)
            if frame is not None:
                emitted.append(frame.data)
    assert emitted == [b"A0A1A2"]  # let out when B began; the hole in B holds everything after
    receiver = _receiver_with(buffer, {102: h264})
    drain(receiver)
    frames = [item[1].data for item in _queued(receiver)[:-1]]
    # B has a hole and D has no marker (its end was lost): only C is complete.
    assert frames == [b"C0C1C2"], frames


# -- audio jitter buffer -------------------------------------------------------------


def _audio_packet(seq: int):
    from aiortc.rtp import RtpPacket

    packet = RtpPacket(payload_type=111, sequence_number=seq & 0xFFFF, timestamp=(seq * 960) & 0xFFFFFFFF)
    packet._data = seq.to_bytes(4, "big")
    return packet


def _run_buffer(buffer, seqs) -> list[int]:
    out = []
    for seq in seqs:
        _, frame = buffer.add(_audio_packet(seq))
        if frame is not None:
            out.append(int.from_bytes(frame.data, "big"))
    return out


@pytest.mark.parametrize("loss", [0.005, 0.02, 0.05])
def test_audio_jitter_buffer_loses_only_what_the_network_lost(loss):
    """aiortc's buffer, fed the same stream, turns each loss into several (the
    figures in audio_jitter.py); ours lets out every packet that arrived, in
    order, 4 packets late, across the 16-bit sequence wrap."""
    from aiortc.jitterbuffer import JitterBuffer

    from mediaserver.transport.audio_jitter import AudioJitterBuffer

    rng = np.random.default_rng(1)
    start = 65536 - 5000
    arrived = [s for s in range(start, start + 20000) if rng.random() >= loss]
    ours = AudioJitterBuffer()
    out = _run_buffer(ours, arrived)
    assert out == [s & 0xFFFFFFFF for s in arrived[: len(out)]]
    assert len(arrived) - len(out) == 4  # the last 4 stay for reordering (drained at the end)
    assert ours.late == 0 and ours.skipped == 20000 - len(arrived)
    theirs = _run_buffer(JitterBuffer(capacity=16, prefetch=4), arrived)
    assert len(arrived) - len(theirs) > 2 * (20000 - len(arrived)) if loss >= 0.02 else len(theirs) < len(out)


def test_audio_jitter_buffer_puts_reordered_packets_back_in_order():
    from mediaserver.transport.audio_jitter import AudioJitterBuffer

    seqs = list(range(100))
    for i in range(10, 90, 7):  # swap neighbours, and move one 3 places back
        seqs[i], seqs[i + 1] = seqs[i + 1], seqs[i]
    seqs.insert(50, seqs.pop(47))
    buffer = AudioJitterBuffer()
    assert _run_buffer(buffer, seqs) == list(range(96))
    assert buffer.skipped == 0 and buffer.late == 0


def test_audio_jitter_buffer_drops_too_late_packets_and_restarts_on_a_jump():
    from mediaserver.transport.audio_jitter import AudioJitterBuffer

    buffer = AudioJitterBuffer()
    out = _run_buffer(buffer, [0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 6, 12])  # 6 comes after its slot was given up
    assert out == [0, 1, 2, 3, 4, 5, 7, 8] and buffer.late == 1 and buffer.skipped == 1
    out = _run_buffer(buffer, list(range(30000, 30010)))  # the sender restarted its sequence
    assert out == list(range(30000, 30006))  # 10 in, the last 4 held


def test_remote_candidate_filter_allows_the_offers_address_and_the_operators_networks():
    from mediaserver.transport.ice_ports import remote_address_filter

    allow = remote_address_filter("203.0.113.7", ["10.0.0.0/8", "2001:db8::/32"])
    assert allow("203.0.113.7") and allow("::ffff:203.0.113.7")
    assert allow("10.1.2.3") and allow("2001:db8::1")
    assert not allow("203.0.113.8") and not allow("192.168.1.1") and not allow("foo.local") and not allow("")
    mapped_client = remote_address_filter("::ffff:127.0.0.1", [])
    assert mapped_client("127.0.0.1") and not mapped_client("127.0.0.5")
    assert not remote_address_filter("?", [])("127.0.0.1")  # no usable client address: nothing but the networks
