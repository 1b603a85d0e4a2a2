"""`mediaserver upgrade` when things go wrong, and connections in every phase.

Each fault of issue 13 with real publishers: the new worker killed (SIGKILL)
before, during and after the move of the connections; an install that cannot
import; a connection state the new worker cannot decode; two upgrades at once;
a relup during an upgrade and an upgrade during a relup; the admin endpoint
without its token. And connections caught by an upgrade in each phase:
mid-handshake, connected but not publishing, waiting for the publish webhook,
a publisher sending as fast as TCP allows.

The faults are real code in a real install: the test copies the package
(tests/installs.py) and edits the copy's hand-over code, as a broken release
would be, then points the server's install at it before upgrading.

What must hold every time: the upgrade says why it did not complete; the old
worker goes on serving every connection it has not seen acknowledged by the
new one, with every frame; a connection the new worker did acknowledge is
that worker's, and when it dies with it, its playlist is ended as after any
crash and its publisher can publish again on the serving worker.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request

import pytest

from installs import Installs, cli, client_ports, finish_clean, replace_in, server_status, upgrade, viewer
from media import (
    SMALL,
    ClipSpec,
    CorePublisher,
    assert_exact,
    core_publish,
    core_send_clip,
    ffmpeg_log,
    ffmpeg_publish,
    http_get,
    read_hls,
    split_at_discontinuities,
    wait_for_endlist,
    wait_proc,
)
from relup_factory import make_relup

TARGET = 2.0
CLIP = ClipSpec(duration=10.0, width=160, height=90)
"""Published from before the upgrade to after it (1 s GOP)."""
FAST = ClipSpec(duration=10.0, width=640, height=360, fps=25, gop=50)
FAST_REPEATS = 150
"""The clip sent this many times in one publish, its timestamps going on (1500 s
of media): an unpaced publisher is still sending when the upgrade runs."""

RECEIVER = "mediaserver/handover.py"
PREPARE = "    async def _prepare(self, message: dict[str, Any]) -> None:\n"
MOVE = "    async def _move(self, message: dict[str, Any], fds: list[int]) -> None:\n"
DONE = "    async def _done(self, message: dict[str, Any]) -> None:\n"
SIGKILL_SELF = "        os.kill(os.getpid(), 9)  # test install: the new worker dies here\n"


def _insert_after(package, line: str, code: str) -> None:
    replace_in(package / "handover.py", line, line + code)


def _wait_sessions(server, count: int, timeout: float = 15.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = server_status(server)
        if len(status["sessions"]) >= count:
            return status
        assert time.monotonic() < deadline, f"{count} sessions not live: {status['sessions']}\n{server.log_tail()}"
        time.sleep(0.1)


def _only_worker(server, pid: int, timeout: float = 10.0) -> None:
    """`pid` is, or soon is, the only worker (a refused new worker is being stopped)."""
    deadline = time.monotonic() + timeout
    while (pids := server.worker_pids()) != [pid]:
        assert time.monotonic() < deadline, f"workers {pids}, expected only {pid}\n{server.log_tail()}"
        time.sleep(0.1)


def _kill_all(*procs) -> None:
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)


# -- the new worker killed before, during and after the move --------------------------------

KILLS = {
    # where: (code inserted after which line, connections the dead worker took, the reason given)
    "before the move": (PREPARE, SIGKILL_SELF, 0, "the new worker went away before the hand-over finished"),
    # The first connection is adopted and acknowledged; the others wait 0.5 s (in flight,
    # paused, their fds sent) when the worker dies: those the old worker must resume.
    "during the move": (
        MOVE,
        "        self._seen = getattr(self, '_seen', 0) + 1\n"
        "        if self._seen >= 2:\n"
        "            await asyncio.sleep(0.5)\n" + SIGKILL_SELF.replace("        ", "            ", 1),
        1,
        "the new worker went away during the move",
    ),
    "after the last acknowledgement": (DONE, SIGKILL_SELF, 3, "the new worker went away after taking 3 connection(s)"),
}


@pytest.mark.timeout(150)
@pytest.mark.parametrize("where", list(KILLS))
def test_kill_9_of_the_new_worker(server_factory, clips, tmp_path, where):
    line, code, taken, reason = KILLS[where]
    installs = Installs(tmp_path / "inst")
    installs.make("a")
    installs.make("b", lambda package: _insert_after(package, line, code))
    installs.use("a")
    server = server_factory(pythonpath=installs.current, hls={"segment_target": TARGET})
    clip = clips.get(CLIP)
    names = ("k1", "k2", "k3")
    pollers = {n: viewer(server, n) for n in names}
    pubs = {n: ffmpeg_publish(clip.path, server.rtmp_url(n), log_path=tmp_path / f"{n}.log") for n in names}
    again = None
    try:
        _wait_sessions(server, 3)
        old = server.worker_pid()
        ports = client_ports(server.rtmp_port)
        assert len(ports) == 3, ports
        time.sleep(2.5)
        installs.use("b")
        code_, report = upgrade(server)
        assert code_ == 1 and not report["ok"], report
        assert reason in report["error"], report
        assert report["moved"] == taken, report
        assert server.worker_pid() == old, "the old worker must go on serving"
        _only_worker(server, old)
        assert server.log_lines(r"worker exited .*role=successor status=-9"), server.log_tail()

        # What the dead worker had taken is lost with it, as in a crash: those
        # publishers see their connection close; every other one goes on.
        lost = set()
        deadline = time.monotonic() + 10
        while len(lost) < taken and time.monotonic() < deadline:
            lost = {n for n, p in pubs.items() if p.poll() is not None}
            time.sleep(0.1)
        time.sleep(0.5)
        lost = {n for n, p in pubs.items() if p.poll() is not None}
        assert len(lost) == taken, f"{where}: publishers that ended: {lost}, expected {taken}"
        assert all(pubs[n].returncode != 0 for n in lost)
        kept = [n for n in names if n not in lost]
        assert len(client_ports(server.rtmp_port) & ports) == len(kept)
        status = server_status(server)
        assert sorted(s["name"] for s in status["sessions"]) == kept, status["sessions"]
        assert {s["pid"] for s in status["sessions"]} <= {old}
        # The lost streams' playlists are ended by the worker that goes on serving.
        for n in lost:
            wait_for_endlist(server.hls_url(n), 10)

        # The serving worker takes a new publish of a lost name.
        if lost:
            name = sorted(lost)[0]
            again = ffmpeg_publish(clips.path(SMALL), server.rtmp_url(name), log_path=tmp_path / "again.log")
            assert wait_proc(again, 60) == 0, ffmpeg_log(again)
        for n in kept:
            assert wait_proc(pubs[n], 60) == 0, ffmpeg_log(pubs[n])
    finally:
        _kill_all(*pubs.values(), again)

    for n in kept:
        out = finish_clean(server, n, pollers[n])
        assert_exact(clip, out.segments, segment_target=TARGET, label=f"{n} kept by the old worker ({where})")
    for n in lost:
        pollers[n].stop()
        out = read_hls(server.hls_url(n))
        groups = split_at_discontinuities(out.segments)
        assert_exact(clip, groups[0], segment_target=TARGET, prefix=True, label=f"{n} until the new worker died")
    if lost:
        out = read_hls(server.hls_url(sorted(lost)[0]))
        groups = split_at_discontinuities(out.segments)
        assert len(groups) == 2, out.text
        assert_exact(clips.get(SMALL), groups[1], segment_target=TARGET, label="published again")
    server.assert_no_tracebacks()


# -- installs the new worker cannot run -----------------------------------------------------


def _cannot_import(package) -> None:
    (package / "hls/segmenter.py").write_text(
        (package / "hls/segmenter.py").read_text() + "\ndef broken(:\n    pass\n"
    )


def _state_version_2(package) -> None:
    replace_in(package / "handover.py", "MOVE_VERSION = 1", "MOVE_VERSION = 2")


BROKEN = {
    "an install that cannot import": (_cannot_import, "segmenter.py"),
    "a state the new worker cannot decode": (_state_version_2, "connection state version 1 is not 2"),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("broken", list(BROKEN))
def test_an_install_the_new_worker_cannot_use_changes_nothing(server_factory, clips, tmp_path, broken):
    edit, reason = BROKEN[broken]
    installs = Installs(tmp_path / "inst")
    installs.make("a")
    installs.make("b", edit)
    installs.use("a")
    server = server_factory(pythonpath=installs.current, hls={"segment_target": TARGET})
    clip = clips.get(CLIP)
    poller = viewer(server, "s")
    ff = ffmpeg_publish(clip.path, server.rtmp_url("s"), log_path=tmp_path / "ff.log")
    try:
        _wait_sessions(server, 1)
        old = server.worker_pid()
        ports = client_ports(server.rtmp_port)
        time.sleep(2)
        installs.use("b")
        for dry in (True, False):
            code, report = upgrade(server, *(["--dry-run"] if dry else []))
            assert code == 1 and not report["ok"], json.dumps(report)
            assert reason in report["error"], report
            assert report.get("moved", 0) == 0, report
            _only_worker(server, old)
            assert client_ports(server.rtmp_port) == ports
        status = server_status(server)
        assert [s["pid"] for s in status["sessions"]] == [old]
        assert [u["ok"] for u in status["keeper"]["upgrades"]] == [False, False], status["keeper"]
        assert wait_proc(ff, 60) == 0, ffmpeg_log(ff)
    finally:
        _kill_all(ff)
    assert_exact(clip, finish_clean(server, "s", poller).segments, segment_target=TARGET, label=broken)


# -- two upgrades at once, a relup during an upgrade, an upgrade during a relup -------------


def _slow_prepare(package) -> None:
    _insert_after(package, PREPARE, "        await asyncio.sleep(4)  # test install: a slow new worker\n")


@pytest.mark.timeout(150)
def test_two_upgrades_at_once_and_relups_during_an_upgrade_are_refused(server_factory, clips, tmp_path):
    relups = tmp_path / "relups"
    relups.mkdir()
    make_relup(relups, "1.0.1")
    make_relup(relups, "1.0.2", from_version="1.0.1")
    installs = Installs(tmp_path / "inst")
    installs.make("a")
    installs.make("b", _slow_prepare)
    installs.use("a")
    server = server_factory(
        pythonpath=installs.current, hls={"segment_target": TARGET}, relup={"directory": str(relups)}
    )
    clip = clips.get(CLIP)
    poller = viewer(server, "t")
    ff = ffmpeg_publish(clip.path, server.rtmp_url("t"), log_path=tmp_path / "ff.log")
    try:
        _wait_sessions(server, 1)
        code, body, err = cli(server, "relup", "apply", "1.0.1")
        assert code == 0, (body, err)
        installs.use("b")
        first: dict = {}
        thread = threading.Thread(target=lambda: first.update(zip(("code", "report"), upgrade(server))))
        thread.start()
        server.wait_for_log(r"worker started .*role=successor|worker ready .*role=successor", timeout=20)
        time.sleep(1.0)  # the new worker is in its (slow) preparation now
        assert thread.is_alive(), f"the first upgrade ended too early: {first}"

        code, report = upgrade(server)
        assert code == 1 and "an upgrade is already in progress" in report["error"], report
        code, body, _ = cli(server, "relup", "apply", "1.0.2")
        assert code == 1 and "an upgrade is moving the sessions" in body["error"], body
        code, body, _ = cli(server, "relup", "revert")
        assert code == 1 and "an upgrade is moving the sessions" in body["error"], body

        thread.join(60)
        assert first["code"] == 0 and first["report"]["ok"], first
        assert first["report"]["moved"] == 1
        status = server_status(server)
        assert status["version"] == "1.0.1", "the new worker runs the relup the old one had applied"
        assert [s["pid"] for s in status["sessions"]] == [first["report"]["new_pid"]]
        # The new worker can revert the relup it took over, and apply it again.
        code, body, err = cli(server, "relup", "revert")
        assert code == 0 and body["to_version"] == "1.0.0", (body, err)
        code, body, err = cli(server, "relup", "apply", "1.0.1")
        assert code == 0, (body, err)
        assert wait_proc(ff, 60) == 0, ffmpeg_log(ff)
    finally:
        _kill_all(ff)
    assert_exact(clip, finish_clean(server, "t", poller).segments, segment_target=TARGET, label="one upgrade of two")


SLOW_MODULES = 40
SLOW_MODULE = "_WORK = sum(i * i for i in range(1_500_000))  # a relup that takes a while to load\n"


@pytest.mark.timeout(150)
def test_an_upgrade_during_a_relup_is_refused(server_factory, clips, tmp_path):
    relups = tmp_path / "relups"
    relups.mkdir()
    make_relup(relups, "1.0.1", extra_files={f"slow_{i}.py": SLOW_MODULE for i in range(SLOW_MODULES)})
    server = server_factory(hls={"segment_target": TARGET}, relup={"directory": str(relups)})
    clip = clips.get(CLIP)
    poller = viewer(server, "r")
    ff = ffmpeg_publish(clip.path, server.rtmp_url("r"), log_path=tmp_path / "ff.log")
    try:
        _wait_sessions(server, 1)
        old = server.worker_pid()
        relup: dict = {}
        thread = threading.Thread(target=lambda: relup.update(zip(("code", "body", "err"), cli(server, "relup", "apply", "1.0.1"))))
        started = time.monotonic()
        thread.start()
        time.sleep(0.3)
        code, report = upgrade(server)
        upgrade_done = time.monotonic()
        thread.join(60)
        relup_done = time.monotonic()
        assert relup["code"] == 0 and relup["body"]["ok"], relup
        assert upgrade_done < relup_done, (
            f"the relup ({relup_done - started:.1f} s) ended before the upgrade answered: nothing overlapped"
        )
        assert code == 1 and "a relup is in progress" in report["error"], report
        _only_worker(server, old)
        assert server_status(server)["version"] == "1.0.1"
        # Once the relup is done, the upgrade goes through, and the new worker runs 1.0.1 too.
        code, report = upgrade(server)
        assert code == 0 and report["ok"] and report["moved"] == 1, report
        assert server_status(server)["version"] == "1.0.1"
        assert wait_proc(ff, 60) == 0, ffmpeg_log(ff)
    finally:
        _kill_all(ff)
    assert_exact(clip, finish_clean(server, "r", poller).segments, segment_target=TARGET, label="relup, then upgrade")


# -- the admin endpoint without its token ---------------------------------------------------


def _admin_upgrade(server, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    """POST /api/v1/upgrade (the server's token unless `headers` says otherwise): (status, body)."""
    if headers is None:
        headers = {"Authorization": "Bearer " + (server.data_dir / "admin.token").read_text().strip()}
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.admin_port}/api/v1/upgrade", data=json.dumps({"dry_run": False}).encode(),
        method="POST", headers={"Content-Type": "application/json", **headers},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_the_upgrade_endpoint_needs_the_token(server_factory, clips, tmp_path):
    server = server_factory()
    worker = server.worker_pid()
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        status, body = _admin_upgrade(server, headers)
        assert status == 401, body
    time.sleep(1)
    assert server.worker_pids() == [worker], "no new worker may be started"
    assert server_status(server)["keeper"]["upgrades"] == []


# -- connections in every phase -------------------------------------------------------------


@pytest.mark.timeout(120)
def test_mid_handshake_and_idle_connections_move_and_go_on(server_factory, clips, tmp_path):
    server = server_factory(hls={"segment_target": TARGET})
    clip = clips.get(SMALL)
    ff = ffmpeg_publish(clips.path(CLIP), server.rtmp_url("f"), log_path=tmp_path / "ff.log")
    poller = viewer(server, "f")
    # Mid-handshake: C0 and the first 700 bytes of C1 sent, nothing answered yet.
    half = CorePublisher("127.0.0.1", server.rtmp_port, "half")
    hello = half.conn.data_to_send()
    assert len(hello) == 1 + 1536
    half.sock.sendall(hello[:701])
    # Connected, no publish yet.
    idle = CorePublisher("127.0.0.1", server.rtmp_port, "idle")
    idle.handshake()
    idle.connect_app()
    try:
        _wait_sessions(server, 1)
        old = server.worker_pid()
        time.sleep(1)
        code, report = upgrade(server)
        assert code == 0 and report["ok"], report
        assert report["connections"] == 3 and report["moved"] == 3 and report["sessions"] == 1, report
        new = report["new_pid"]
        deadline = time.monotonic() + 10
        while old in server.worker_pids():
            assert time.monotonic() < deadline, "the old worker did not exit"
            time.sleep(0.1)

        # The rest of C1 reaches the new worker, which finishes the handshake.
        half.sock.sendall(hello[701:])
        half.handshake()
        half.connect_app()
        for pub in (half, idle):
            pub.start_publish()
            core_send_clip(pub, clip, paced=False)
        status = server_status(server)
        assert {s["pid"] for s in status["sessions"]} <= {new}
        assert wait_proc(ff, 60) == 0, ffmpeg_log(ff)
    finally:
        _kill_all(ff)
        half.close()
        idle.close()
    for name in ("half", "idle"):
        out = read_hls(server.hls_url(wait_name(server, name)))
        assert_exact(clip, out.segments, segment_target=TARGET, label=f"{name} after the upgrade")
    assert_exact(clips.get(CLIP), finish_clean(server, "f", poller).segments, segment_target=TARGET, label="ffmpeg")
    server.assert_no_tracebacks()


def wait_name(server, name: str) -> str:
    wait_for_endlist(server.hls_url(name), 15)
    return name


@pytest.mark.timeout(120)
def test_a_connection_waiting_for_the_webhook_moves_once_answered(server_factory, clips, tmp_path):
    from test_publish_auth import Hook

    hook = Hook()  # "okslow": allowed after 3 s
    server = server_factory(hls={"segment_target": TARGET}, publish={"webhook": hook.url, "webhook_timeout": 5.0})
    clip = clips.get(CLIP)
    poller = viewer(server, "okslow")
    try:
        ff = ffmpeg_publish(clip.path, server.rtmp_url("okslow"), log_path=tmp_path / "ff.log")
        deadline = time.monotonic() + 10
        while not hook.requests:
            assert time.monotonic() < deadline, "the webhook was not called"
            time.sleep(0.05)
        asked = time.monotonic()
        code, report = upgrade(server)
        # Not movable at the preflight (it had no session yet): checked by the new
        # worker when it moved, once the webhook had answered.
        assert code == 0 and report["ok"] and report["moved"] == 1 and report["sessions"] == 0, report
        # The old worker finished the webhook before the connection moved.
        assert time.monotonic() - asked >= 2.0, "the connection moved before its webhook answered"
        assert [c["action"] for c in hook.requests] == ["publish"], hook.requests
        assert [s["pid"] for s in server_status(server)["sessions"]] == [report["new_pid"]]
        assert wait_proc(ff, 60) == 0, ffmpeg_log(ff)
    finally:
        _kill_all(locals().get("ff"))
        hook.close()
    assert_exact(clip, finish_clean(server, "okslow", poller).segments, segment_target=TARGET, label="webhook phase")


@pytest.mark.timeout(150)
def test_a_publisher_at_full_speed_moves_with_every_frame(server_factory, clips, tmp_path):
    # The project's own RTMP client, unpaced: it sends as fast as the server reads
    # (and reads the server's acknowledgements; ffmpeg without -re stops reading
    # them, and its close then resets the connection with data in flight).
    server = server_factory(hls={"segment_target": TARGET, "playlist_size": 1200})
    clip = clips.get(FAST)
    parts = [(clip, round(k * clip.duration_ms)) for k in range(FAST_REPEATS)]
    done: dict = {}

    def publish() -> None:
        try:
            core_publish(clip, "127.0.0.1", server.rtmp_port, "fast", paced=False, then=parts[1:])
            done["ok"] = True
        except BaseException as exc:  # reported below
            done["error"] = exc

    sender = threading.Thread(target=publish, daemon=True)
    sender.start()
    server.wait_for_log(r"publish started stream=fast")
    time.sleep(0.2)
    assert sender.is_alive(), f"the publisher finished before the upgrade: make the clip longer ({done})"
    # The admin API straight away (the CLI would spend half a second starting).
    status, report = _admin_upgrade(server)
    assert status == 200 and report["ok"] and report["moved"] == 1, json.dumps(report)
    assert sender.is_alive(), "the publisher finished during the upgrade: the move was not at full speed"
    sender.join(90)
    assert done.get("ok"), done
    wait_for_endlist(server.hls_url("fast"), 20)
    out = read_hls(server.hls_url("fast"), probe=False)  # 750 segments: assert_exact checks each
    assert "#EXT-X-DISCONTINUITY" not in out.text
    assert_exact([clip] * FAST_REPEATS, out.segments, segment_target=TARGET, label="full speed")
