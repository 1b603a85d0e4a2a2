"""The stream session handler: `handle(state, message) -> (state, effects)`.

Pure and synchronous: no I/O, no clock, no awaits. The input state is never
mutated (a crash half-way leaves the runtime's copy whole); the handler works
on shallow copies. Effects are tuples, see `effects.py`.
"""

from __future__ import annotations

import copy
from typing import Any

from . import previews, rate, segments, timestamps
from .effects import CODEC, LOG, PACKET, SEGMENT_END, SEGMENT_START, STREAM_END
from .state import Health, StreamState

Effect = tuple[Any, ...]
_METADATA_KEYS_MAX = 32


def init(name: str, now: float, settings: dict[str, Any]) -> StreamState:
    """A new session's state. `settings` are plain values from the runtime's config."""
    return StreamState(
        name=name,
        started_at=now,
        segment_target_ms=int(settings["segment_target_ms"]),
        timestamp_jump_ms=int(settings["timestamp_jump_ms"]),
        sequence=int(settings.get("first_sequence", 0)),
        discontinuity_next=bool(settings.get("discontinuity", False)),
        previews=previews.settings(settings),
    )


def handle(state: StreamState, message: Any) -> tuple[StreamState, list[Effect]]:
    kind = message.kind
    if kind == "video":
        return _media(state, "video", message.ts, message.cts, message.keyframe, message.data)
    if kind == "audio":
        return _media(state, "audio", message.ts, 0, False, message.data)
    if kind == "video_config":
        return _config(state, "video", message.data)
    if kind == "audio_config":
        return _config(state, "audio", message.data)
    if kind == "metadata":
        return _metadata(state, message.values)
    if kind == "end":
        return _end(state, message.reason)
    if kind == "tick":
        return state, []
    raise ValueError(f"unknown message kind {kind!r}")


def _media(
    state: StreamState, track: str, raw_ts: int, cts: int, keyframe: bool, data: Any
) -> tuple[StreamState, list[Effect]]:
    if state.ended:
        return state, []
    new = copy.copy(state)
    health = new.health = copy.copy(state.health)
    health.bytes_in += len(data)
    if track == "video":
        health.video_frames += 1
        if keyframe:
            health.keyframes += 1
    else:
        health.audio_frames += 1

    effects: list[Effect] = []
    if (state.video_config if track == "video" else state.audio_config) is None:
        health.dropped_frames += 1
        return new, effects

    if track == "video" and not keyframe and state.video.last_dts < 0:
        # A decoder cannot start before the first keyframe.
        health.dropped_frames += 1
        return new, effects

    own, other = (state.video, state.audio) if track == "video" else (state.audio, state.video)
    clock, dts, outcome = timestamps.advance(own, raw_ts, other, state.timestamp_jump_ms)
    if track == "video":
        new.video = clock
    else:
        new.audio = clock
    if outcome == 1:
        health.timestamp_jumps += 1
        effects.append(
            (LOG, "warning", f"{track} timestamp jumped at raw {raw_ts} ms; output timeline continued")
        )
    elif outcome == 2:
        health.timestamp_fixes += 1

    if not new.segment_open:
        # The stream's first segment opens on its first frame: publishers send
        # audio and the first keyframe together, often audio first.
        _open_segment(new, segments.tracks_available(new), dts, effects)
    elif segments.should_cut(new, track, keyframe, dts):
        effects.append((SEGMENT_END, new.sequence, max(dts - new.segment_start, 1)))
        health.segments += 1
        new.sequence += 1
        _open_segment(new, segments.tracks_available(new), dts, effects)
    elif track not in new.segment_tracks:
        # Its config came after the segment opened; it joins at the next cut.
        health.dropped_frames += 1
        new.cut_pending = True
        return new, effects

    if track == "video" and keyframe:
        segments.note_keyframe(new, dts)
    effects.append((PACKET, track, dts, dts + cts, keyframe, data))
    new.rate = rate.on_packet(new.rate, dts, len(data), track == "video", keyframe)
    if track == "video":
        new.previews, more = previews.on_video(new.previews, dts, keyframe, data)
    else:
        new.previews, more = previews.on_audio(new.previews, dts, data)
    if more:
        effects.extend(more)
    return new, effects


def _open_segment(new: StreamState, tracks: list[str], dts: int, effects: list[Effect]) -> None:
    effects.append((SEGMENT_START, new.sequence, new.discontinuity_next))
    new.segment_open = True
    new.segment_start = dts
    new.segment_tracks = tracks
    new.discontinuity_next = False
    new.cut_pending = False


def _config(state: StreamState, track: str, data: bytes) -> tuple[StreamState, list[Effect]]:
    current = state.video_config if track == "video" else state.audio_config
    if current == data or state.ended:
        return state, []
    new = copy.copy(state)
    if track == "video":
        new.video_config = data
    else:
        new.audio_config = data
    if new.segment_open:
        # The open segment's streams were created with the old config (or
        # without this track): the next segment starts clean.
        new.cut_pending = True
        if current is not None:
            new.discontinuity_next = True
    return new, [(CODEC, track, data)]


def _metadata(state: StreamState, values: dict[str, Any]) -> tuple[StreamState, list[Effect]]:
    kept: dict[str, Any] = {}
    for key, value in values.items():
        if len(kept) >= _METADATA_KEYS_MAX:
            break
        if isinstance(key, str) and isinstance(value, (str, int, float, bool)):
            kept[key] = value
    new = copy.copy(state)
    new.metadata = kept
    return new, []


def _end(state: StreamState, reason: str) -> tuple[StreamState, list[Effect]]:
    if state.ended:
        return state, []
    new = copy.copy(state)
    effects: list[Effect] = []
    if new.segment_open:
        end = segments.segment_end_time(new)
        effects.append((SEGMENT_END, new.sequence, max(end - new.segment_start, 1)))
        new.health = copy.copy(state.health)
        new.health.segments += 1
        new.sequence += 1
        new.segment_open = False
    new.ended = True
    effects.append((STREAM_END,))
    effects.append((LOG, "info", f"stream ended: {reason}"))
    return new, effects


def describe(state: StreamState) -> dict[str, Any]:
    """What status pages and the admin API show for a session (builtins only)."""
    health: Health = state.health
    return {
        "name": state.name,
        "state_version": state.version,
        "sequence": state.sequence,
        "tracks": segments.tracks_available(state),
        "video_frames": health.video_frames,
        "audio_frames": health.audio_frames,
        "keyframes": health.keyframes,
        "bytes_in": health.bytes_in,
        "segments": health.segments,
        "timestamp_jumps": health.timestamp_jumps,
        "dropped_frames": health.dropped_frames,
        "ended": state.ended,
        # New in 1.1.0: figures of the last complete one-second window, 0 before the first.
        "bitrate_kbps": round(state.rate.bitrate_bps / 1000, 1),
        "fps": state.rate.fps,
    }
