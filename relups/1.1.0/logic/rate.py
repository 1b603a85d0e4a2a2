"""Per-stream bitrate and fps, measured on one-second windows of output dts.

No wall clock: logic has none. The window closes on the first frame at least
a second after it opened, so the figures describe what the publisher sent,
whatever the network did to its timing.
"""

from __future__ import annotations

from .state import RateWindow

WINDOW_MS = 1000


def add(rate: RateWindow, dts: int, size: int, video: bool) -> RateWindow:
    start = rate.window_start_ms
    if start < 0:
        return RateWindow(window_start_ms=dts, window_bytes=size, window_video_frames=int(video))
    span = dts - start
    if span >= WINDOW_MS:
        return RateWindow(
            window_start_ms=dts,
            window_bytes=size,
            window_video_frames=int(video),
            bitrate_bps=rate.window_bytes * 8 * 1000 // span,
            fps=round(rate.window_video_frames * 1000 / span, 3),
        )
    return RateWindow(
        window_start_ms=start,
        window_bytes=rate.window_bytes + size,
        window_video_frames=rate.window_video_frames + int(video),
        bitrate_bps=rate.bitrate_bps,
        fps=rate.fps,
    )
