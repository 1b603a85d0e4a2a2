"""The relups shipped in relups/: 1.0.0 -> 1.1.0 -> 1.2.0, and back.

Behaviour is preserved across every switch (the same effects as 1.0.0 alone),
the new figures appear, and every migration is exactly reversible.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import msgspec
import pytest

from mediaserver import wire
from mediaserver.runtime.generation import installed_logic_dir, load_generation, purge, read_sources
from mediaserver.runtime.relup_spec import read_spec
from mediaserver.runtime.source_policy import check_source

from synthetic import media

RELUPS = Path(__file__).resolve().parent.parent / "relups"
SETTINGS = {"segment_target_ms": 2000, "timestamp_jump_ms": 10000}
CHAIN = [("1.1.0", "1.0.0"), ("1.2.0", "1.1.0")]


def migrations(version: str):
    spec = importlib.util.spec_from_file_location(f"migrations_{version}", RELUPS / version / "migrations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def migrate(state, fn, target):
    return msgspec.convert(fn(copy.deepcopy(msgspec.to_builtins(state))), target)


def messages(seconds=8, start=0):
    """A real stream as session messages, optionally starting near the 32-bit wrap."""
    video, audio, packets = media()
    out = [wire.VideoConfig(video), wire.AudioConfig(audio)]
    span = packets[-1][1] + 40
    loops = int(seconds * 1000 // span) + 1
    for loop in range(loops):
        for kind, dts, pts, key, data in packets:
            ts = (start + dts + loop * span) % 2**32
            if kind == "video":
                out.append(wire.Video(ts, pts - dts, key, data))
            else:
                out.append(wire.Audio(ts, data))
    return out


@pytest.fixture(scope="module")
def generations():
    loaded = {"1.0.0": load_generation(installed_logic_dir())}
    for version, _ in CHAIN:
        loaded[version] = load_generation(RELUPS / version / "logic")
    yield loaded
    for generation in loaded.values():
        purge(generation)


@pytest.mark.parametrize("version, previous", CHAIN)
def test_package_is_well_formed(version, previous, generations):
    spec = read_spec(RELUPS / version / "relup.toml")
    assert (spec.from_version, spec.to_version) == (previous, version)
    assert generations[version].version == version
    for text, path in read_sources(RELUPS / version / "logic").values():
        assert check_source(text, str(path)) == [], path
    text = (RELUPS / version / "migrations.py").read_bytes()
    assert check_source(text, "migrations.py") == []


@pytest.mark.parametrize("start", [0, 2**32 - 3000])
def test_behaviour_is_preserved_across_the_chain_and_back(generations, start):
    stream = messages(seconds=15, start=start)
    base = generations["1.0.0"]
    alone_state = base.init("s", 0.0, SETTINGS)
    alone = []
    for message in stream:
        alone_state, effects = base.handle(alone_state, message)
        alone.extend(effects)

    # Switch generations every quarter of the stream: up, up, down, down.
    order = ["1.0.0", "1.1.0", "1.2.0", "1.1.0", "1.0.0"]
    steps = [
        (migrations("1.1.0").up, "1.1.0"),
        (migrations("1.2.0").up, "1.2.0"),
        (migrations("1.2.0").down, "1.1.0"),
        (migrations("1.1.0").down, "1.0.0"),
    ]
    cut = len(stream) // 5
    state = base.init("s", 0.0, SETTINGS)
    current = base
    mixed = []
    described = {}
    for index, message in enumerate(stream):
        if index and index % cut == 0 and steps:
            fn, version = steps.pop(0)
            current = generations[version]
            state = migrate(state, fn, current.state_type)
        state, effects = current.handle(state, message)
        mixed.extend(effects)
        described[current.version] = current.describe(state)
    assert current.version == order[-1]
    assert _comparable(mixed) == _comparable(alone)

    assert "bitrate_kbps" not in described["1.0.0"]
    media_messages = [m for m in stream if m.kind in ("video", "audio")]
    duration_s = len([m for m in media_messages if m.kind == "video"]) / 25
    bitrate = sum(len(m.data) for m in media_messages) * 8 / duration_s / 1000
    for version in ("1.1.0", "1.2.0"):
        info = described[version]
        assert abs(info["fps"] - 25) <= 1, info
        assert info["bitrate_kbps"] == pytest.approx(bitrate, rel=0.25), info
    assert described["1.2.0"]["keyframe_interval_ms"] in (1000, 1040)  # the clip loops every 2040 ms
    assert "keyframe_interval_ms" not in described["1.1.0"]


def _comparable(effects):
    return [tuple(bytes(x) if isinstance(x, memoryview) else x for x in e) for e in effects]


def test_down_up_is_identity_at_every_point(generations):
    stream = messages(seconds=3)
    states = {v: g.init("s", 0.0, SETTINGS) for v, g in generations.items()}
    m11, m12 = migrations("1.1.0"), migrations("1.2.0")
    for index, message in enumerate(stream):
        for version, generation in generations.items():
            states[version], _ = generation.handle(states[version], message)
        if index % 7:
            continue
        s10 = states["1.0.0"]
        s11 = migrate(s10, m11.up, generations["1.1.0"].state_type)
        assert migrate(s11, m11.down, generations["1.0.0"].state_type) == s10
        s12 = migrate(states["1.1.0"], m12.up, generations["1.2.0"].state_type)
        assert migrate(s12, m12.down, generations["1.1.0"].state_type) == states["1.1.0"]
        # A 1.2.0 state goes down through 1.1.0 to a valid 1.0.0 state.
        down = migrate(migrate(states["1.2.0"], m12.down, generations["1.1.0"].state_type),
                       m11.down, generations["1.0.0"].state_type)
        assert down.health == states["1.0.0"].health and down.sequence == states["1.0.0"].sequence


def test_migrations_do_not_touch_their_input():
    state = msgspec.to_builtins(load_generation(installed_logic_dir()).init("s", 0.0, SETTINGS))
    before = copy.deepcopy(state)
    up = migrations("1.1.0").up(state)
    assert state == before
    before_up = copy.deepcopy(up)
    migrations("1.2.0").up(up)
    assert up == before_up
