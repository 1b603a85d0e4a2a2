"""Elementary-stream framing for MPEG-TS: H.264 AVCC -> Annex B, raw AAC -> ADTS.

RTMP (and our WHIP path) carry H.264 as AVCC (length-prefixed NAL units, the
parameter sets in an AVCDecoderConfigurationRecord) and AAC as raw frames with
an AudioSpecificConfig. MPEG-TS wants Annex B with an access unit delimiter
and the SPS/PPS before every keyframe (what FFmpeg's h264_mp4toannexb gives),
and ADTS headers. Work is per NAL unit, never per byte.
"""

from __future__ import annotations

_START = b"\x00\x00\x00\x01"
_AUD = _START + b"\x09\xf0"
"""Access unit delimiter, primary_pic_type 7 (any slice type)."""
_NAL_SPS = 7
_NAL_AUD = 9
_AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)


class H264Framing:
    """Per stream: the config's NAL length size and parameter sets as Annex B."""

    def __init__(self, config: bytes) -> None:
        if len(config) < 7 or config[0] != 1:
            raise ValueError(f"not an AVCDecoderConfigurationRecord ({len(config)} bytes: {bytes(config[:8]).hex()})")
        self.length_size = (config[4] & 0x03) + 1
        sets: list[bytes] = []
        pos = 5
        for count_mask in (0x1F, 0xFF):
            if pos >= len(config):
                raise ValueError(f"AVCDecoderConfigurationRecord truncated at byte {pos} of {len(config)}")
            count = config[pos] & count_mask
            pos += 1
            for _ in range(count):
                size = int.from_bytes(config[pos : pos + 2], "big")
                nal = config[pos + 2 : pos + 2 + size]
                if len(nal) != size or size == 0:
                    raise ValueError(f"parameter set of {size} bytes at byte {pos} overruns the {len(config)}-byte config")
                sets.append(_START + bytes(nal))
                pos += 2 + size
        self.parameter_sets = b"".join(sets)

    def annexb(self, data: bytes | memoryview, keyframe: bool) -> bytes:
        """One access unit as Annex B: AUD, parameter sets on keyframes, the NAL units."""
        return b"".join(self.annexb_parts(data, keyframe))

    def annexb_parts(self, data: bytes | memoryview, keyframe: bool) -> list[bytes | memoryview]:
        """`annexb` in pieces (start codes and views of the input), not yet joined."""
        view = memoryview(data)
        n = len(view)
        size_len = self.length_size
        nals: list[memoryview] = []
        pos = 0
        while pos < n:
            if pos + size_len > n:
                raise ValueError(f"H.264 NAL length field cut at byte {pos} of a {n}-byte access unit")
            size = int.from_bytes(view[pos : pos + size_len], "big")
            pos += size_len
            if size > n - pos:
                raise ValueError(f"H.264 NAL of {size} bytes at byte {pos} overruns the {n}-byte access unit")
            if size:
                nals.append(view[pos : pos + size])
            pos += size
        parts: list[bytes | memoryview] = []
        first = 0
        if nals and nals[0][0] & 0x1F == _NAL_AUD:
            parts += (_START, nals[0])
            first = 1
        else:
            parts.append(_AUD)
        if keyframe and not any(nal[0] & 0x1F == _NAL_SPS for nal in nals):
            parts.append(self.parameter_sets)
        for nal in nals[first:]:
            parts += (_START, nal)
        return parts


class AdtsFraming:
    """Per stream: the fixed part of the ADTS header from the AudioSpecificConfig."""

    def __init__(self, asc: bytes) -> None:
        if len(asc) < 2:
            raise ValueError(f"AudioSpecificConfig of {len(asc)} bytes is too short")
        object_type = asc[0] >> 3
        # ADTS has two bits for the profile (object types 1..4); HE-AAC and
        # the rest are signalled as LC, which is what their core layer is.
        profile = object_type - 1 if 1 <= object_type <= 4 else 1
        index = ((asc[0] & 0x07) << 1) | (asc[1] >> 7)
        if index >= len(_AAC_RATES):
            raise ValueError(f"AAC sampling frequency index {index} has no ADTS code (explicit rate)")
        channels = (asc[1] >> 3) & 0x0F
        if channels > 7:
            raise ValueError(f"AAC channel configuration {channels} has no ADTS code")
        self.sample_rate = _AAC_RATES[index]
        self.channels = channels
        # 56 bits: sync 0xFFF, MPEG-4, layer 0, no CRC, profile, rate, private 0,
        # channels, 4 flag bits 0, frame length (13 bits, added per frame),
        # buffer fullness 0x7FF (VBR), one raw data block.
        self._base = (
            (0xFFF << 44) | (1 << 40) | (profile << 38) | (index << 34) | (channels << 30) | (0x7FF << 2)
        )

    def header(self, frame_len: int) -> bytes:
        total = frame_len + 7
        if total > 0x1FFF:
            raise ValueError(f"AAC frame of {frame_len} bytes is too long for ADTS (max {0x1FFF - 7})")
        return (self._base | (total << 13)).to_bytes(7, "big")
