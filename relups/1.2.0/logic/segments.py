"""Segment cut decisions.

A segment opens on the first frame that can start one (any audio frame, or a
video keyframe when the stream has video) and is cut on the first such frame
at or after the target duration. A pending cut (a codec config changed, a
track appeared) is taken at the next frame that can start a segment.
"""

from __future__ import annotations

from .state import StreamState


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
    """Whether the open segment ends right before this frame."""
    if state.cut_pending:
        return can_start_segment(tracks_available(state), track, keyframe)
    if not can_start_segment(state.segment_tracks, track, keyframe):
        return False
    return dts - state.segment_start >= state.segment_target_ms


def segment_end_time(state: StreamState) -> int:
    """Output time just after the last frame written, for the last segment's duration."""
    ends = [
        clock.last_dts + clock.last_duration
        for clock in (state.video, state.audio)
        if clock.last_dts >= 0
    ]
    return max(ends) if ends else state.segment_start
