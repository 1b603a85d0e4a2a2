"""The stream handler as a pure function: segments, configs, end, purity."""

import msgspec
import pytest

from mediaserver import wire
from mediaserver.logic import effects as logic_effects
from mediaserver.logic import describe, handle, init
from mediaserver.logic.state import StreamState

SETTINGS = {"segment_target_ms": 2000, "timestamp_jump_ms": 10000}
AVCC = b"\x01\x64\x00\x1f\xff\xe1\x00\x04abcd\x01\x00\x02ef"
ASC = b"\x11\x90"


def feed(state, messages):
    all_effects = []
    for message in messages:
        state, effects = handle(state, message)
        all_effects.extend(effects)
    return state, all_effects


def av_stream(seconds, fps=30, gop=30, audio=True, start=0):
    """Messages of a stream: configs then interleaved video/audio frames."""
    messages = [wire.VideoConfig(AVCC)]
    if audio:
        messages.append(wire.AudioConfig(ASC))
    frames = int(seconds * fps)
    audio_ts = 0.0
    for i in range(frames):
        ts = start + round(i * 1000 / fps)
        messages.append(wire.Video((ts) % 2**32, 0, i % gop == 0, b"v%d" % i))
        while audio and audio_ts <= i * 1000 / fps:
            messages.append(wire.Audio((start + round(audio_ts)) % 2**32, b"a"))
            audio_ts += 1024 / 48
    return messages


def ops(effects, op):
    return [e for e in effects if e[0] == op]


def test_effect_opcodes_match_the_runtime_contract():
    names = {v for k, v in vars(logic_effects).items() if k.isupper()}
    assert names == set(wire.EFFECT_OPCODES)


def test_segments_cut_on_keyframes_after_target():
    state, effects = feed(init("s", 0.0, SETTINGS), av_stream(7))
    starts = ops(effects, "segment_start")
    ends = ops(effects, "segment_end")
    assert [s[1] for s in starts] == [0, 1, 2, 3]
    assert [e[2] for e in ends] == [2000, 2000, 2000]
    assert not any(s[2] for s in starts)
    state, tail = handle(state, wire.End(now=1.0, reason="test"))
    (last_end,) = ops(tail, "segment_end")
    assert last_end[1] == 3 and 1000 <= last_end[2] <= 1001  # 1 s of 30 fps with ms rounding
    assert ops(tail, "stream_end") == [("stream_end",)]
    assert state.sequence == 4 and state.ended


def test_every_frame_is_written_once_in_order():
    messages = av_stream(5)
    _, effects = feed(init("s", 0.0, SETTINGS), messages)
    packets = ops(effects, "packet")
    sent = [m for m in messages if m.kind in ("video", "audio")]
    assert [bytes(p[5]) for p in packets] == [bytes(m.data) for m in sent]
    video_dts = [p[2] for p in packets if p[1] == "video"]
    assert video_dts == sorted(set(video_dts))


def test_first_segment_waits_for_a_keyframe():
    messages = [wire.VideoConfig(AVCC), wire.Video(0, 0, False, b"x"), wire.Video(33, 0, True, b"k")]
    state, effects = feed(init("s", 0.0, SETTINGS), messages)
    assert [e[0] for e in effects] == ["codec", "segment_start", "packet", "thumbnail"]
    assert state.health.dropped_frames == 1


def test_audio_only_segments_cut_on_duration():
    messages = [wire.AudioConfig(ASC)] + [wire.Audio(round(i * 21.333), b"a") for i in range(300)]
    _, effects = feed(init("s", 0.0, SETTINGS), messages)
    ends = ops(effects, "segment_end")
    assert len(ends) == 3
    assert all(2000 <= e[2] < 2030 for e in ends)


def test_stream_across_rtmp_wrap_has_no_jump():
    messages = av_stream(6, start=2**32 - 3000)
    state, effects = feed(init("s", 0.0, SETTINGS), messages)
    assert state.health.timestamp_jumps == 0
    video_dts = [p[2] for p in ops(effects, "packet") if p[1] == "video"]
    steps = {b - a for a, b in zip(video_dts, video_dts[1:])}
    assert steps <= {33, 34}


def test_config_change_cuts_with_discontinuity_at_next_keyframe():
    messages = av_stream(3, audio=False)
    messages.append(wire.VideoConfig(AVCC + b"\x00"))
    messages.append(wire.Video(3000, 0, False, b"p"))
    messages.append(wire.Video(3033, 0, True, b"k"))
    _, effects = feed(init("s", 0.0, SETTINGS), messages)
    starts = ops(effects, "segment_start")
    assert starts[-1] == ("segment_start", 2, True)


def test_republish_settings_continue_sequence_with_discontinuity():
    state = init("s", 0.0, {**SETTINGS, "first_sequence": 7, "discontinuity": True})
    _, effects = feed(state, av_stream(1))
    assert ops(effects, "segment_start")[0] == ("segment_start", 7, True)


def test_handler_never_mutates_its_input_state():
    state = init("s", 0.0, SETTINGS)
    state, _ = feed(state, av_stream(1))
    before = msgspec.to_builtins(state)
    for message in av_stream(1, start=1000)[2:] + [wire.End(now=0.0, reason="x")]:
        handle(state, message)
        assert msgspec.to_builtins(state) == before


def test_state_round_trips_through_builtins():
    state, _ = feed(init("s", 0.0, SETTINGS), av_stream(3))
    again = msgspec.convert(msgspec.to_builtins(state), StreamState)
    assert again == state
    assert describe(again)["video_frames"] == 90


def test_state_rejects_unknown_fields():
    data = msgspec.to_builtins(init("s", 0.0, SETTINGS))
    data["surprise"] = 1
    with pytest.raises(msgspec.ValidationError, match="surprise"):
        msgspec.convert(data, StreamState)


def test_audio_before_the_first_keyframe_is_kept():
    messages = [
        wire.VideoConfig(AVCC), wire.AudioConfig(ASC),
        wire.Audio(0, b"a0"), wire.Video(0, 0, False, b"p"), wire.Video(0, 0, True, b"k"),
        wire.Audio(21, b"a1"),
    ]
    state, effects = feed(init("s", 0.0, SETTINGS), messages)
    packets = [(e[1], bytes(e[5])) for e in ops(effects, "packet")]
    assert packets == [("audio", b"a0"), ("video", b"k"), ("audio", b"a1")]
    assert ops(effects, "segment_start") == [("segment_start", 0, False)]
    assert state.health.dropped_frames == 1


def test_thumbnails_come_from_keyframes_once_per_interval():
    settings = {**SETTINGS, "thumbnail_interval_ms": 2500}
    _, effects = feed(init("s", 0.0, settings), av_stream(7))
    thumbs = ops(effects, "thumbnail")
    assert [t[1] for t in thumbs] == [0, 3000, 6000]
    assert all(bytes(t[2]).startswith(b"v") for t in thumbs)


def test_levels_windows_are_bounded_and_periodic():
    settings = {**SETTINGS, "levels_interval_ms": 2000, "levels_window_ms": 500}
    _, effects = feed(init("s", 0.0, settings), av_stream(5))
    ends = [e[1] for e in ops(effects, "levels_end")]
    frames = len(ops(effects, "levels_frame"))
    # Windows open on the first audio frame at or after 0, 2000, 4000 ms and
    # close on the first frame at or after 500 ms later (frames are ~21.3 ms).
    assert ends == [512, 2517, 4523]
    assert frames == 3 * 24


def test_previews_can_be_turned_off():
    settings = {**SETTINGS, "thumbnail_interval_ms": 0, "levels_interval_ms": 0}
    _, effects = feed(init("s", 0.0, settings), av_stream(3))
    assert not ops(effects, "thumbnail") and not ops(effects, "levels_frame")
