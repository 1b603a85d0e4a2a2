"""Messages a reverted generation quarantined are handled again by the generation returned to.

In process, with the engine rig: a revert by hand (auto-revert off) gives the
held messages back in order, before the mailbox; a message that a newer one
has overtaken is a dead letter at once (handling it later would reorder the
stream); what the generation returned to fails on too stays a dead letter.
"""

from __future__ import annotations

import gc
import json
import logging
import sys
import weakref

import pytest

from mediaserver import wire
from mediaserver.runtime import session as session_module

from relup_factory import make_relup
from test_relup_engine import Rig, run

TICK_BUG = {"stream.py": ('    if kind == "tick":\n', '    if kind == "tick":\n        raise RuntimeError("tick bug")\n')}


def dead_letters(tmp_path, name: str) -> list[dict]:
    path = tmp_path / "data" / "dead-letters" / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def rig_on_bad_generation(tmp_path) -> Rig:
    rig = Rig(tmp_path, auto_revert_crashes=1000)
    rig.publish("a")
    rig.frames("a", 10)
    make_relup(rig.relups, "1.0.1", edits=TICK_BUG)
    assert run(rig.code.apply("1.0.1")).ok
    return rig


def test_manual_revert_rehandles_the_held_messages_in_order(tmp_path):
    rig = rig_on_bad_generation(tmp_path)
    session = rig.streams.live["a"].session
    handled = session.handled
    for second in range(4):
        session.deliver(wire.Tick(now=float(second)))
    assert session.quarantined == 4 and [m.now for m, _, _ in session.held] == [0.0, 1.0, 2.0, 3.0]
    report = run(rig.code.revert())
    assert report.ok and report.rehandled == 4
    assert rig.versions() == {"1.0.0"}
    assert session.handled == handled + 4 and session.quarantined == 0 and not session.held
    assert [m.now for m in list(session.recent)] == [0.0, 1.0, 2.0, 3.0]  # in order
    assert dead_letters(tmp_path, "a") == []
    assert not session.restarts  # the reverted generation's crashes are forgiven


def test_a_message_overtaken_by_a_newer_one_is_a_dead_letter_at_once(tmp_path):
    rig = rig_on_bad_generation(tmp_path)
    session = rig.streams.live["a"].session
    session.deliver(wire.Tick(now=7.0))
    assert len(session.held) == 1 and dead_letters(tmp_path, "a") == []
    rig.frames("a", 1)  # handled by 1.0.1 after the tick: the tick can no longer go in order
    assert not session.held
    (dead,) = dead_letters(tmp_path, "a")
    assert "tick bug" in dead["reason"] and dead["message"]["now"] == 7.0
    report = run(rig.code.revert())
    assert report.ok and report.rehandled == 0 and session.quarantined == 1


def test_held_messages_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(session_module, "HELD_MESSAGES", 3)
    rig = rig_on_bad_generation(tmp_path)
    session = rig.streams.live["a"].session
    session.max_restarts = 100
    for second in range(5):
        session.deliver(wire.Tick(now=float(second)))
    assert [m.now for m, _, _ in session.held] == [2.0, 3.0, 4.0]
    assert [d["message"]["now"] for d in dead_letters(tmp_path, "a")] == [0.0, 1.0]  # the oldest, written once
    report = run(rig.code.revert())
    assert report.rehandled == 3 and len(dead_letters(tmp_path, "a")) == 2


def test_what_the_generation_returned_to_fails_on_stays_a_dead_letter(tmp_path):
    # 1.0.1 breaks on ticks; 1.0.2 on ticks too. Reverting 1.0.2 hands its held
    # tick back to 1.0.1, which fails again: that one is kept as a dead letter.
    rig = Rig(tmp_path, auto_revert_crashes=1000)
    rig.publish("a")
    rig.frames("a", 10)
    make_relup(rig.relups, "1.0.1", edits=TICK_BUG)
    make_relup(rig.relups, "1.0.2", from_version="1.0.1", edits=TICK_BUG)
    assert run(rig.code.apply("1.0.1")).ok
    assert run(rig.code.apply("1.0.2")).ok
    session = rig.streams.live["a"].session
    session.deliver(wire.Tick(now=5.0))
    assert len(session.held) == 1 and session.held[0][2].version == "1.0.2"
    report = run(rig.code.revert())
    assert report.ok and report.rehandled == 1
    assert rig.versions() == {"1.0.1"}
    # 1.0.1 failed on it too; it is held again, now for 1.0.1 (which may still be reverted).
    assert [(m.now, g.version) for m, _, g in session.held] == [(5.0, "1.0.1")]
    rig.frames("a", 1)
    (dead,) = dead_letters(tmp_path, "a")
    assert dead["message"]["now"] == 5.0 and dead["version"] == "1.0.1"
    assert session.quarantined == 1 and not session.stopped


@pytest.mark.parametrize("crashes, warned", [(3, False), (6, False), (7, True)])
def test_an_auto_revert_threshold_the_supervisor_would_beat_is_warned(tmp_path, caplog, crashes, warned):
    # max_restarts is 5: the sixth crash reverts before the intensity check, the seventh comes too late.
    with caplog.at_level(logging.WARNING, logger="mediaserver.relup"):
        rig = Rig(tmp_path, auto_revert_crashes=crashes)
        rig.code._warn_if_the_supervisor_wins(5)
    assert any("can stop a session before it is reverted" in r.getMessage() for r in caplog.records) == warned


def test_revert_wins_at_max_restarts_plus_one(tmp_path):
    rig = Rig(tmp_path, auto_revert_crashes=4)
    rig.publish("a")
    session = rig.streams.live["a"].session
    session.max_restarts = 3
    make_relup(rig.relups, "1.0.1", edits=TICK_BUG)
    assert run(rig.code.apply("1.0.1")).ok
    for second in range(4):  # the fourth crash is over the limit of 3, and reverts first
        session.deliver(wire.Tick(now=float(second)))
    assert not session.stopped and rig.versions() == {"1.0.0"}
    assert rig.code.history[-1].action == "auto_revert" and rig.code.history[-1].rehandled == 3
    assert dead_letters(tmp_path, "a") == []


def test_a_generation_reverted_from_inside_its_crash_is_purged(tmp_path):
    # The automatic revert runs while the crash's exception is being handled: the
    # traceback must not keep the reverted generation alive once it is over.
    rig = Rig(tmp_path, auto_revert_crashes=2)
    rig.publish("a")
    rig.frames("a", 10)
    make_relup(rig.relups, "1.0.1", edits=TICK_BUG)
    assert run(rig.code.apply("1.0.1")).ok
    bad = rig.code.current
    state_class, package = weakref.ref(bad.state_type), weakref.ref(bad.package)
    package_name = bad.package_name
    session = rig.streams.live["a"].session
    for second in range(2):
        session.deliver(wire.Tick(now=float(second)))
    assert rig.code.history[-1].action == "auto_revert" and bad.purged
    del bad
    gc.collect()
    assert state_class() is None and package() is None
    assert not [n for n in sys.modules if n == package_name or n.startswith(package_name + ".")]
