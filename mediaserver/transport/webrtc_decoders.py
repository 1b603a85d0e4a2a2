"""What aiortc's receive threads do with the frames they reassemble.

aiortc runs one "decoder" thread per RTP receiver and by default decodes
every frame to pictures and samples. We replace the decoder it picks
(`aiortc.rtcrtpreceiver.get_decoder`, looked up by that thread for each new
codec):

- H.264: not decoded at all; the depayloaded access unit (Annex B) is handed
  on as it is.
- Opus: transcoded to AAC (media/opus_aac.py) in that same thread, off the
  event loop.
- VP8: transcoded to H.264 (media/vp8_h264.py), bounded, only used when the
  publisher offered no H.264.

What the track then yields are the items below, not av frames. The
replacement is installed once per process by the WHIP server; any other codec
falls back to aiortc's own decoder. aiortc is pinned to the 1.16 series in
pyproject.toml because this reaches into it; tests/test_whip_hooks.py fails
if the hooked names move.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from aiortc import rtcrtpreceiver
from aiortc.codecs import get_decoder as aiortc_get_decoder
from aiortc.jitterbuffer import JitterFrame

from ..media.opus_aac import OpusToAac
from ..media.vp8_h264 import Vp8ToH264

log = logging.getLogger("mediaserver.webrtc")


@dataclass(slots=True)
class VideoUnit:
    """One H.264 access unit, Annex B; `rtp` counts 90 kHz from the receiver's first frame."""

    rtp: int
    data: bytes
    received_bytes: int
    transcoded: bool = False


@dataclass(slots=True)
class AacFrames:
    """AAC frames made from one Opus packet; pts in 48 kHz samples from the receiver's first frame."""

    frames: list[tuple[int, bytes]]
    config: bytes
    received_bytes: int


@dataclass(slots=True)
class ReceiveError:
    """A frame that could not be handled; the thread goes on with the next one."""

    reason: str


@dataclass
class DecoderSettings:
    aac_bitrate: int = 128_000
    aac_coder: str = "fast"
    vp8_max_width: int = 1280
    vp8_max_height: int = 720
    vp8_max_fps: float = 30.0
    vp8_preset: str = "veryfast"
    vp8_bitrate: int = 2_500_000
    keyframe_interval: float = 2.0
    installed: bool = field(default=False, repr=False)


settings = DecoderSettings()
_install_lock = threading.Lock()


class H264Passthrough:
    def decode(self, frame: Any) -> list[Any]:
        data = frame.data
        return [VideoUnit(frame.timestamp, data, len(data))]


class OpusToAacDecoder:
    def __init__(self) -> None:
        self.transcoder = OpusToAac(bitrate=settings.aac_bitrate, coder=settings.aac_coder)

    def decode(self, frame: Any) -> list[Any]:
        try:
            frames = self.transcoder.push(frame.timestamp, frame.data)
        except Exception as exc:  # a thread that dies would silence the track for good
            return [ReceiveError(f"Opus -> AAC failed: {type(exc).__name__}: {exc}")]
        return [AacFrames(frames, self.transcoder.config, len(frame.data))]


class Vp8ToH264Decoder:
    def __init__(self) -> None:
        self.transcoder = Vp8ToH264(
            max_width=settings.vp8_max_width,
            max_height=settings.vp8_max_height,
            max_fps=settings.vp8_max_fps,
            preset=settings.vp8_preset,
            bitrate=settings.vp8_bitrate,
            keyframe_interval=settings.keyframe_interval,
        )

    def decode(self, frame: Any) -> list[Any]:
        try:
            units = self.transcoder.push(frame.timestamp, frame.data)
        except Exception as exc:
            return [ReceiveError(f"VP8 -> H.264 failed: {type(exc).__name__}: {exc}")]
        received = len(frame.data)
        out: list[Any] = []
        for rtp, data in units:
            out.append(VideoUnit(rtp, data, received, transcoded=True))
            received = 0
        if not units:
            # Dropped by the frame rate cap: still counted as received.
            out.append(VideoUnit(frame.timestamp, b"", received, transcoded=True))
        return out


def get_decoder(codec: Any) -> Any:
    mime = codec.mimeType.lower()
    if mime == "video/h264":
        return H264Passthrough()
    if mime == "audio/opus":
        return OpusToAacDecoder()
    if mime == "video/vp8":
        return Vp8ToH264Decoder()
    return aiortc_get_decoder(codec)


def install(new: DecoderSettings) -> None:
    """Make aiortc's receive threads use the decoders above, with these settings."""
    with _install_lock:
        for name in DecoderSettings.__dataclass_fields__:
            if name != "installed":
                setattr(settings, name, getattr(new, name))
        if rtcrtpreceiver.get_decoder is not get_decoder:
            rtcrtpreceiver.get_decoder = get_decoder
        settings.installed = True


def drain(receiver: Any) -> int:
    """Hand the frames aiortc's jitter buffer still holds to the receive thread, then end that thread.

    The jitter buffer lets a video frame out only when the next frame's first
    packet arrives, and audio only 4 packets late; after a lost packet it
    holds everything behind the hole until it overflows. At the end of a
    publish those frames would never be written. Every complete frame still
    held is queued for the receive thread, in order, followed by the
    end-of-track sentinel; the track then yields them and ends. An audio
    packet is a frame by itself; a video frame is complete when its packets
    are contiguous, it starts right after the previous frame's last packet
    (or at the buffer's start) and its last packet has the RTP marker.
    Returns the number of frames queued.
    """
    private = "_RTCRtpReceiver__"
    if getattr(receiver, private + "decoder_thread") is None:
        return 0
    buffer = getattr(receiver, private + "jitter_buffer")
    codecs = getattr(receiver, private + "codecs")
    mapper = getattr(receiver, private + "timestamp_mapper")
    queue = getattr(receiver, private + "decoder_queue")
    held: list[tuple[int, Any]] = []  # (position from the buffer's origin, packet)
    if buffer._origin is not None:
        for count in range(buffer.capacity):
            packet = buffer._packets[(buffer._origin + count) % buffer.capacity]
            if packet is not None:
                held.append((count, packet))
        if held:
            buffer.remove(held[-1][0] + 1)
    groups: list[list[tuple[int, Any]]] = []
    for entry in held:
        last = groups[-1][-1] if groups else None
        if last is not None and last[1].timestamp == entry[1].timestamp and last[0] + 1 == entry[0]:
            groups[-1].append(entry)
        else:
            groups.append([entry])
    queued = 0
    previous_end = -1  # position of the last packet of the group before, when contiguous
    for group in groups:
        first_position, first = group[0]
        codec = codecs.get(first.payload_type)
        starts_clean = first_position == 0 or first_position == previous_end + 1
        previous_end = group[-1][0]
        if codec is None:
            continue
        if codec.mimeType.lower().startswith("video/") and not (starts_clean and group[-1][1].marker):
            continue
        data = b"".join(getattr(p, "_data", b"") for _, p in group)
        queue.put((codec, JitterFrame(data=data, timestamp=mapper.map(first.timestamp))))
        queued += 1
    queue.put(None)
    return queued
