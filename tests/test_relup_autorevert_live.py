"""A relup whose handler starts raising after the switch is reverted by the
server itself, under live ffmpeg publishers, and loses no frame (issue 12).

The handler raises on every media message once its generation has handled
N of them (N above what preflight replays), so preflight passes and every
message after the N-th fails. `auto_revert_crashes` is below `max_restarts`:
the revert must win every time, no session may be stopped, and every stream
is frame-exact against its input (the quarantined messages handled again by
the generation reverted to, in order).
"""

from __future__ import annotations

import time

import pytest

from media import SMALL, assert_exact, read_hls, wait_for_endlist, wait_proc
from mediaserver.runtime.session import RECENT_MESSAGES
from relup_factory import make_relup
from test_relup_live import api, start_publishers

FAIL_AFTER = 3 * RECENT_MESSAGES + 30
"""Media messages the new generation handles before it breaks (shared by its sessions)."""


def breaking_relup(relups, n: int):
    package = make_relup(
        relups, "1.0.1",
        edits={
            "state.py": ("from __future__ import annotations\n", "from __future__ import annotations\n\n_SEEN = []\n"),
            "stream.py": (
                '    if kind == "video":\n',
                '    if kind == "video" or kind == "audio":\n'
                '        _SEEN.append(1)\n'
                f'        if len(_SEEN) > {n}:\n'
                '            raise RuntimeError("handler bug after %d messages" % len(_SEEN))\n'
                '    if kind == "video":\n',
            ),
        },
    )
    stream_py = package / "logic" / "stream.py"
    stream_py.write_text(stream_py.read_text().replace("from .state import", "from .state import _SEEN\nfrom .state import", 1))
    return package


@pytest.mark.parametrize("run", range(5))
@pytest.mark.parametrize("publishers", [1, 3])
def test_failing_relup_is_reverted_before_the_supervisor_stops_anything(
    server_factory, clips, ffmpeg_publisher, tmp_path, publishers, run
):
    relups = tmp_path / "relups"
    relups.mkdir()
    breaking_relup(relups, FAIL_AFTER)
    server = server_factory(
        relup={"directory": str(relups), "auto_revert_crashes": 2, "auto_revert_window": 60.0},
        supervisor={"max_restarts": 3, "restart_window": 10.0},
    )
    names = [f"s{i}" for i in range(publishers)]
    procs = start_publishers_small(server, clips, ffmpeg_publisher, names)
    time.sleep(1.0)
    status, report = api(server, "POST", "/api/v1/relup", {"path": "1.0.1"})
    assert status == 200, report
    server.wait_for_log("automatic revert", timeout=15)
    clip = clips.get(SMALL)
    for name, proc in procs.items():
        assert wait_proc(proc, 60) == 0, f"publisher {name} failed"
        wait_for_endlist(server.hls_url(name), 10)
        assert_exact(clip, read_hls(server.hls_url(name)).segments, segment_target=2.0, label=name)
        assert len(server.log_lines(f"publish started.*stream={name} ")) == 1, "publisher reconnected"
    assert not server.log_lines("session stopped")
    assert server.log_lines("quarantined messages handled again")
    status, body = api(server, "GET", "/api/v1/relups")
    assert [h["action"] for h in body] == ["apply", "auto_revert"] and body[-1]["ok"], body
    assert not (server.data_dir / "dead-letters").exists() or not any((server.data_dir / "dead-letters").iterdir())


def start_publishers_small(server, clips, ffmpeg_publisher, names):
    procs = {name: ffmpeg_publisher(clips.path(SMALL), server.rtmp_url(name)) for name in names}
    for name in names:
        server.wait_for_log(f"publish started.*stream={name}")
    return procs
