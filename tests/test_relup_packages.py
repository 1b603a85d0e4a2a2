"""The relups shipped in relups/: 1.0.0 -> 1.1.0 -> 1.2.0, and back.

Each package is checked the way the engine will use it (spec, generation,
source policy, migrations on builtins validated strictly), then run on a
synthetic stream: the output (segments, packets, logs) must be exactly what
1.0.0 alone produces, whatever the switch points; the new figures must match
what was fed; and every migration must be exactly reversible on states taken
at every point of a stream.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mediaserver import wire
from mediaserver.runtime.generation import installed_logic_dir, load_generation, purge, read_sources
from mediaserver.runtime.relup import MIGRATIONS_MODULE
from mediaserver.runtime.relup_spec import LoadLogic, UpdateSessions, read_spec
from mediaserver.runtime.source_policy import check_source

RELUPS = Path(__file__).resolve().parent.parent / "relups"
CHAIN = ["1.0.0", "1.1.0", "1.2.0"]
"""Versions in upgrade order; every package upgrades from the one before it."""
PACKAGES = list(zip(CHAIN[1:], CHAIN[:-1]))
"""(to, from) of each package."""
STATE_VERSIONS = {"1.0.0": 1, "1.1.0": 2, "1.2.0": 3}
SETTINGS = {"segment_target_ms": 2000, "timestamp_jump_ms": 10000}

# The synthetic stream: 30 fps video with a keyframe every second, AAC frames
# of 1024 samples at 48 kHz. Payload sizes are fixed so the bitrate fed is known.
FPS = 30
GOP = 30
AUDIO_FRAME_MS = 1024 * 1000 / 48000
KEY_BYTES, DELTA_BYTES, AUDIO_BYTES = 12_000, 3_000, 360

WRAP = 2**32
STARTS = [(0, WRAP), (WRAP - 2500, WRAP), (2**31 - 2500, 2**31)]
"""(first raw timestamp, modulus): plain, the 32-bit wrap 2.5 s in, and the
2**31 wrap of FFmpeg's FLV muxer (it masks the top bit)."""


# -- the synthetic stream ------------------------------------------------------


def video_size(index: int) -> int:
    # Uneven sizes, as an encoder's are: per-track rates then round differently.
    return KEY_BYTES if index % GOP == 0 else DELTA_BYTES + index * 37 % 400


def audio_size(index: int) -> int:
    return AUDIO_BYTES + index * 53 % 90


def stream(
    seconds: float = 5.0,
    start: int = 0,
    modulus: int = WRAP,
    jump_at_ms: int | None = None,
    reconfigure_at_ms: int | None = None,
    late_video_ms: int | None = None,
    jitter: bool = True,
    end: bool = True,
) -> list[Any]:
    """Metadata and configs, then video and audio interleaved by dts, then End.

    Each option drives a 1.0.0 path the new versions must keep:
    `jump_at_ms`: the publisher's clock jumps 60 s ahead there (both tracks);
    `reconfigure_at_ms`: a new video config arrives there (cut, discontinuity);
    `late_video_ms`: the video config only arrives then (earlier video is
    dropped, the audio-only segment is cut when video joins);
    `jitter`: every 45th video frame is stamped 40 ms early (dts fixed up).
    """
    media: list[tuple[int, int, Any]] = []

    def raw(dts: int) -> int:
        jumped = 60_000 if jump_at_ms is not None and dts >= jump_at_ms else 0
        return (start + dts + jumped) % modulus

    for i in range(int(seconds * FPS)):
        dts = i * 1000 // FPS
        key = i % GOP == 0
        stamped = dts - 40 if jitter and i % 45 == 44 else dts
        data = bytes([i % 251]) * video_size(i)
        media.append((dts, 1, wire.Video(raw(stamped), 0 if key else 33, key, data)))
    for j in range(int(seconds * 1000 / AUDIO_FRAME_MS)):
        dts = int(j * AUDIO_FRAME_MS)
        media.append((dts, 2, wire.Audio(raw(dts), bytes([j % 251]) * audio_size(j))))
    video_config = wire.VideoConfig(b"\x01avc-config-1")
    if late_video_ms is not None:
        media.append((late_video_ms, 0, video_config))
    if reconfigure_at_ms is not None:
        media.append((reconfigure_at_ms, 0, wire.VideoConfig(b"\x01avc-config-2")))
    media.sort(key=lambda item: (item[0], item[1]))
    messages: list[Any] = [
        wire.Metadata({"width": 640, "height": 360, "framerate": 30.0, "encoder": "test"}),
        wire.AudioConfig(b"\x12\x10"),
    ]
    if late_video_ms is None:
        messages.append(video_config)
    messages += [message for _, _, message in media]
    if end:
        messages.append(wire.End(now=0.0, reason="test over"))
    return messages


def fed_kbps(messages: list[Any], seconds: float, kind: str | None = None) -> float:
    sizes = [len(m.data) for m in messages if m.kind in ("video", "audio") and kind in (None, m.kind)]
    return sum(sizes) * 8 / seconds / 1000


# -- generations and migrations --------------------------------------------------


@pytest.fixture
def gens():
    """Every version's generation, loaded fresh and purged after the test."""
    loaded: dict[str, Any] = {}
    try:
        loaded["1.0.0"] = load_generation(installed_logic_dir())
        for version, _ in PACKAGES:
            loaded[version] = load_generation(RELUPS / version / "logic")
        yield loaded
    finally:
        for generation in loaded.values():
            purge(generation)


def load_migrations(version: str) -> ModuleType:
    """The package's migrations.py, imported from its file under a private name."""
    path = RELUPS / version / "migrations.py"
    spec = importlib.util.spec_from_file_location(f"_test_relup_migrations_{version.replace('.', '_')}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MIGRATIONS = {version: load_migrations(version) for version, _ in PACKAGES}


def strict(builtins: dict[str, Any], state_type: type) -> Any:
    """`builtins` as `state_type`, proving nothing was filled in by a default or coerced."""
    state = msgspec.convert(builtins, state_type)
    encode = msgspec.json.Encoder(order="sorted").encode
    assert encode(msgspec.to_builtins(state)) == encode(builtins)
    return state


def migrate(state: Any, version: str, direction: str, state_type: type) -> Any:
    """One migration as the engine runs it, also proving it leaves its input alone."""
    builtins = msgspec.to_builtins(state)
    before = copy.deepcopy(builtins)
    result = getattr(MIGRATIONS[version], direction)(builtins)
    assert builtins == before, f"{version} {direction} changed its input"
    return strict(result, state_type)


def up(gens: dict[str, Any], state: Any, to: str) -> Any:
    return migrate(state, to, "up", gens[to].state_type)


def down(gens: dict[str, Any], state: Any, version: str) -> Any:
    """From `version` to the version before it."""
    previous = CHAIN[CHAIN.index(version) - 1]
    return migrate(state, version, "down", gens[previous].state_type)


def run(generation: Any, messages: list[Any], state: Any = None) -> tuple[Any, list[tuple[Any, ...]]]:
    state = generation.init("s", 0.0, SETTINGS) if state is None else state
    out: list[tuple[Any, ...]] = []
    for message in messages:
        state, effects = generation.handle(state, message)
        out.extend(effects)
    return state, out


def states_at_every_point(generation: Any, messages: list[Any]) -> list[Any]:
    state = generation.init("s", 0.0, SETTINGS)
    states = [state]
    for message in messages:
        state, _ = generation.handle(state, message)
        states.append(state)
    return states


# -- the packages ----------------------------------------------------------------


@pytest.mark.parametrize("version, previous", PACKAGES)
def test_package_is_what_the_engine_expects(gens, version, previous):
    package = RELUPS / version
    spec = read_spec(package / "relup.toml")
    assert (spec.from_version, spec.to_version) == (previous, version)
    assert spec.description
    assert [type(i) for i in spec.instructions] == [LoadLogic, UpdateSessions]
    assert spec.load.path == "logic"
    assert [(u.kind, u.up, u.down) for u in spec.updates] == [("stream", "up", "down")]

    generation = gens[version]
    assert generation.version == version
    assert generation.state_version == STATE_VERSIONS[version]
    assert generation.init("s", 0.0, SETTINGS).version == STATE_VERSIONS[version]

    sources = [path for _, path in read_sources(package / "logic").values()]
    sources.append(package / "migrations.py")
    for path in sources:
        assert check_source(path.read_bytes(), str(path)) == [], path

    # The engine loads migrations.py inside the new generation: that must work too.
    with_migrations = load_generation(package / "logic", {MIGRATIONS_MODULE: package / "migrations.py"})
    try:
        module = sys.modules[f"{with_migrations.package_name}.{MIGRATIONS_MODULE}"]
        assert callable(module.up) and callable(module.down)
    finally:
        purge(with_migrations)


CHANGED = {"1.1.0": {"__init__", "state", "stream", "rate"}, "1.2.0": {"__init__", "state", "stream", "rates"}}
"""Modules each package changes or adds; the others are the installed logic's, byte for byte."""


@pytest.mark.parametrize("version", [v for v, _ in PACKAGES])
def test_modules_a_package_does_not_change_are_the_installed_ones(version):
    """A fix to the installed logic must reach the packages too, or upgrading undoes it."""
    installed = read_sources(installed_logic_dir())
    shipped = read_sources(RELUPS / version / "logic")
    assert set(shipped) - set(installed) <= CHANGED[version]
    assert set(installed) <= set(shipped), "a module of the installed logic is missing"
    for name in set(installed) - CHANGED[version]:
        assert shipped[name][0] == installed[name][0], (
            f"relups/{version}/logic/{name}.py differs from mediaserver/logic/{name}.py: copy the change over"
        )


@pytest.mark.parametrize("version", [v for v, _ in PACKAGES])
def test_effect_opcodes_are_the_runtime_ones(gens, version):
    effects = sys.modules[f"{gens[version].package_name}.effects"]
    restated = {name: value for name, value in vars(effects).items() if name.isupper()}
    assert restated == {name: getattr(wire, name) for name in restated}
    assert set(restated.values()) == wire.EFFECT_OPCODES


@pytest.mark.parametrize("version, previous", PACKAGES)
def test_a_state_of_another_version_is_refused(gens, version, previous):
    older = msgspec.to_builtins(gens[previous].init("s", 0.0, SETTINGS))
    newer = msgspec.to_builtins(gens[version].init("s", 0.0, SETTINGS))
    with pytest.raises(ValueError, match="version"):
        MIGRATIONS[version].up(newer)
    with pytest.raises(ValueError, match="version"):
        MIGRATIONS[version].down(older)


# -- behaviour is preserved --------------------------------------------------------


def chain_run(gens: dict[str, Any], messages: list[Any], cuts: list[int]) -> tuple[Any, list[tuple[Any, ...]]]:
    """Run from 1.0.0 up the chain and back down to it, switching before message cuts[k]
    (a cut at len(messages) switches after the last message)."""
    path = CHAIN + CHAIN[-2::-1]
    version, state, out = path[0], gens[path[0]].init("s", 0.0, SETTINGS), []
    switches = list(zip(cuts, path[1:]))
    for index in range(len(messages) + 1):
        while switches and switches[0][0] == index:
            _, target = switches.pop(0)
            if CHAIN.index(target) > CHAIN.index(version):
                state = up(gens, state, target)
            else:
                state = down(gens, state, version)
            version = target
        if index < len(messages):
            state, effects = gens[version].handle(state, messages[index])
            out.extend(effects)
    assert version == path[-1]
    return state, out


@pytest.mark.parametrize("start, modulus", STARTS)
@pytest.mark.parametrize("version, previous", PACKAGES)
def test_output_is_what_the_old_logic_alone_writes(gens, version, previous, start, modulus):
    messages = stream(6.0, start, modulus, jump_at_ms=3500, reconfigure_at_ms=4200)
    _, alone = run(gens[previous], messages)
    end_state = run(gens["1.0.0"], messages)[0]
    # The stream does reach the paths it is meant to.
    assert end_state.health.timestamp_jumps and end_state.health.timestamp_fixes
    assert [e[2] for e in alone if e[0] == wire.SEGMENT_START].count(True) == 1  # the reconfigure
    for cut in (0, 1, 3, len(messages) // 3, len(messages) // 2, len(messages) - 1):
        old_state, before = run(gens[previous], messages[:cut])
        _, after = run(gens[version], messages[cut:], up(gens, old_state, version))
        assert before + after == alone, f"switch before message {cut}"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.data(),
    start=st.sampled_from(STARTS),
    jump=st.sampled_from([None, 1700, 3900]),
    late_video=st.sampled_from([None, 1200]),
)
def test_any_switch_points_up_and_down_the_chain_write_the_same_output(gens, data, start, jump, late_video):
    messages = stream(5.0, *start, jump_at_ms=jump, reconfigure_at_ms=2600, late_video_ms=late_video)
    switches = 2 * (len(CHAIN) - 1)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(messages)), min_size=switches, max_size=switches)))
    alone_state, alone = run(gens["1.0.0"], messages)
    state, out = chain_run(gens, messages, cuts)
    assert out == alone
    # Back on 1.0.0, the session is exactly one that never left it.
    assert state == alone_state


# -- the new figures -----------------------------------------------------------------


@pytest.mark.parametrize("start, modulus", STARTS)
def test_1_1_0_shows_bitrate_and_fps_of_what_was_fed(gens, start, modulus):
    seconds = 5.0
    messages = stream(seconds, start, modulus, end=False)
    cut = len(messages) // 4
    old_state, _ = run(gens["1.0.0"], messages[:cut])
    assert "bitrate_kbps" not in gens["1.0.0"].describe(old_state)
    assert "fps" not in gens["1.0.0"].describe(old_state)

    state = up(gens, old_state, "1.1.0")
    shown = gens["1.1.0"].describe(state)
    # Right after the switch nothing is measured yet; every 1.0.0 key is still there.
    assert (shown["bitrate_kbps"], shown["fps"]) == (0.0, 0.0)
    assert shown == {**gens["1.0.0"].describe(old_state), "state_version": 2, "bitrate_kbps": 0.0, "fps": 0.0}

    state, _ = run(gens["1.1.0"], messages[cut:], state)
    shown = gens["1.1.0"].describe(state)
    assert shown["bitrate_kbps"] == pytest.approx(fed_kbps(messages, seconds), rel=0.05)
    assert abs(shown["fps"] - FPS) <= 1
    # From the first frame on, the figures are there one second in.
    fresh, _ = run(gens["1.1.0"], messages[: len(messages) // 2])
    assert abs(gens["1.1.0"].describe(fresh)["fps"] - FPS) <= 1


def test_rate_windows_hold_every_byte_once(gens):
    """Closed windows plus the open one add up to exactly the bytes written."""
    messages = stream(4.0, end=False)
    state = gens["1.1.0"].init("s", 0.0, SETTINGS)
    closed_bytes = written = 0
    for message in messages:
        before = state.rate
        state, effects = gens["1.1.0"].handle(state, message)
        written += sum(len(e[5]) for e in effects if e[0] == wire.PACKET)
        if state.rate.window_start_ms != before.window_start_ms and before.window_start_ms >= 0:
            closed_bytes += before.window_bytes
            span = state.rate.window_start_ms - before.window_start_ms
            assert 1000 <= span <= 1000 + 34  # closed by the next frame of either track
            assert state.rate.bitrate_bps == before.window_bytes * 8000 // span
    assert closed_bytes + state.rate.window_bytes == written
    assert state.rate.keyframe_interval_ms == 1000


def test_1_2_0_keeps_what_1_1_0_shows_and_adds_per_track_rates_and_the_keyframe_interval(gens):
    seconds = 6.0
    messages = stream(seconds, WRAP - 2500, end=False)
    first, second = len(messages) // 4, len(messages) // 2
    s11, _ = run(gens["1.1.0"], messages[first:second], up(gens, run(gens["1.0.0"], messages[:first])[0], "1.1.0"))
    s12 = up(gens, s11, "1.2.0")
    shown11, shown12 = gens["1.1.0"].describe(s11), gens["1.2.0"].describe(s12)
    # The switch changes no figure: every 1.1.0 key, same value.
    assert shown12 == {**shown11, "state_version": 3, **{k: shown12[k] for k in NEW_IN_1_2_0}}
    assert shown11["bitrate_kbps"] > 0

    s12, _ = run(gens["1.2.0"], messages[second:], s12)
    shown = gens["1.2.0"].describe(s12)
    assert set(NEW_IN_1_2_0) <= set(shown) and not set(NEW_IN_1_2_0) & set(shown11)
    assert shown["bitrate_kbps"] == pytest.approx(fed_kbps(messages, seconds), rel=0.05)
    assert shown["video_kbps"] == pytest.approx(fed_kbps(messages, seconds, "video"), rel=0.05)
    assert shown["audio_kbps"] == pytest.approx(fed_kbps(messages, seconds, "audio"), rel=0.05)
    assert abs(shown["fps"] - FPS) <= 1
    assert shown["keyframe_interval_ms"] == 1000  # the GOP, across the wrap


NEW_IN_1_2_0 = ("video_kbps", "audio_kbps", "keyframe_interval_ms")


# -- migrations are exact -----------------------------------------------------------------


@pytest.mark.parametrize("start, modulus", STARTS)
def test_migrations_round_trip_at_every_point_of_a_stream(gens, start, modulus):
    messages = stream(4.0, start, modulus, jump_at_ms=2100, reconfigure_at_ms=2900, late_video_ms=700)
    states = {v: states_at_every_point(gens[v], messages) for v in CHAIN}
    assert states["1.0.0"][-1].health.dropped_frames > 0  # video before its config
    for index in range(len(messages) + 1):
        s10, s11, s12 = (states[v][index] for v in CHAIN)
        assert down(gens, up(gens, s10, "1.1.0"), "1.1.0") == s10, index
        assert down(gens, up(gens, s11, "1.2.0"), "1.2.0") == s11, index
        assert up(gens, down(gens, s12, "1.2.0"), "1.2.0") == s12, index
        # 1.1.0 only adds: its state less the rate window is 1.0.0's, exactly.
        assert down(gens, s11, "1.1.0") == s10, index
        # 1.2.0 only regroups: migrating commutes with handling messages, so a
        # switched session is exactly one that ran 1.2.0 from the start...
        assert up(gens, s11, "1.2.0") == s12, index
        # ...and a 1.2.0 state goes down through 1.1.0 to 1.0.0's.
        assert down(gens, down(gens, s12, "1.2.0"), "1.1.0") == s10, index
        assert gens["1.2.0"].describe(s12) == {
            **gens["1.1.0"].describe(s11), "state_version": 3, **{k: gens["1.2.0"].describe(s12)[k] for k in NEW_IN_1_2_0}
        }


def test_the_whole_chain_up_and_back_down_gives_the_original_state(gens):
    messages = stream(3.0, WRAP - 1000, jump_at_ms=1500)
    for index in (0, 3, 50, 200, len(messages)):
        original, _ = run(gens["1.0.0"], messages[:index])
        state = original
        for version in CHAIN[1:]:
            state = up(gens, state, version)
        for version in CHAIN[:0:-1]:
            state = down(gens, state, version)
        assert state == original


def test_the_cut_rule_keeps_its_keyframe_history_across_the_chain(gens):
    # Keyframes 1999/2000 ms apart (a 2 s GOP in RTMP's ms): 2 s segments in
    # every version, and a switch (up or down) between two keyframes keeps what
    # the rule learnt of the keyframe interval, so the cuts stay where they were.
    messages = [wire.VideoConfig(b"\x01avc-config-1"), wire.AudioConfig(b"\x12\x10")]
    key, media = 0, []
    for gop in range(8):
        step = 1999 if gop % 2 == 0 else 2000
        for j in range(60):
            ts = key + round(j * 1000 / FPS)
            if ts < key + step - 16:
                media.append((ts, 1, wire.Video(ts, 0, j == 0, b"v")))
        key += step
    media += [(int(j * AUDIO_FRAME_MS), 0, wire.Audio(int(j * AUDIO_FRAME_MS), b"a")) for j in range(int(key / AUDIO_FRAME_MS))]
    media.sort(key=lambda item: (item[0], item[1]))
    messages += [message for _, _, message in media] + [wire.End(now=0.0, reason="test over")]

    def ends(effects):
        return [effect[2] for effect in effects if effect[0] == "segment_end"]

    _, alone = run(gens["1.0.0"], messages)
    assert set(ends(alone)[:-1]) == {1999, 2000}
    middle = next(i for i, m in enumerate(messages) if m.kind == "video" and m.ts > 5000)
    state, before = run(gens["1.0.0"], messages[:middle])
    assert (state.last_keyframe_dts, state.last_gop_ms) == (3999, 2000)
    s12 = up(gens, up(gens, state, "1.1.0"), "1.2.0")
    assert (s12.last_keyframe_dts, s12.last_gop_ms) == (3999, 2000)
    _, after = run(gens["1.2.0"], messages[middle:], s12)
    assert ends(before + after) == ends(alone)
    assert down(gens, down(gens, s12, "1.2.0"), "1.1.0") == state
