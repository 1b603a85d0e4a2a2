"""Timestamp normalisation: RTMP 32-bit wrap, FFmpeg's 31-bit wrap, jumps, jitter."""

from hypothesis import given
from hypothesis import strategies as st

from mediaserver.logic import timestamps
from mediaserver.logic.state import TrackClock

JUMP = 10_000


def run(raws, start_other=None):
    clock, other = TrackClock(), TrackClock()
    out = []
    for raw in raws:
        clock, dts, _ = timestamps.advance(clock, raw, other, JUMP)
        out.append(dts)
    return out, clock


def test_unwrap_across_the_32_bit_wrap_is_continuous():
    start = 2**32 - 100
    raws = [(start + 33 * i) % 2**32 for i in range(10)]
    out, _ = run(raws)
    assert [b - a for a, b in zip(out, out[1:])] == [33] * 9
    assert out[0] == start


def test_unwrap_across_ffmpeg_31_bit_wrap_is_continuous():
    start = 2**31 - 100
    raws = [(start + 33 * i) % 2**31 for i in range(10)]
    out, clock = run(raws)
    assert [b - a for a, b in zip(out, out[1:])] == [33] * 9


@given(start=st.integers(0, 2**32 - 1), steps=st.lists(st.integers(1, 5000), min_size=1, max_size=50))
def test_unwrap_recovers_any_forward_walk(start, steps):
    raws, t = [], start
    for s in [0, *steps]:
        t += s
        raws.append(t % 2**32)
    out, _ = run(raws)
    assert [b - a for a, b in zip(out, out[1:])] == steps


def test_interleaved_tracks_around_the_wrap_share_one_timeline():
    video, audio = TrackClock(), TrackClock()
    base = 2**32 - 50
    video, v0, _ = timestamps.advance(video, base, audio, JUMP)
    # Audio's first frame arrives already wrapped: it must land just after video.
    audio, a0, _ = timestamps.advance(audio, 10, video, JUMP)
    assert a0 - v0 == 60
    video, v1, _ = timestamps.advance(video, base + 33, audio, JUMP)
    assert v1 - v0 == 33


def test_forward_jump_is_absorbed_and_counted():
    out, clock = run([0, 33, 66, 500_000, 500_033])
    assert out == [0, 33, 66, 99, 132]


def test_backward_jump_is_absorbed():
    out, _ = run([100_000, 100_033, 5_000, 5_033])
    assert out == [100_000, 100_033, 100_066, 100_099]


def test_small_backward_jitter_keeps_dts_strictly_increasing():
    clock, other = TrackClock(), TrackClock()
    dts_seen = []
    outcomes = []
    for raw in [0, 33, 30, 66]:
        clock, dts, outcome = timestamps.advance(clock, raw, other, JUMP)
        dts_seen.append(dts)
        outcomes.append(outcome)
    assert dts_seen == [0, 33, 34, 66]
    assert outcomes == [0, 0, 2, 0]


def test_jump_in_both_tracks_keeps_them_in_sync():
    video, audio = TrackClock(), TrackClock()
    out = {"v": [], "a": []}
    # Interleaved 30 fps video and ~47 fps audio, then both jump by +60 s.
    events = []
    for i in range(30):
        events.append(("v", i * 33))
        events.append(("a", i * 21))
    for i in range(30):
        events.append(("v", 60_000 + 1000 + i * 33))
        events.append(("a", 60_000 + 1000 + i * 21))
    for kind, raw in events:
        if kind == "v":
            video, dts, _ = timestamps.advance(video, raw, audio, JUMP)
        else:
            audio, dts, _ = timestamps.advance(audio, raw, video, JUMP)
        out[kind].append((raw, dts))
    shift_v = {raw - dts for raw, dts in out["v"][30:]}
    shift_a = {raw - dts for raw, dts in out["a"][30:]}
    assert len(shift_v) == 1 and shift_v == shift_a
