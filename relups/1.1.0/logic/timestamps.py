"""Timestamp normalisation: raw 32-bit RTMP ms -> continuous output dts.

Pure functions over ints. Wraps are undone by taking the shortest step from
the previous timestamp, so a wrap needs no special state and audio/video
interleaving around it is harmless.
"""

from __future__ import annotations

from .state import TrackClock

_MASK32 = 0xFFFFFFFF
_HALF32 = 1 << 31
_QUARTER32 = 1 << 30

BACKWARD_JUMP_MS = 1000
"""A step back by more than this is a jump, not jitter."""


def unwrap(last_raw: int, last_unwrapped: int, raw: int) -> int:
    """The unwrapped value of `raw`, given the previous raw and unwrapped values."""
    step = (raw - last_raw) & _MASK32
    if step >= _HALF32:
        step -= 1 << 32
    # FFmpeg's FLV/RTMP muxer masks the timestamp's top bit, so its streams wrap
    # at 2**31 instead of 2**32. A step of about 2**31 is such a wrap, never a
    # real step: fold it.
    if step >= _QUARTER32:
        step -= _HALF32
    elif step < -_QUARTER32:
        step += _HALF32
    return last_unwrapped + step


def advance(
    clock: TrackClock, raw: int, other: TrackClock, jump_ms: int
) -> tuple[TrackClock, int, int]:
    """Next clock, output dts, and what happened: 0 normal, 1 jump absorbed, 2 fixed.

    `other` is the stream's other track; a track's first timestamp is unwrapped
    relative to it, so both tracks share one timeline even when they start on
    different sides of a wrap.
    """
    if clock.last_raw < 0:
        if other.last_raw >= 0:
            unwrapped = unwrap(other.last_raw, other.unwrapped, raw)
            offset = other.offset
        else:
            unwrapped, offset = raw, 0
        return (
            TrackClock(last_raw=raw, unwrapped=unwrapped, offset=offset, last_dts=unwrapped + offset),
            unwrapped + offset,
            0,
        )
    unwrapped = unwrap(clock.last_raw, clock.unwrapped, raw)
    offset = clock.offset
    dts = unwrapped + offset
    step = dts - clock.last_dts
    outcome = 0
    if step > jump_ms or step < -BACKWARD_JUMP_MS:
        outcome = 1
        shared = unwrapped + other.offset
        if other.offset != offset and other.last_dts >= 0 and 0 < shared - clock.last_dts <= jump_ms:
            # The other track already jumped by the same amount: take its
            # offset, so audio and video stay exactly in sync.
            offset, dts = other.offset, shared
        else:
            # The publisher's clock jumped: continue the output timeline one frame on.
            continued = clock.last_dts + max(clock.last_duration, 1)
            offset += continued - dts
            dts = continued
    elif step <= 0:
        # Jitter backwards: keep dts strictly increasing, as MPEG-TS muxing needs.
        dts = clock.last_dts + 1
        outcome = 2
    return (
        TrackClock(
            last_raw=raw,
            unwrapped=unwrapped,
            offset=offset,
            last_dts=dts,
            last_duration=dts - clock.last_dts if outcome == 0 else clock.last_duration,
        ),
        dts,
        outcome,
    )
