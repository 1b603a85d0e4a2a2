"""A relup whose handler starts raising after the switch, under live ffmpeg publishers.

The bad handler raises on every media message once a session has handled
FAIL_AFTER of them: far beyond the replay depth (RECENT_MESSAGES), so the
preflight passes and the crashes only start seconds after the switch. With
`auto_revert_crashes` below `max_restarts`, the server must revert by itself
before the supervisor gives up on any session, and the messages the bad
generation quarantined must be handled again by the generation it returns
to: every stream frame-exact against its input, no dead letter, each
publisher on its one connection to the end.
"""

from __future__ import annotations

import dataclasses
import json
import time

import pytest

from media import SMALL, assert_exact, read_hls, wait_for_endlist, wait_proc
from relup_factory import make_relup
from mediaserver.runtime.session import RECENT_MESSAGES
from test_relup_live import api, start_publishers

CLIP = dataclasses.replace(SMALL, duration=5.0)
FAIL_AFTER = 220
"""Media messages (video + audio, ~75 per second) a session handles before the bad
handler raises: about 3 s into the stream, well after the relup is applied."""
AUTO_REVERT_CRASHES = 3
MAX_RESTARTS = 5

RAISES_AFTER_N = {
    "stream.py": (
        "    if state.ended:\n        return state, []\n    new = copy.copy(state)\n",
        "    if state.ended:\n        return state, []\n"
        f"    if state.health.video_frames + state.health.audio_frames >= {FAIL_AFTER}:\n"
        '        raise RuntimeError("injected: the handler breaks after %d messages" % '
        f"{FAIL_AFTER})\n"
        "    new = copy.copy(state)\n",
    )
}


@pytest.mark.parametrize("run", range(5))
@pytest.mark.parametrize("publishers", [1, 3])
def test_failing_relup_is_reverted_before_the_supervisor_gives_up_and_loses_no_frame(
    server_factory, clips, ffmpeg_publisher, tmp_path, publishers, run
):
    assert FAIL_AFTER > RECENT_MESSAGES and AUTO_REVERT_CRASHES < MAX_RESTARTS
    relups = tmp_path / "relups"
    relups.mkdir()
    make_relup(relups, "1.0.1", edits=RAISES_AFTER_N)
    server = server_factory(
        relup={"directory": str(relups), "auto_revert_crashes": AUTO_REVERT_CRASHES, "auto_revert_window": 60.0},
        supervisor={"max_restarts": MAX_RESTARTS, "restart_window": 10.0},
    )
    names = [f"s{index}" for index in range(publishers)]
    procs = {name: ffmpeg_publisher(clips.path(CLIP), server.rtmp_url(name)) for name in names}
    for name in names:
        server.wait_for_log(f"publish started.*stream={name}")
    status, report = api(server, "POST", "/api/v1/relup", {"path": "1.0.1"})
    assert status == 200 and report["ok"], report
    assert report["sessions"] == publishers
    server.wait_for_log("relup auto_revert done", timeout=15)

    clip = clips.get(CLIP)
    for name, proc in procs.items():
        assert wait_proc(proc, 60) == 0, f"publisher {name} failed"
        wait_for_endlist(server.hls_url(name), 10)
        assert_exact(clip, read_hls(server.hls_url(name)).segments, segment_target=2.0, label=name, probe=True)
        assert len(server.log_lines(f"publish started.*stream={name} ")) == 1, "publisher reconnected"
    assert not server.log_lines("session stopped"), server.log_lines("session stopped")
    assert not (server.data_dir / "dead-letters").exists() or not any((server.data_dir / "dead-letters").iterdir())

    status, body = api(server, "GET", "/api/v1/status")
    assert body["version"] == "1.0.0" and len(body["generations"]) == 1
    history = body["history"]
    assert [h["action"] for h in history] == ["apply", "auto_revert"], json.dumps(history)
    reverted = history[-1]
    assert reverted["ok"] and reverted["rehandled"] >= 1, reverted
    # One failing message is one crash: the revert came at the threshold, never later.
    crashes = server.log_lines("handler raised")
    assert len(crashes) == AUTO_REVERT_CRASHES, crashes
    # Logged with the generation that crashed, even the one whose report reverted it.
    assert all("generation=2 " in line for line in crashes), crashes
    server.assert_no_tracebacks()
