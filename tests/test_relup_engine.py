"""The relup transaction, in process: preflight, switch, revert, auto-revert, purge.

Sessions here are real runtime sessions with real HLS writers; only the
transport side of a publish (the socket) is a stand-in, because the engine
never touches it. End-to-end relups under real ffmpeg publishers are in
test_relup_live.py.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import textwrap
import tracemalloc
from pathlib import Path

import msgspec
import pytest

from mediaserver import wire
from mediaserver.config import Config, RelupConfig, SupervisorConfig
from mediaserver.runtime.generation import installed_logic_dir, load_generation
from mediaserver.runtime.relup import CodeServer
from mediaserver.runtime.streams import Streams

from relup_factory import make_relup
from synthetic import media


class Publisher:
    """The transport side of a publish, as the registry sees it."""

    def __init__(self, client: str) -> None:
        self.client = client
        self.disconnected: str | None = None

    def disconnect(self, reason: str) -> None:
        self.disconnected = reason


class Rig:
    def __init__(self, tmp: Path, **relup_config) -> None:
        self.relups = tmp / "relups"
        self.relups.mkdir(exist_ok=True)
        self.config = Config(
            data_dir=str(tmp / "data"),
            relup=RelupConfig(directory=str(self.relups), **relup_config),
            supervisor=SupervisorConfig(max_restarts=50, restart_window=10.0),
        )
        self.generation = load_generation(installed_logic_dir())
        self.streams = Streams(self.config, self.generation)
        self.code = CodeServer(self.config.relup, self.streams, self.generation)
        self.publishers: dict[str, Publisher] = {}
        self.ts: dict[str, int] = {}

    def publish(self, name: str) -> None:
        self.publishers[name] = Publisher(f"test:{name}")
        session = self.streams.publish(name, self.publishers[name], lambda pause: None)
        video, audio, _ = media()
        session.deliver(wire.VideoConfig(video))
        session.deliver(wire.AudioConfig(audio))
        self.ts[name] = 0

    def frames(self, name: str, count: int) -> None:
        """`count` real packets (video and audio), looping the clip with rising timestamps."""
        session = self.streams.live[name].session
        _, _, packets = media()
        span = packets[-1][1] + 40
        for _ in range(count):
            index = self.ts[name]
            kind, dts, pts, key, data = packets[index % len(packets)]
            offset = (index // len(packets)) * span
            if kind == "video":
                session.deliver(wire.Video(dts + offset, pts - dts, key, data))
            else:
                session.deliver(wire.Audio(dts + offset, data))
            self.ts[name] = index + 1

    def states(self) -> dict[str, dict]:
        return {n: msgspec.to_builtins(l.session.state) for n, l in self.streams.live.items()}

    def versions(self) -> set[str]:
        return {l.session.generation.version for l in self.streams.live.values()}


@pytest.fixture
def rig(tmp_path):
    return Rig(tmp_path)


def run(coro):
    return asyncio.run(coro)


def test_apply_switches_every_session_and_revert_goes_back(rig):
    for name in ("a", "b", "c"):
        rig.publish(name)
        rig.frames(name, 30)
    make_relup(rig.relups, "1.0.1")
    before = rig.states()
    report = run(rig.code.apply("1.0.1"))
    assert report.ok, report.error
    assert report.sessions == 3
    assert rig.versions() == {"1.0.1"}
    assert rig.states() == before  # identity migration
    for name in ("a", "b", "c"):
        rig.frames(name, 30)
    report = run(rig.code.revert())
    assert report.ok and rig.versions() == {"1.0.0"}
    assert rig.code.current is rig.generation


def test_dry_run_changes_nothing_and_purges_its_generation(rig):
    rig.publish("a")
    rig.frames("a", 10)
    make_relup(rig.relups, "1.0.1")
    modules = set(sys.modules)
    report = run(rig.code.apply("1.0.1", dry_run=True))
    assert report.ok and report.action == "dry_run"
    assert rig.versions() == {"1.0.0"}
    assert set(sys.modules) == modules


def unchanged(rig, report, before, modules_before, expected_error):
    assert not report.ok
    assert expected_error in report.error, report.error
    assert rig.versions() == {"1.0.0"}
    assert rig.states() == before
    assert rig.code.current is rig.generation
    assert set(sys.modules) == modules_before


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"edits": {"stream.py": ("def handle(", "def handle(:")}}, "syntax error"),
        ({"edits": {"__init__.py": ("from .state import", "from .missing import nothing\nfrom .state import")}},
         "No module named"),
        ({"migrations": "def up(state):\n    raise RuntimeError('up exploded')\n\ndef down(state):\n    return state\n"},
         "up exploded"),
        ({"migrations": "def up(state):\n    s = dict(state)\n    s['bogus'] = 1\n    return s\n\ndef down(state):\n    return state\n"},
         "bogus"),
        ({"migrations": "def up(state):\n    s = dict(state)\n    s['sequence'] = 'x'\n    return s\n\ndef down(state):\n    return state\n"},
         "sequence"),
        ({"migrations": "def up(state):\n    return dict(state)\n\ndef down(state):\n    s = dict(state)\n    s['sequence'] = s['sequence'] + 1\n    return s\n"},
         "down(up(state)) differs"),
        ({"migrations": "def up(state):\n    return dict(state)\n"}, "must define"),
        ({"from_version": "0.9.0"}, "upgrades from 0.9.0"),
        ({"edits": {"stream.py": ('    if kind == "video":\n', '    if kind == "video":\n        raise ValueError("new handler breaks on video")\n')}},
         "replay of recent messages"),
        ({"edits": {"__init__.py": ('VERSION = "1.0.1"', 'VERSION = "1.0.2"')}}, "VERSION = 1.0.2"),
        ({"edits": {"stream.py": ("import copy\n", "import copy\nimport os\n")}}, "import of `os`"),
    ],
    ids=["syntax", "missing-module", "up-raises", "unknown-field", "wrong-type", "down-not-inverse",
         "no-down", "wrong-from", "replay-crash", "version-mismatch", "forbidden-import"],
)
def test_bad_relup_changes_nothing(rig, kwargs, expected):
    for name in ("a", "b"):
        rig.publish(name)
        rig.frames(name, 20)
    make_relup(rig.relups, "1.0.1", **kwargs)
    before = rig.states()
    modules = set(sys.modules)
    report = run(rig.code.apply("1.0.1"))
    unchanged(rig, report, before, modules, expected)
    rig.frames("a", 5)  # streams go on
    assert rig.streams.live["a"].session.crashes == 0


def test_wrong_from_version_is_refused_before_any_code_runs(rig, tmp_path):
    marker = tmp_path / "ran"
    make_relup(
        rig.relups, "1.0.1", from_version="0.9.0",
        extra_files={"zz_side_effect.py": f"open({str(marker)!r}, 'w')\n"},
    )
    report = run(rig.code.apply("1.0.1"))
    assert not report.ok and "0.9.0" in report.error
    assert not marker.exists()


def test_failing_session_is_named_in_the_report(rig):
    rig.publish("good")
    rig.publish("bad")
    rig.frames("good", 5)
    rig.frames("bad", 5)
    make_relup(
        rig.relups, "1.0.1",
        migrations="""
        def up(state):
            if state["name"] == "bad":
                raise ValueError("cannot migrate this one")
            return dict(state)

        def down(state):
            return dict(state)
        """,
    )
    report = run(rig.code.apply("1.0.1"))
    assert not report.ok
    assert [(e.stream, e.stage) for e in report.session_errors] == [("bad", "up migration")]
    assert "cannot migrate this one" in report.session_errors[0].reason


def test_crashing_generation_is_reverted_automatically(tmp_path):
    rig = Rig(tmp_path, auto_revert_crashes=3, auto_revert_window=30.0)
    rig.publish("a")
    rig.frames("a", 5)
    make_relup(
        rig.relups, "1.0.1",
        edits={"stream.py": ('    if kind == "tick":\n', '    if kind == "tick":\n        raise RuntimeError("tick bug")\n')},
    )

    async def scenario():
        report = await rig.code.apply("1.0.1")
        assert report.ok, report.error
        session = rig.streams.live["a"].session
        handled = session.handled
        for _ in range(2):
            session.deliver(wire.Tick(now=0.0))  # one crash each (try + retry), held
        assert session.quarantined == 2 and len(session.held) == 2
        assert rig.versions() == {"1.0.1"}
        session.deliver(wire.Tick(now=0.0))  # third crash: reverted before its retry
        assert rig.versions() == {"1.0.0"}  # synchronously, in the crash report
        await asyncio.sleep(0.05)
        return session, handled

    session, handled = run(scenario())
    assert [r.action for r in rig.code.history] == ["apply", "auto_revert"]
    assert rig.code.history[-1].rehandled == 2
    assert session.crashes == 3 and not session.restarts  # the reverted generation's crashes are forgiven
    assert session.quarantined == 0 and session.handled == handled + 3  # all three ticks handled by 1.0.0
    assert not (tmp_path / "data" / "dead-letters" / "a.jsonl").exists()
    rig.frames("a", 5)
    assert session.handled > 10


def test_crash_intensity_stops_the_session_with_a_reason(tmp_path):
    rig = Rig(tmp_path, auto_revert_crashes=1000)
    rig.config.supervisor.max_restarts = 3
    rig.streams.config = rig.config
    rig.publish("a")
    session = rig.streams.live["a"].session
    session.max_restarts = 3
    make_relup(
        rig.relups, "1.0.1",
        edits={"stream.py": ('    if kind == "tick":\n', '    if kind == "tick":\n        raise RuntimeError("tick bug")\n')},
    )
    assert run(rig.code.apply("1.0.1")).ok
    for _ in range(3):
        session.deliver(wire.Tick(now=0.0))  # one crash per failing message
    assert not session.stopped
    session.deliver(wire.Tick(now=0.0))  # 4 crashes > 3
    assert session.stopped
    assert "crashed 4 times" in rig.publishers["a"].disconnected
    dead = (tmp_path / "data" / "dead-letters" / "a.jsonl").read_text().splitlines()
    assert len(dead) == 3  # the held messages go to the dead letters when the session stops
    assert "a" not in rig.streams.live
    playlist = (tmp_path / "data" / "hls" / "a" / "index.m3u8")
    assert playlist.read_text().rstrip().endswith("#EXT-X-ENDLIST")


def test_mixed_version_hazard_cannot_happen(rig):
    """OTP's hazard: a handler calling module A then module B across a code load.

    Here the handler asks two logic modules for their generation's marker on
    every message, while relups apply and revert concurrently with traffic.
    Every message must see one generation only.
    """
    marker = 'GENERATION_MARK = "{mark}"\n'
    hook = (
        '    if kind == "tick":\n'
        "        from . import mark_a, mark_b\n"
        "        seen = (mark_a.GENERATION_MARK, mark_b.mark())\n"
        '        return state, [("log", "debug", "%s|%s" % seen)]\n'
    )
    base = rig.relups / "base"
    for version in ("1.0.1",):
        make_relup(
            rig.relups, version,
            edits={"stream.py": ('    if kind == "tick":\n        return state, []\n', hook)},
            extra_files={
                "mark_a.py": marker.format(mark=version),
                "mark_b.py": f"from .mark_a import GENERATION_MARK as _M\n\ndef mark():\n    return {version!r}\n",
            },
        )
    del base
    rig.publish("a")
    seen: list[str] = []
    session = rig.streams.live["a"].session
    real_run = session.effects.run

    def capture(effects):
        seen.extend(e[2] for e in effects if e[0] == "log" and "|" in e[2])
        real_run(effects)

    session.effects.run = capture

    async def traffic(stop):
        while not stop.is_set():
            session.deliver(wire.Tick(now=0.0))
            await asyncio.sleep(0)

    async def scenario():
        stop = asyncio.Event()
        task = asyncio.create_task(traffic(stop))
        for _ in range(5):
            assert (await rig.code.apply("1.0.1")).ok
            await asyncio.sleep(0.002)
            assert (await rig.code.revert()).ok
            await asyncio.sleep(0.002)
        stop.set()
        await task

    run(scenario())
    assert len(seen) > 10
    assert all(a == b for a, b in (s.split("|") for s in seen)), seen


def test_chain_of_relups_reverts_step_by_step(rig):
    rig.publish("a")
    rig.frames("a", 10)
    make_relup(rig.relups, "1.0.1")
    make_relup(rig.relups, "1.0.2", from_version="1.0.1")
    assert run(rig.code.apply(None)).to_version == "1.0.1"
    assert run(rig.code.apply(None)).to_version == "1.0.2"
    assert [g["version"] for g in rig.code.status()["generations"]] == ["1.0.0", "1.0.1", "1.0.2"]
    assert run(rig.code.revert()).to_version == "1.0.1"
    assert run(rig.code.revert()).to_version == "1.0.0"
    report = run(rig.code.revert())
    assert not report.ok and "nothing to revert" in report.error


def test_paths_outside_the_relups_directory_are_refused(rig, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    make_relup(outside, "1.0.1")
    (rig.relups / "link").symlink_to(outside / "1.0.1")
    for requested in (str(outside / "1.0.1"), "../elsewhere/1.0.1", "link", str(rig.relups / ".." / "elsewhere" / "1.0.1")):
        report = run(rig.code.apply(requested))
        assert not report.ok
        assert "outside" in report.error or "symlink" in report.error, (requested, report.error)


def test_symlinked_file_inside_a_package_is_refused(rig, tmp_path):
    package = make_relup(rig.relups, "1.0.1")
    evil = tmp_path / "evil.py"
    evil.write_text("X = 1\n")
    (package / "logic" / "evil.py").symlink_to(evil)
    report = run(rig.code.apply("1.0.1"))
    assert not report.ok and "symlink" in report.error


def test_hundred_relup_revert_cycles_leave_modules_and_memory_where_they_were(rig):
    rig.publish("a")
    rig.frames("a", 10)
    make_relup(rig.relups, "1.0.1")

    async def cycles(n):
        for _ in range(n):
            assert (await rig.code.apply("1.0.1")).ok
            rig.frames("a", 1)
            assert (await rig.code.revert()).ok

    run(cycles(3))  # warm caches (linecache, typing, msgspec)
    gc.collect()
    modules = set(sys.modules)
    tracemalloc.start()
    baseline = tracemalloc.take_snapshot()
    run(cycles(100))
    rig.code.history.clear()
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    growth = sum(s.size_diff for s in after.compare_to(baseline, "filename"))
    assert set(sys.modules) == modules
    assert growth < 512 * 1024, f"memory grew by {growth} bytes over 100 cycles"
