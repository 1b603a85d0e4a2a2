"""The per-stream session state: small, versioned, plain data.

Media buffers are not state: the runtime owns them. What is here migrates in
microseconds and serialises with `msgspec.to_builtins`.
"""

from __future__ import annotations

from typing import Any

import msgspec

STATE_VERSION = 3


class TrackClock(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Turns one track's raw 32-bit RTMP timestamps into a continuous output timeline."""

    last_raw: int = -1
    """Last raw timestamp seen, -1 before the first one."""
    unwrapped: int = 0
    """Last raw timestamp with its wraps undone."""
    offset: int = 0
    """Added to `unwrapped` to give the output dts; moves only when the publisher jumps."""
    last_dts: int = -1
    """Last output dts in ms, -1 before the first frame."""
    last_duration: int = 0
    """Step between the last two output dts, used to continue across a jump."""


class VideoCounters(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    frames: int = 0
    keyframes: int = 0


class AudioCounters(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    frames: int = 0


class TrackCounters(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Frames received, per track (received: dropped ones count too)."""

    video: VideoCounters = msgspec.field(default_factory=VideoCounters)
    audio: AudioCounters = msgspec.field(default_factory=AudioCounters)


class Health(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    tracks: TrackCounters = msgspec.field(default_factory=TrackCounters)
    """Until 1.2.0 (state version 3): flat video_frames, audio_frames, keyframes."""
    bytes_in: int = 0
    """All tracks: 1.0.0 never split it, so no per-track figure could be migrated."""
    segments: int = 0
    timestamp_jumps: int = 0
    """Publisher timestamp steps beyond the jump threshold, absorbed into the timeline."""
    timestamp_fixes: int = 0
    """Small backward steps raised to keep each track's dts strictly increasing."""
    dropped_frames: int = 0
    """Frames that could not start a segment: video before the first keyframe,
    or a track whose codec config had not arrived."""


class Previews(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """When the next thumbnail and audio-level window are due (output dts, ms)."""

    thumbnail_interval_ms: int = 5000
    """0 turns thumbnails off."""
    levels_interval_ms: int = 2000
    """0 turns audio levels off."""
    levels_window_ms: int = 500
    next_thumbnail: int = -1
    """-1: the next keyframe makes one."""
    next_levels: int = -1
    levels_until: int = -1
    """End of the window being measured; -1 when none is."""


class VideoRate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    window_bytes: int = 0
    window_frames: int = 0
    bitrate_bps: int = 0
    """Of the last complete window."""
    fps: float = 0.0
    """Of the last complete window."""
    last_keyframe_ms: int = -1
    """Output dts of the last keyframe written; -1 before the first one."""
    keyframe_interval_ms: int = 0
    """Between the last two keyframes written."""


class AudioRate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    window_bytes: int = 0
    bitrate_bps: int = 0
    """Of the last complete window: the stream's total less the video part, so
    the two always add up to the total (as 1.1.0 computed and stored it)."""


class Rates(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Bitrate, frame rate and keyframe interval on the stream's own timeline.

    One-second windows of output dts (logic has no clock) shared by both
    tracks, counting the frames written to HLS only. 1.1.0 kept the same
    figures flat as `rate`, with the total and its video part.
    """

    window_start_ms: int = -1
    """Output dts where the open window began; -1 before the first frame."""
    video: VideoRate = msgspec.field(default_factory=VideoRate)
    audio: AudioRate = msgspec.field(default_factory=AudioRate)


class StreamState(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    version: int = STATE_VERSION
    name: str
    started_at: float
    segment_target_ms: int
    timestamp_jump_ms: int
    sequence: int
    """Media sequence number of the open segment, or of the next one when none is open."""
    segment_open: bool = False
    segment_start: int = 0
    """Output dts (ms) of the first frame of the open segment."""
    segment_tracks: list[str] = []
    """Tracks the open segment was created with."""
    discontinuity_next: bool = False
    cut_pending: bool = False
    """A codec config changed or a track appeared: cut at the next chance."""
    video_config: bytes | None = None
    audio_config: bytes | None = None
    metadata: dict[str, Any] = {}
    video: TrackClock = msgspec.field(default_factory=TrackClock)
    audio: TrackClock = msgspec.field(default_factory=TrackClock)
    last_keyframe_dts: int = -1
    """Output dts of the last video keyframe written, -1 before the first; the
    cut rule predicts the next keyframe from it (see segments.py)."""
    last_gop_ms: int = 0
    """Interval between the two keyframes before `last_keyframe_dts`, 0 until known.
    Both have defaults: a state written before they existed converts as is and
    the rule learns the interval again at the next keyframes."""
    health: Health = msgspec.field(default_factory=Health)
    previews: Previews = msgspec.field(default_factory=Previews)
    rates: Rates = msgspec.field(default_factory=Rates)
    """`rate` in state version 2 (1.1.0), new there."""
    ended: bool = False
