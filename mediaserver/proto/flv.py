"""FLV tag bodies as RTMP audio (8) and video (9) messages carry them."""

from __future__ import annotations

import msgspec

from .errors import ProtocolError

AVC = 7
AAC = 10
_RATES = (5500, 11025, 22050, 44100)


class VideoTag(msgspec.Struct, gc=False):
    codec_id: int
    keyframe: bool
    is_config: bool
    """AVC sequence header: `data` is the AVCDecoderConfigurationRecord."""
    is_end: bool
    cts: int
    """Composition time offset in ms (pts - dts), signed."""
    data: memoryview


class AudioTag(msgspec.Struct, gc=False):
    sound_format: int
    rate: int
    sample_bits: int
    channels: int
    is_config: bool
    """AAC sequence header: `data` is the AudioSpecificConfig."""
    data: memoryview


def parse_video(payload: bytes | memoryview) -> VideoTag:
    view = memoryview(payload)
    if len(view) < 1:
        raise ProtocolError("empty video message")
    first = view[0]
    codec_id = first & 0x0F
    keyframe = (first >> 4) == 1
    if codec_id != AVC:
        return VideoTag(codec_id, keyframe, False, False, 0, view[1:])
    if len(view) < 5:
        raise ProtocolError(f"AVC video message of {len(view)} bytes is shorter than its 5-byte header")
    packet_type = view[1]
    if packet_type > 2:
        raise ProtocolError(f"AVC packet type {packet_type} is not 0, 1 or 2")
    cts = int.from_bytes(view[2:5], "big", signed=True)
    return VideoTag(codec_id, keyframe, packet_type == 0, packet_type == 2, cts, view[5:])


def parse_audio(payload: bytes | memoryview) -> AudioTag:
    view = memoryview(payload)
    if len(view) < 1:
        raise ProtocolError("empty audio message")
    first = view[0]
    sound_format = first >> 4
    rate = _RATES[(first >> 2) & 3]
    bits = 16 if first & 2 else 8
    channels = 2 if first & 1 else 1
    if sound_format != AAC:
        return AudioTag(sound_format, rate, bits, channels, False, view[1:])
    if len(view) < 2:
        raise ProtocolError("AAC audio message has no packet type byte")
    packet_type = view[1]
    if packet_type > 1:
        raise ProtocolError(f"AAC packet type {packet_type} is not 0 or 1")
    return AudioTag(sound_format, rate, bits, channels, packet_type == 0, view[2:])


def parse_avc_config(record: bytes | memoryview) -> tuple[int, int, int, list[bytes], list[bytes]]:
    """(profile, level, NAL length size, SPS list, PPS list) of an AVCDecoderConfigurationRecord."""
    buf = bytes(record)
    if len(buf) < 7 or buf[0] != 1:
        raise ProtocolError(f"AVC config record of {len(buf)} bytes is malformed (version {buf[:1].hex()})")
    profile, level = buf[1], buf[3]
    nal_length_size = (buf[4] & 3) + 1
    pos = 5
    lists: list[list[bytes]] = []
    for count_mask in (0x1F, 0xFF):
        if pos >= len(buf):
            raise ProtocolError("AVC config record truncated in its parameter sets")
        count = buf[pos] & count_mask
        pos += 1
        items = []
        for _ in range(count):
            if pos + 2 > len(buf):
                raise ProtocolError("AVC config record truncated in a parameter set length")
            size = int.from_bytes(buf[pos : pos + 2], "big")
            pos += 2
            if pos + size > len(buf):
                raise ProtocolError("AVC config record truncated in a parameter set")
            items.append(buf[pos : pos + size])
            pos += size
        lists.append(items)
    return profile, level, nal_length_size, lists[0], lists[1]


_AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)


def parse_aac_config(asc: bytes | memoryview) -> tuple[int, int, int]:
    """(audio object type, sample rate, channel configuration) of an AudioSpecificConfig."""
    buf = bytes(asc)
    if len(buf) < 2:
        raise ProtocolError(f"AAC AudioSpecificConfig of {len(buf)} bytes is too short")
    object_type = buf[0] >> 3
    index = ((buf[0] & 7) << 1) | (buf[1] >> 7)
    if index >= len(_AAC_RATES):
        raise ProtocolError(f"AAC sampling frequency index {index} is not supported")
    channels = (buf[1] >> 3) & 0x0F
    return object_type, _AAC_RATES[index], channels
