"""Stream state 1 (1.0.0) <-> 2 (1.1.0): the state gains `rate`.

On builtins (the msgspec.to_builtins form; bytes are base64 text and are left
alone). The engine converts the result strictly into the target StreamState,
so every field is written out here rather than left to a default: a typo
fails preflight instead of silently resetting a counter. The input is never
changed: the engine may compare it with the result.
"""

from __future__ import annotations

from typing import Any

State = dict[str, Any]


def up(state: State) -> State:
    _expect(state, 1)
    new = dict(state)  # only top-level keys change: a shallow copy is enough
    # Nothing measured yet: the figures appear once a second of media has passed.
    new["rate"] = {
        "window_start_ms": -1,
        "window_bytes": 0,
        "window_video_bytes": 0,
        "window_video_frames": 0,
        "bitrate_bps": 0,
        "video_bitrate_bps": 0,
        "fps": 0.0,
        "last_keyframe_ms": -1,
        "keyframe_interval_ms": 0,
    }
    new["version"] = 2
    return new


def down(state: State) -> State:
    _expect(state, 2)
    old = dict(state)
    # 1.0.0 has nowhere to keep the measurements: they are dropped, and a
    # later upgrade starts a fresh window.
    del old["rate"]
    old["version"] = 1
    return old


def _expect(state: State, version: int) -> None:
    # A state of another schema would convert into garbage or fail obscurely.
    if state.get("version") != version:
        raise ValueError(f"expected stream state version {version}, got {state.get('version')!r}")
