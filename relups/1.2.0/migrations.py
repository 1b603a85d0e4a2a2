"""Stream state 2 (1.1.0) <-> 3 (1.2.0): the same data, grouped per track.

    health.video_frames, .keyframes     <-> health.tracks.video.frames, .keyframes
    health.audio_frames                 <-> health.tracks.audio.frames
    rate.window_start_ms                <-> rates.window_start_ms
    rate.window_video_bytes, _frames    <-> rates.video.window_bytes, .window_frames
    rate.window_bytes                   <-> rates.video.window_bytes + rates.audio.window_bytes
    rate.video_bitrate_bps, fps,
      last_keyframe_ms, keyframe_interval_ms <-> rates.video.(same names)
    rate.bitrate_bps                    <-> rates.video.bitrate_bps + rates.audio.bitrate_bps

1.2.0 keeps nothing 1.1.0 cannot hold, so both directions are exact:
down(up(s)) == s and up(down(t)) == t. On builtins (msgspec.to_builtins
form); every field is written out, the input is never changed.
"""

from __future__ import annotations

from typing import Any

State = dict[str, Any]


def up(state: State) -> State:
    _expect(state, 2)
    new = dict(state)
    health = dict(state["health"])
    health["tracks"] = {
        "video": {"frames": health.pop("video_frames"), "keyframes": health.pop("keyframes")},
        "audio": {"frames": health.pop("audio_frames")},
    }
    new["health"] = health
    rate = new.pop("rate")
    new["rates"] = {
        "window_start_ms": rate["window_start_ms"],
        "video": {
            "window_bytes": rate["window_video_bytes"],
            "window_frames": rate["window_video_frames"],
            "bitrate_bps": rate["video_bitrate_bps"],
            "fps": rate["fps"],
            "last_keyframe_ms": rate["last_keyframe_ms"],
            "keyframe_interval_ms": rate["keyframe_interval_ms"],
        },
        # 1.1.0 stored totals and their video part: audio is the difference.
        "audio": {
            "window_bytes": rate["window_bytes"] - rate["window_video_bytes"],
            "bitrate_bps": rate["bitrate_bps"] - rate["video_bitrate_bps"],
        },
    }
    new["version"] = 3
    return new


def down(state: State) -> State:
    _expect(state, 3)
    old = dict(state)
    health = dict(state["health"])
    tracks = health.pop("tracks")
    health["video_frames"] = tracks["video"]["frames"]
    health["keyframes"] = tracks["video"]["keyframes"]
    health["audio_frames"] = tracks["audio"]["frames"]
    old["health"] = health
    rates = old.pop("rates")
    video, audio = rates["video"], rates["audio"]
    old["rate"] = {
        "window_start_ms": rates["window_start_ms"],
        "window_bytes": video["window_bytes"] + audio["window_bytes"],
        "window_video_bytes": video["window_bytes"],
        "window_video_frames": video["window_frames"],
        "bitrate_bps": video["bitrate_bps"] + audio["bitrate_bps"],
        "video_bitrate_bps": video["bitrate_bps"],
        "fps": video["fps"],
        "last_keyframe_ms": video["last_keyframe_ms"],
        "keyframe_interval_ms": video["keyframe_interval_ms"],
    }
    old["version"] = 2
    return old


def _expect(state: State, version: int) -> None:
    # A state of another schema would convert into garbage or fail obscurely.
    if state.get("version") != version:
        raise ValueError(f"expected stream state version {version}, got {state.get('version')!r}")
