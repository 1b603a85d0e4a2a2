"""Bitrate, frame rate and keyframe interval, measured on output dts.

Logic has no clock, so a window is one second of the publisher's own
timeline, whatever the network did to arrival times. A window closes on the
first frame written at least WINDOW_MS after it opened; that frame opens the
next one, so windows tile the timeline without gaps and no frame counts twice.
The closed window's figures are what `describe` shows until the next closes.
"""

from __future__ import annotations

import copy

from .state import RateWindow

WINDOW_MS = 1000


def on_packet(rate: RateWindow, dts: int, size: int, video: bool, keyframe: bool) -> RateWindow:
    """The window after a frame of `size` bytes was written at output `dts`."""
    new = copy.copy(rate)
    span = dts - rate.window_start_ms
    if rate.window_start_ms < 0:
        new.window_start_ms = dts
    elif span >= WINDOW_MS:
        # Integer bps of each part, so 1.2.0 can split the total exactly.
        new.bitrate_bps = rate.window_bytes * 8000 // span
        new.video_bitrate_bps = rate.window_video_bytes * 8000 // span
        new.fps = round(rate.window_video_frames * 1000 / span, 2)
        new.window_start_ms = dts
        new.window_bytes = new.window_video_bytes = new.window_video_frames = 0
    # A frame of the other track slightly behind the window start (interleaving
    # jitter) still counts in the open window: every byte is counted once.
    new.window_bytes += size
    if video:
        new.window_video_bytes += size
        new.window_video_frames += 1
        if keyframe:
            if rate.last_keyframe_ms >= 0:
                new.keyframe_interval_ms = dts - rate.last_keyframe_ms
            new.last_keyframe_ms = dts
    return new
