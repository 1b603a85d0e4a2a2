"""Issue 12: relups that fail lose nothing, and are refused before their code runs.

In-process, with the engine test rig (real sessions, real HLS writers).
"""

from __future__ import annotations

import asyncio
import textwrap

import msgspec
import pytest

from mediaserver import wire
from mediaserver.runtime.session import RECENT_MESSAGES

from relup_factory import make_relup
from test_relup_engine import Rig, run

MARK_AT_IMPORT = "open({marker!r}, 'w').close()\n"


@pytest.fixture
def rig(tmp_path):
    return Rig(tmp_path)


@pytest.mark.parametrize(
    "directory, to, version, expected",
    [
        ("9.7.5", "9.7.6", "9.7.6", "relup directory 9.7.5 says to = 9.7.6"),
        ("1.0.1", "1.0.1", "1.0.2", "says to = 1.0.1, but its logic has VERSION = 1.0.2"),
    ],
    ids=["directory-not-to", "to-not-VERSION"],
)
def test_version_rules_refused_before_any_package_code_runs(rig, tmp_path, directory, to, version, expected):
    marker = tmp_path / "ran"
    # The marker is written by plain code (no open() policy breach would be reached:
    # the version rules come before the source policy and before any import).
    package = make_relup(
        rig.relups, directory,
        extra_files={"zz_side_effect.py": f"X = 1\n"},
    )
    toml = (package / "relup.toml").read_text().replace(f'to = "{directory}"', f'to = "{to}"')
    (package / "relup.toml").write_text(toml)
    init = package / "logic" / "__init__.py"
    init.write_text(
        init.read_text().replace(f'VERSION = "{directory}"', f'VERSION = "{version}"')
        + f"\nimport msgspec as _m\n_m.json.encode(1)\n"
    )
    # A module that would leave a mark if it were ever executed.
    (package / "logic" / "zz_side_effect.py").write_text(MARK_AT_IMPORT.format(marker=str(marker)))
    rig.publish("a")
    report = run(rig.code.apply(directory))
    assert not report.ok and expected in report.error, report.error
    assert report.sessions == 1
    assert not marker.exists()


def test_logic_calling_open_at_import_and_in_a_handler_is_refused_at_preflight(rig, tmp_path):
    marker = tmp_path / "opened"
    make_relup(
        rig.relups, "1.0.1",
        edits={"stream.py": (
            '    if kind == "tick":\n',
            f'    if kind == "tick":\n        open({str(marker)!r}, "w").close()\n',
        )},
        extra_files={"zz_io.py": MARK_AT_IMPORT.format(marker=str(marker))},
    )
    for name in ("a", "b", "c"):
        rig.publish(name)
    report = run(rig.code.apply("1.0.1", dry_run=True))
    assert not report.ok
    assert report.sessions == 3
    assert "zz_io.py:1: use of `open`" in report.error, report.error
    assert "stream.py:" in report.error and report.error.count("`open`") == 2, report.error
    assert not marker.exists()
    assert rig.versions() == {"1.0.0"}


def test_failed_relative_import_names_file_and_line(rig):
    make_relup(rig.relups, "1.0.1", edits={"stream.py": ("import copy\n", "import copy\nfrom .state import NoSuchName\n")})
    rig.publish("a")
    rig.publish("b")
    report = run(rig.code.apply("1.0.1"))
    assert not report.ok and report.sessions == 2
    assert "NoSuchName" in report.error and "/logic/stream.py:" in report.error, report.error


def test_down_up_difference_names_the_field(rig):
    rig.publish("a")
    rig.frames("a", 40)
    make_relup(
        rig.relups, "1.0.1",
        migrations="""
        def up(state):
            return dict(state)

        def down(state):
            s = dict(state)
            del s["segment_open"]
            return s
        """,
    )
    state = msgspec.to_builtins(rig.streams.live["a"].session.state)
    assert state["segment_open"] is True, state  # a field with a default that is not the default now
    report = run(rig.code.apply("1.0.1"))
    assert not report.ok
    assert "down(up(state)) differs from the state in segment_open (was True, now False)" in report.error, report.error


def test_dry_run_report_has_a_result_per_session(rig):
    for name in ("a", "b"):
        rig.publish(name)
        rig.frames(name, 10)
    make_relup(rig.relups, "1.0.1")
    report = run(rig.code.apply("1.0.1", dry_run=True))
    assert report.ok and report.sessions == 2
    assert [(r.stream, r.ok) for r in report.session_results] == [("a", True), ("b", True)]
    assert f"{RECENT_MESSAGES} recent messages replayed" in report.session_results[0].detail


FAIL_AFTER = 3 * RECENT_MESSAGES + 6
"""Above what preflight replays for three sessions (the counter is shared by the generation)."""


def failing_after(n: int) -> dict:
    """A handler that raises on every media message once it has handled `n` since the switch."""
    return dict(
        edits={"stream.py": (
            '    if kind == "video":\n',
            '    if kind == "video" or kind == "audio":\n'
            '        _SEEN.append(1)\n'
            f'        if len(_SEEN) > {n}:\n'
            '            raise RuntimeError("handler bug after %d messages" % len(_SEEN))\n'
            '    if kind == "video":\n',
        ), "state.py": ("from __future__ import annotations\n", "from __future__ import annotations\n\n_SEEN = []\n")},
    )


def test_every_message_after_n_crashes_auto_revert_loses_nothing(tmp_path):
    """auto_revert_crashes below max_restarts: reverted by itself, nothing stopped, nothing lost."""
    rig = Rig(tmp_path, auto_revert_crashes=3, auto_revert_window=30.0)
    rig.config.supervisor.max_restarts = 5
    names = ("a", "b", "c")
    for name in names:
        rig.publish(name)
        rig.streams.live[name].session.max_restarts = 5
        rig.frames(name, 20)
    package = make_relup(rig.relups, "1.0.1", **failing_after(FAIL_AFTER))
    stream_py = package / "logic" / "stream.py"
    stream_py.write_text(stream_py.read_text().replace("from .state import", "from .state import _SEEN\nfrom .state import", 1))

    async def scenario():
        report = await rig.code.apply("1.0.1")
        assert report.ok, report.error
        for _ in range(8):
            for name in names:
                rig.frames(name, 5)
            await asyncio.sleep(0)
        await asyncio.sleep(0.05)

    run(scenario())
    assert rig.versions() == {"1.0.0"}
    assert [r.action for r in rig.code.history] == ["apply", "auto_revert"]
    assert sum(rig.streams.live[n].session.crashes for n in names) == 3  # one per failing message
    assert rig.code.history[-1].rehandled == 2  # the two quarantined before the third crash
    for name in names:
        session = rig.streams.live[name].session
        assert not session.stopped and session.quarantined == 0 and not session.held
        assert session.handled == 2 + 20 + 40, (name, session.handled)  # configs + every frame, once
    assert not (tmp_path / "data" / "dead-letters").exists()
