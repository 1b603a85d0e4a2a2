"""H.264 access units between the two framings: Annex B (RTP, x264) and AVCC (FLV, MP4).

WebRTC hands over access units as Annex B (start code before every NAL unit);
the session path carries AVCC (a 4-byte length before every NAL unit) and an
AVCDecoderConfigurationRecord, as RTMP publishers send them. Splitting is done
with bytes.find, never a loop over bytes: a start code cannot occur inside a
NAL unit thanks to emulation prevention (H.264 7.4.1).
"""

from __future__ import annotations

from typing import Iterable

from .errors import ProtocolError

NAL_IDR = 5
NAL_SEI = 6
NAL_SPS = 7
NAL_PPS = 8
NAL_AUD = 9

_START3 = b"\x00\x00\x01"


def split_annexb(data: bytes) -> list[bytes]:
    """The NAL units of an Annex B buffer (3- or 4-byte start codes), without empty ones."""
    nals: list[bytes] = []
    pos = data.find(_START3)
    if pos < 0:
        raise ProtocolError("no Annex B start code in H.264 access unit")
    while pos >= 0:
        start = pos + 3
        nxt = data.find(_START3, start)
        if nxt < 0:
            end = len(data)
        else:
            # A 4-byte start code is a zero byte followed by a 3-byte one; the
            # trailing zero belongs to the start code, not to this NAL unit.
            end = nxt - 1 if nxt > start and data[nxt - 1] == 0 else nxt
        if end > start:
            nals.append(data[start:end])
        pos = nxt
    return nals


def to_avcc(nals: Iterable[bytes]) -> bytes:
    parts: list[bytes] = []
    for nal in nals:
        parts.append(len(nal).to_bytes(4, "big"))
        parts.append(nal)
    return b"".join(parts)


def nal_types(nals: Iterable[bytes]) -> list[int]:
    return [nal[0] & 0x1F for nal in nals]


MAX_PARAMETER_SET = 0xFFFF
"""An AVCDecoderConfigurationRecord stores each SPS/PPS length in 16 bits."""


def avc_config(sps: bytes, pps: bytes) -> bytes:
    """An AVCDecoderConfigurationRecord (ISO/IEC 14496-15 5.2.4.1) for one SPS and one PPS."""
    if len(sps) < 4:
        raise ProtocolError(f"H.264 SPS of {len(sps)} bytes is too short")
    if not pps:
        raise ProtocolError("empty H.264 PPS")
    for kind, nal in (("SPS", sps), ("PPS", pps)):
        if len(nal) > MAX_PARAMETER_SET:
            raise ProtocolError(f"H.264 {kind} of {len(nal)} bytes does not fit a 16-bit length")
    return b"".join(
        (
            bytes((1, sps[1], sps[2], sps[3], 0xFF, 0xE1)),  # version, profile, compat, level, 4-byte lengths, 1 SPS
            len(sps).to_bytes(2, "big"),
            sps,
            b"\x01",
            len(pps).to_bytes(2, "big"),
            pps,
        )
    )


class AccessUnits:
    """Annex B access units in, (config, keyframe, AVCC) out.

    Holds the current SPS/PPS; a new pair (a resolution change) yields a new
    config before the keyframe that uses it. Frames before the first keyframe
    that has parameter sets cannot be decoded and are dropped (counted).
    """

    def __init__(self) -> None:
        self.sps: bytes | None = None
        self.pps: bytes | None = None
        self.config: bytes | None = None
        self.started = False
        self.dropped_before_keyframe = 0

    def push(self, annexb: bytes) -> tuple[bytes | None, bool, bytes] | None:
        """Returns (new_config or None, keyframe, avcc) or None when the frame is dropped."""
        nals = split_annexb(annexb)
        types = nal_types(nals)
        keyframe = NAL_IDR in types
        new_config = None
        if NAL_SPS in types or NAL_PPS in types:
            for nal, kind in zip(nals, types):
                if kind in (NAL_SPS, NAL_PPS) and len(nal) > MAX_PARAMETER_SET:
                    # Refused before it replaces the sets in use: later frames still decode.
                    raise ProtocolError(f"H.264 parameter set of {len(nal)} bytes does not fit a 16-bit length")
                if kind == NAL_SPS:
                    self.sps = nal
                elif kind == NAL_PPS:
                    self.pps = nal
            if self.sps is not None and self.pps is not None:
                config = avc_config(self.sps, self.pps)
                if config != self.config:
                    self.config = new_config = config
        if not self.started:
            if not keyframe or self.config is None:
                self.dropped_before_keyframe += 1
                return None
            self.started = True
        return new_config, keyframe, to_avcc(nals)
