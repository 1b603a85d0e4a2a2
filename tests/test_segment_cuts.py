"""The cut rule of logic/segments.py on synthetic timestamps.

Segments are cut as close to the target as the publisher's keyframes allow:
keyframes 1999/2000 ms apart (RTMP's ms rounding of a 2 s GOP) give 2 s
segments, an early keyframe where the encoder restarts its GOP is a cut, and a
keyframe very early in a segment is not.
"""

from __future__ import annotations

import pytest

from mediaserver import wire
from mediaserver.logic import handle, init

TARGET = 2000
SETTINGS = {"segment_target_ms": TARGET, "timestamp_jump_ms": 10000}
AVCC = b"\x01\x64\x00\x1f\xff\xe1\x00\x04abcd\x01\x00\x02ef"
ASC = b"\x11\x90"
FPS = 30
FRAME_MS = 1000 / FPS


def publish(keyframes: list[int], end_ms: int, start: int = 0, audio: bool = True) -> list:
    """Configs, then 30 fps video whose keyframes are at exactly `keyframes` (ms
    from the start; each GOP's frames follow its keyframe every 33.3 ms), with
    AAC frames interleaved; raw timestamps begin at `start`, modulo 2**32."""
    video: list[tuple[int, bool]] = []
    bounds = keyframes + [end_ms]
    for key, next_key in zip(bounds, bounds[1:]):
        j = 0
        while key + round(j * FRAME_MS) < next_key - FRAME_MS / 2:
            video.append((key + round(j * FRAME_MS), j == 0))
            j += 1
    media = [(ts, 1, wire.Video((start + ts) % 2**32, 0, key, b"v")) for ts, key in video]
    if audio:
        j = 0
        while round(j * 1024 / 48) < end_ms:
            ts = round(j * 1024 / 48)
            media.append((ts, 0, wire.Audio((start + ts) % 2**32, b"a")))
            j += 1
    media.sort(key=lambda item: (item[0], item[1]))
    configs = [wire.VideoConfig(AVCC)] + ([wire.AudioConfig(ASC)] if audio else [])
    return configs + [message for _, _, message in media]


def cuts(messages: list, state=None) -> tuple[list[int], list[int], object]:
    """(output dts of every segment start, durations of the closed segments, state)."""
    state = state or init("s", 0.0, SETTINGS)
    starts, durations = [], []
    for message in messages:
        state, effects = handle(state, message)
        opened = False
        for effect in effects:
            if effect[0] == "segment_end":
                durations.append(effect[2])
            elif effect[0] == "segment_start":
                opened = True
            elif effect[0] == "packet" and opened:
                starts.append(effect[2])
                opened = False
    return starts, durations, state


def alternating(first: int, second: int, count: int) -> list[int]:
    times, t = [], 0
    for i in range(count):
        times.append(t)
        t += first if i % 2 == 0 else second
    return times


@pytest.mark.parametrize("start", [0, 2**32 - 5000], ids=["plain", "across-32-bit-wrap"])
def test_keyframes_1999_and_2000_ms_apart_give_2_s_segments(start):
    keys = alternating(1999, 2000, 11)
    starts, durations, _ = cuts(publish(keys, keys[-1] + 1000, start=start))
    assert [s - starts[0] for s in starts] == keys
    assert set(durations) == {1999, 2000}
    assert round(max(durations) / 1000) == 2


def test_keyframes_2000_and_2001_ms_apart_cut_on_every_keyframe():
    keys = alternating(2000, 2001, 11)
    starts, durations, _ = cuts(publish(keys, keys[-1] + 1000))
    assert starts == keys
    assert set(durations) == {2000, 2001}


@pytest.mark.parametrize("gop", [1000, 500])
def test_short_gops_cut_at_the_target(gop):
    keys = list(range(0, 12_000, gop))
    starts, durations, _ = cuts(publish(keys, 12_000))
    assert starts == list(range(0, 12_000, TARGET))
    assert durations == [TARGET] * 5


def test_1_s_gop_with_ms_rounding_still_cuts_near_2_s():
    # 999/1001 ms apart: a keyframe at 1001 ms must not cut (the next comes
    # at ~2002, within one frame of the target), one at 1999 or 2000 does.
    keys = alternating(1001, 999, 13)
    starts, durations, _ = cuts(publish(keys, keys[-1] + 500))
    assert starts == keys[::2]
    assert set(durations) == {2000}


def test_3_s_gop_gives_3_s_segments():
    keys = list(range(0, 15_000, 3000))
    starts, durations, _ = cuts(publish(keys, 15_000))
    assert starts == keys
    assert durations == [3000] * 4
    assert round(max(durations) / 1000) == 3


def test_an_early_keyframe_where_the_encoder_restarts_its_gop_is_a_cut():
    # Scene cut 1.833 s into the second segment; the encoder's GOP counts from it.
    keys = [0, 2000, 3833, 5833, 7833]
    starts, durations, _ = cuts(publish(keys, 9000))
    assert starts == keys
    assert durations == [2000, 1833, 2000, 2000]


@pytest.mark.parametrize("reset", [True, False], ids=["gop-reset", "no-gop-reset"])
def test_a_scene_cut_keyframe_0_1_s_after_a_cut_is_not_a_cut(reset):
    keys = [0, 2000, 2100, 4100, 6100] if reset else [0, 2000, 2100, 4000, 6000]
    starts, durations, _ = cuts(publish(keys, keys[-1] + 1000))
    assert starts == [k for k in keys if k != 2100]
    assert durations == ([2000, 2100, 2000] if reset else [2000, 2000, 2000])


def test_a_keyframe_before_half_the_target_is_never_a_cut():
    # A 0.9 s GOP: 0.9 is under half the target, 1.8 is the cut (2.7 would overshoot).
    keys = list(range(0, 9000, 900))
    starts, durations, _ = cuts(publish(keys, 9000))
    assert starts == list(range(0, 9000, 1800))
    assert min(durations) * 2 >= TARGET


def test_no_segment_is_longer_than_the_target_plus_one_frame_for_common_gops():
    for gop in (500, 1000, 1999, 2000, 2001):
        keys = list(range(0, 20_000, gop))
        _, durations, _ = cuts(publish(keys, 20_000))
        assert max(durations) <= TARGET + FRAME_MS + 1, (gop, durations)


def test_audio_only_cuts_on_the_first_audio_frame_at_the_target():
    messages = [wire.AudioConfig(ASC)] + [
        wire.Audio(round(j * 1024 / 48), b"a") for j in range(int(9000 * 48 / 1024))
    ]
    _, durations, _ = cuts(messages)
    assert durations and all(TARGET <= d < TARGET + 1024 / 48 for d in durations)


def test_the_rule_continues_from_a_state_that_crossed_a_serialisation():
    # What a relup or a hand-over does to the state: builtins and back, strictly.
    import msgspec

    from mediaserver.logic import StreamState

    keys = alternating(1999, 2000, 11)
    messages = publish(keys, keys[-1] + 1000)
    whole, _, _ = cuts(messages)
    half = len(messages) // 2
    first, _, state = cuts(messages[:half])
    state = msgspec.convert(msgspec.to_builtins(state), StreamState)
    assert state.last_keyframe_dts >= 0 and state.last_gop_ms in (1999, 2000)
    second, _, _ = cuts(messages[half:], state)
    assert first + second == whole == keys
