"""The data that crosses between the runtime and a logic generation.

Messages go into a session; effects come out of it. Both are plain data whose
shape is this module's contract. The types live here, in non-reloadable code,
and logic never imports them: it reads a message's `kind` and fields, and it
returns effects as tuples whose first item is one of the opcodes below. No
callable and no logic class crosses into the runtime, so a generation can be
purged as soon as no session is pinned to it.
"""

from __future__ import annotations

from typing import Any, ClassVar, Final

import msgspec

Payload = bytes | memoryview


class Metadata(msgspec.Struct, gc=False):
    """`@setDataFrame onMetaData` from the publisher."""

    kind: ClassVar[str] = "metadata"
    values: dict[str, Any]


class VideoConfig(msgspec.Struct, gc=False):
    """An AVC sequence header: the AVCDecoderConfigurationRecord."""

    kind: ClassVar[str] = "video_config"
    data: bytes


class AudioConfig(msgspec.Struct, gc=False):
    """An AAC sequence header: the AudioSpecificConfig."""

    kind: ClassVar[str] = "audio_config"
    data: bytes


class Video(msgspec.Struct, gc=False):
    """One H.264 access unit (AVCC NALUs). `ts` is the raw 32-bit RTMP dts in ms."""

    kind: ClassVar[str] = "video"
    ts: int
    cts: int
    keyframe: bool
    data: Payload


class Audio(msgspec.Struct, gc=False):
    """One raw AAC frame. `ts` is the raw 32-bit RTMP timestamp in ms."""

    kind: ClassVar[str] = "audio"
    ts: int
    data: Payload


class End(msgspec.Struct, gc=False):
    """The publisher stopped (unpublish, disconnect or server shutdown)."""

    kind: ClassVar[str] = "end"
    now: float
    reason: str


class Tick(msgspec.Struct, gc=False):
    """A timer fired; timers are messages, never callbacks into logic."""

    kind: ClassVar[str] = "tick"
    now: float


Message = Metadata | VideoConfig | AudioConfig | Video | Audio | End | Tick


# Effect opcodes. An effect is a tuple (opcode, *arguments):
#   (CODEC, track, config_bytes)           codec config used by segments opened from now on
#   (SEGMENT_START, sequence, discontinuity)
#   (PACKET, track, dts_ms, pts_ms, keyframe, payload)
#   (SEGMENT_END, sequence, duration_ms)
#   (STREAM_END,)                          the playlist gets EXT-X-ENDLIST
#   (LOG, level, text)                     a line for the operator, with the stream's name
#   (THUMBNAIL, dts_ms, keyframe_payload)  decode this keyframe into the stream's thumbnail
#   (LEVELS_FRAME, dts_ms, payload)        an AAC frame of the current audio-level window
#   (LEVELS_END, dts_ms)                   the window is complete: measure it
CODEC: Final = "codec"
SEGMENT_START: Final = "segment_start"
PACKET: Final = "packet"
SEGMENT_END: Final = "segment_end"
STREAM_END: Final = "stream_end"
LOG: Final = "log"
THUMBNAIL: Final = "thumbnail"
LEVELS_FRAME: Final = "levels_frame"
LEVELS_END: Final = "levels_end"

EFFECT_OPCODES: Final = frozenset(
    {CODEC, SEGMENT_START, PACKET, SEGMENT_END, STREAM_END, LOG, THUMBNAIL, LEVELS_FRAME, LEVELS_END}
)
TRACKS: Final = frozenset({"video", "audio"})
