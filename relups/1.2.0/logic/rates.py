"""Bitrate, frame rate and keyframe interval, measured on output dts.

Logic has no clock, so a window is one second of the publisher's own
timeline, whatever the network did to arrival times. A window closes on the
first frame written at least WINDOW_MS after it opened; that frame opens the
next one, so windows tile the timeline without gaps and no frame counts twice.
The closed window's figures are what `describe` shows until the next closes.
Same arithmetic as 1.1.0's `rate`, so a migrated state goes on exactly as one
that ran 1.2.0 from the start.
"""

from __future__ import annotations

import copy

from .state import Rates

WINDOW_MS = 1000


def on_packet(rates: Rates, dts: int, size: int, video: bool, keyframe: bool) -> Rates:
    """The windows after a frame of `size` bytes was written at output `dts`."""
    start = rates.window_start_ms
    closing = start >= 0 and dts - start >= WINDOW_MS
    # Copies of what changes only (the input state stays whole): this runs per frame.
    new = copy.copy(rates)
    if video or closing:
        new.video = copy.copy(rates.video)
    if closing or not video:
        new.audio = copy.copy(rates.audio)
    if start < 0:
        new.window_start_ms = dts
    elif closing:
        _close(new, dts - start)
        new.window_start_ms = dts
    # A frame of the other track slightly behind the window start (interleaving
    # jitter) still counts in the open window: every byte is counted once.
    if video:
        counts = new.video
        counts.window_bytes += size
        counts.window_frames += 1
        if keyframe:
            if counts.last_keyframe_ms >= 0:
                counts.keyframe_interval_ms = dts - counts.last_keyframe_ms
            counts.last_keyframe_ms = dts
    else:
        new.audio.window_bytes += size
    return new


def _close(new: Rates, span: int) -> None:
    """Turn the open window's counts into figures and empty it (on copies)."""
    video, audio = new.video, new.audio
    total_bps = (video.window_bytes + audio.window_bytes) * 8000 // span
    video.bitrate_bps = video.window_bytes * 8000 // span
    # The remainder, not audio's own quotient: rounding could make the parts
    # disagree with the total by 1 bps, and the total is what 1.1.0 stored.
    audio.bitrate_bps = total_bps - video.bitrate_bps
    video.fps = round(video.window_frames * 1000 / span, 2)
    video.window_bytes = video.window_frames = audio.window_bytes = 0
