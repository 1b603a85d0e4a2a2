"""Relup refusals that must come before any package code runs, and the session count of every report.

A marker written with `open()` cannot tell whether the version check came
first: the source policy refuses `open` before anything executes too. So
the packages here mark an allowed module at import (`math.<marker> = True`),
which the policy lets through: only the version rules can stop it, and the
control case shows the mark does appear when the package is loaded.
(tests/test_relup_rules.py has the open() cases, file:line texts, the
down(up) field diff and the per-session dry-run results.)
"""

from __future__ import annotations

import math
import sys
import textwrap

import pytest

from relup_factory import make_relup
from test_relup_engine import Rig, run, unchanged

MARK = "relup_rules_marker"


def marker_file(tag: str) -> dict[str, str]:
    return {"zz_marker.py": f"import math\nmath.{MARK}_{tag} = True\n"}


def marked(tag: str) -> bool:
    return getattr(math, f"{MARK}_{tag}", False)


@pytest.fixture
def live(tmp_path):
    rig = Rig(tmp_path)
    for name in ("a", "b", "c"):
        rig.publish(name)
        rig.frames(name, 12)
    yield rig
    for name in list(vars(math)):
        if name.startswith(MARK):
            delattr(math, name)


def toml(from_version: str, to: str) -> str:
    return textwrap.dedent(
        f"""\
        from = "{from_version}"
        to = "{to}"

        [[instructions]]
        type = "load_logic"

        [[instructions]]
        type = "update_sessions"
        kind = "stream"
        """
    )


def test_the_marker_is_set_when_package_code_runs(live):
    make_relup(live.relups, "1.0.1", extra_files=marker_file("control"))
    report = run(live.code.apply("1.0.1", dry_run=True))
    assert report.ok, report.error
    assert marked("control")  # so the refusals below prove that no code ran


def test_directory_name_must_be_the_to_version_before_any_code_runs(live):
    # Built as 9.7.6 (VERSION and to agree), shipped in a directory named 9.7.5.
    package = make_relup(live.relups, "9.7.6", toml=toml("1.0.0", "9.7.6"), extra_files=marker_file("dir"))
    package.rename(live.relups / "9.7.5")
    before, modules = live.states(), set(sys.modules)
    report = run(live.code.apply("9.7.5"))
    unchanged(live, report, before, modules, "relup directory 9.7.5 says to = 9.7.6")
    assert not marked("dir")
    assert report.sessions == 3


def test_logic_version_must_be_the_to_version_before_any_code_runs(live):
    make_relup(
        live.relups, "1.0.1", extra_files=marker_file("version"),
        edits={"__init__.py": ('VERSION = "1.0.1"', 'VERSION = "1.0.2"')},
    )
    before, modules = live.states(), set(sys.modules)
    report = run(live.code.apply("1.0.1"))
    unchanged(live, report, before, modules, "says to = 1.0.1, but its logic has VERSION = 1.0.2")
    assert not marked("version")
    assert report.sessions == 3


def test_from_version_must_be_the_running_version_before_any_code_runs(live):
    make_relup(live.relups, "1.0.1", from_version="0.9.0", extra_files=marker_file("from"))
    before, modules = live.states(), set(sys.modules)
    report = run(live.code.apply("1.0.1"))
    unchanged(live, report, before, modules, "upgrades from 0.9.0, but the running version is 1.0.0")
    assert not marked("from")
    assert report.sessions == 3


def test_io_import_in_migrations_is_refused(live):
    make_relup(live.relups, "1.0.1", migrations="import pathlib\n\ndef up(s):\n    return s\n\ndef down(s):\n    return s\n")
    before, modules = live.states(), set(sys.modules)
    report = run(live.code.apply("1.0.1"))
    unchanged(live, report, before, modules, "migrations.py:1: import of `pathlib` is not allowed in logic")


def test_revert_report_counts_the_live_sessions(live):
    make_relup(live.relups, "1.0.1")
    assert run(live.code.apply("1.0.1")).ok
    report = run(live.code.revert())
    assert report.ok and report.sessions == 3
    refused = run(live.code.revert())
    assert not refused.ok and refused.sessions == 3 and "nothing to revert" in refused.error
