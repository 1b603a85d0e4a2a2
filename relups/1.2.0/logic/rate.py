"""Per-stream bitrate and fps, measured on one-second windows of output dts.

No wall clock: logic has none. The window closes on the first frame at least
a second after it opened, so the figures describe what the publisher sent,
whatever the network did to its timing.
"""

from __future__ import annotations

from .state import KeyframeClock, Rates, Throughput, Window

WINDOW_MS = 1000


def add(throughput: Throughput, dts: int, size: int, video: bool) -> Throughput:
    window = throughput.window
    if window.start_ms < 0:
        return Throughput(window=Window(start_ms=dts, bytes=size, video_frames=int(video)), last=throughput.last)
    span = dts - window.start_ms
    if span >= WINDOW_MS:
        return Throughput(
            window=Window(start_ms=dts, bytes=size, video_frames=int(video)),
            last=Rates(
                bitrate_bps=window.bytes * 8 * 1000 // span,
                fps=round(window.video_frames * 1000 / span, 3),
            ),
        )
    return Throughput(
        window=Window(
            start_ms=window.start_ms,
            bytes=window.bytes + size,
            video_frames=window.video_frames + int(video),
        ),
        last=throughput.last,
    )


def keyframe(clock: KeyframeClock, dts: int) -> KeyframeClock:
    interval = dts - clock.last_dts if clock.last_dts >= 0 else 0
    return KeyframeClock(last_dts=dts, interval_ms=interval)
