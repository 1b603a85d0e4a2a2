"""Segment cut decisions.

A segment opens on the first frame that can start one (any audio frame, or a
video keyframe when the stream has video). It is cut as close to the target
as the publisher's keyframes allow:

- on the first keyframe at or after the target, as before;
- or on an earlier keyframe, at least half the target into the segment, when
  waiting for the next keyframe would make the segment longer than the target
  plus one frame. The next keyframe is predicted one keyframe interval on:
  the longer of the interval that ends at this keyframe and the one before it.

Why each part:
- RTMP timestamps are whole milliseconds, so an encoder set to a 2 s GOP
  sends keyframes 1999 or 2000 ms apart (OBS, GStreamer). Cutting only at or
  after 2.000 s waited for the next one: 4 s segments and a target duration of
  4 for good. A keyframe at 1999 ms is a cut because the next one (~4 s) would
  overshoot.
- An encoder that inserts a keyframe (scene cut) restarts its GOP there, so
  the next keyframe is one regular interval after it: the interval before
  (the regular one) predicts it, the short one that ends at the inserted
  keyframe does not. Hence the longer of the two.
- Short GOPs (1 s, 0.5 s) still cut at the target: the next keyframe lands on
  it, waiting overshoots by nothing.
- The tolerance of one frame (the last video frame step, at least 10 ms)
  absorbs the millisecond rounding (keyframes 1001 ms apart with a 1 s GOP
  must not cut at 1.001 s).
- The lower bound, half the target: a keyframe early in a segment (a scene
  cut 0.1 s after the last cut) never makes a tiny segment. Below half the
  target a cut would give a segment further from the target than waiting
  for a regular GOP would overshoot it (for a GOP up to the target), and
  each tiny segment costs players a request and the playlist a slot.

Audio-only streams cut on the first audio frame at or after the target (AAC
frames are ~21 ms: that is within one frame of it). A pending cut (a codec
config changed, a track appeared) is taken at the next frame that can start a
segment.
"""

from __future__ import annotations

from .state import StreamState

_ROUNDING_SLACK_MS = 10
"""Least tolerance over the target: two ms-rounded timestamps put an interval
up to 2 ms off, and a frame step next to a keyframe can be a few ms (or, with
a publisher's odd stamping, 1 ms); 10 ms is still under one frame at 100 fps."""


def tracks_available(state: StreamState) -> list[str]:
    tracks = []
    if state.video_config is not None:
        tracks.append("video")
    if state.audio_config is not None:
        tracks.append("audio")
    return tracks


def can_start_segment(tracks: list[str], track: str, keyframe: bool) -> bool:
    """Whether a frame may be the first of a segment holding `tracks`."""
    if "video" in tracks:
        return track == "video" and keyframe
    return track == "audio"


def should_cut(state: StreamState, track: str, keyframe: bool, dts: int) -> bool:
    """Whether the open segment ends right before this frame.

    `state.video` is the clock already advanced to this frame when it is video.
    """
    if state.cut_pending:
        return can_start_segment(tracks_available(state), track, keyframe)
    if not can_start_segment(state.segment_tracks, track, keyframe):
        return False
    elapsed = dts - state.segment_start
    target = state.segment_target_ms
    if elapsed >= target:
        return True
    if track != "video" or elapsed * 2 < target or state.last_keyframe_dts < 0:
        return False
    interval = max(dts - state.last_keyframe_dts, state.last_gop_ms)
    return elapsed + interval > target + max(state.video.last_duration, _ROUNDING_SLACK_MS)


def note_keyframe(state: StreamState, dts: int) -> None:
    """Remember a video keyframe written, for predicting the next one (mutates `state`)."""
    if state.last_keyframe_dts >= 0:
        state.last_gop_ms = dts - state.last_keyframe_dts
    state.last_keyframe_dts = dts


def segment_end_time(state: StreamState) -> int:
    """Output time just after the last frame written, for the last segment's duration."""
    ends = [
        clock.last_dts + clock.last_duration
        for clock in (state.video, state.audio)
        if clock.last_dts >= 0
    ]
    return max(ends) if ends else state.segment_start
