"""The keeper's lifecycle, end to end: real `mediaserver serve` processes, real publishers.

`mediaserver serve` is a keeper process (mediaserver/keeper.py) that binds the
listening sockets and runs the server as a worker process. These tests check
what the keeper promises (DESIGN.md, "Processes: the keeper and its workers";
issue 13): it stays small and imports none of the media path; a worker that
dies is replaced at once and its streams come back when their publishers
reconnect; SIGTERM/SIGINT stop everything as before; SIGKILL of the keeper
leaves nothing holding the ports; `upgrade --keeper` re-executes it in place
with its sockets and workers, and refuses when the keeper on disk cannot
start; `mediaserver upgrade` is also the config reload, and refuses a config
the new worker refuses; `mediaserver status` says which process serves which
stream; start-up failures still read well.
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import tokenize
from pathlib import Path

import pytest

from conftest import DEFAULT_CONFIG, REPO, ServerProcess, free_ports, merge, server_command, server_env, to_toml
from installs import Installs, cli, client_ports, finish_clean, server_status, upgrade, viewer
from media import (
    SMALL,
    ClipSpec,
    assert_exact,
    check_playlist_text,
    ffmpeg_log,
    ffmpeg_publish,
    http_get,
    read_hls,
    read_hls_dir,
    split_at_discontinuities,
    wait_for_playlist,
    wait_proc,
)

TARGET = 2.0
LONG = ClipSpec(duration=20.0, width=160, height=90)
"""Still publishing when the test kills or stops something (1 s GOP)."""
MEDIUM = ClipSpec(duration=10.0, width=160, height=90)
"""Published from start to end across an upgrade."""

MEDIA_MODULES = ("av", "aiortc", "numpy", "aiohttp", "mediaserver.hls", "mediaserver.transport",
                 "mediaserver.media", "mediaserver.runtime", "mediaserver.proto", "mediaserver.logic",
                 "mediaserver.server", "mediaserver.handover", "mediaserver.worker")


# -- helpers -----------------------------------------------------------------------


def _exists(pid: int) -> bool:
    """A live process (a zombie counts as gone: it holds no socket)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return "State:\tZ" not in status


def _wait_gone(pids, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while any(_exists(p) for p in pids):
        assert time.monotonic() < deadline, f"{what}: {[p for p in pids if _exists(p)]} still running"
        time.sleep(0.02)


def _healthy(server) -> bool:
    try:
        return http_get(server.http_url("/healthz"), timeout=1).status == 200
    except OSError:
        return False


def _wait_healthy(server, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not _healthy(server):
        assert time.monotonic() < deadline, f"/healthz does not answer within {timeout} s:\n{server.log_tail()}"
        time.sleep(0.02)


def _wait_new_worker(server, old: int, timeout: float = 5.0) -> int:
    """The pid of the worker the keeper started after `old`, once it answers /healthz."""
    deadline = time.monotonic() + timeout
    while True:
        pids = [p for p in server.worker_pids() if p != old and _exists(p)]
        if len(pids) == 1:
            break
        assert server.alive(), f"the keeper died:\n{server.log_tail()}"
        assert time.monotonic() < deadline, (
            f"no new worker within {timeout} s of worker {old}'s death (children {server.worker_pids()}):\n"
            f"{server.log_tail()}"
        )
        time.sleep(0.01)
    _wait_healthy(server)
    return pids[0]


def _wait_sessions(server, names: set[str], timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = server_status(server)
        if {s["name"] for s in status["sessions"]} >= names:
            return status
        assert time.monotonic() < deadline, f"sessions {names} not live: {status['sessions']}\n{server.log_tail()}"
        time.sleep(0.1)


def _segments_listed(text: str) -> int:
    return text.count("#EXTINF")


def _last_seq(text: str) -> int:
    playlist = check_playlist_text(text)
    return (playlist.media_sequence or 0) + len(playlist.segments) - 1


def _publish(server, clip_path, name: str, tmp_path, **kwargs) -> subprocess.Popen:
    return ffmpeg_publish(clip_path, server.rtmp_url(name), log_path=tmp_path / f"ff-{name}-{time.monotonic_ns()}.log",
                          **kwargs)


def _ended_hls(server, name: str):
    wait_for_playlist(server.hls_url(name), 10, lambda text: "#EXT-X-ENDLIST" in text)
    return read_hls(server.hls_url(name))


def _admin_upgrade(server, *extra: str) -> tuple[int, dict | None, str]:
    """`mediaserver upgrade` through --admin/--token: the CLI does not read the server's config file,
    so what the server itself says about that file is what comes back."""
    token = (server.data_dir / "admin.token").read_text().strip()
    proc = subprocess.run(
        [sys.executable, "-m", "mediaserver", "upgrade", *extra, "--admin", f"http://127.0.0.1:{server.admin_port}",
         "--token", token, "--json"],
        capture_output=True, text=True, timeout=120, env=server_env(), cwd=server.workdir,
    )
    try:
        body = json.loads(proc.stdout) if proc.stdout.strip() else None
    except json.JSONDecodeError:
        body = None
    return proc.returncode, body, proc.stderr


def _text_cli(server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mediaserver", *args, "--config", str(server.config_path)],
        capture_output=True, text=True, timeout=120, env=server_env(),
    )


def _kill_all(*procs) -> None:
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def _code_lines(path: Path) -> int:
    """Lines holding code: no blank line, comment or docstring."""
    source = path.read_text()
    docstrings: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            docstrings.update(range(node.lineno, node.end_lineno + 1))
    lines: set[int] = set()
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in skip:
            lines.update(n for n in range(tok.start[0], tok.end[0] + 1) if n not in docstrings)
    return len(lines)


def _mapped_libav(pid: int) -> list[str]:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return sorted({line.split()[-1] for line in maps.splitlines() if re.search(r"/libav(codec|format|util)[^/]*\.so", line)})


# -- 1. the keeper is small and imports none of the media path ----------------------------------


def test_the_keeper_imports_none_of_the_media_path(tmp_path):
    code = (
        "import json, sys\n"
        "import mediaserver.keeper, mediaserver.fdchannel, mediaserver.cli\n"
        f"media = {MEDIA_MODULES!r}\n"
        "print(json.dumps(sorted(m for m in sys.modules if any(m == p or m.startswith(p + '.') for p in media))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=server_env(),
                          cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [], f"the keeper's modules pull in the media path: {proc.stdout}"


def test_a_running_keeper_maps_no_libav_and_its_worker_does(server):
    worker = server.worker_pid()
    assert worker != server.pid
    assert _mapped_libav(server.pid) == [], f"the keeper {server.pid} maps {_mapped_libav(server.pid)}"
    assert _mapped_libav(worker), f"the worker {worker} maps no libav shared object: is this the worker?"
    keeper_rss = int(re.search(r"^VmRSS:\s+(\d+)", Path(f"/proc/{server.pid}/status").read_text(), re.M).group(1))
    assert keeper_rss < server.rss_kb(), "the keeper uses more memory than the worker running the media path"
    print(f"keeper RSS {keeper_rss} kB, worker RSS {server.rss_kb()} kB")


def test_the_keeper_stays_small_enough_to_read_in_one_sitting():
    files = [REPO / "mediaserver/keeper.py", REPO / "mediaserver/fdchannel.py"]
    physical = sum(len(f.read_text().splitlines()) for f in files)
    code = sum(_code_lines(f) for f in files)
    print(f"keeper.py + fdchannel.py: {physical} lines, {code} lines of code")
    assert code <= 700, f"keeper.py + fdchannel.py hold {code} lines of code ({physical} lines): over 700"
    assert physical <= 900, f"keeper.py + fdchannel.py are {physical} lines long: over 900"


# -- 2. crash isolation: kill -9 of the serving worker ------------------------------------------


@pytest.mark.timeout(90)
def test_kill_9_of_the_worker_ends_its_streams_and_a_new_worker_serves_them_after_reconnect(
    server_factory, clips, tmp_path
):
    server = server_factory(hls={"segment_target": TARGET})
    keeper = server.pid
    names = ("a", "b")
    first = {n: _publish(server, clips.path(LONG), n, tmp_path) for n in names}
    again: dict[str, subprocess.Popen] = {}
    try:
        before = {
            n: _last_seq(wait_for_playlist(server.hls_url(n), 15, lambda t: _segments_listed(t) >= 2)) for n in names
        }
        status = _wait_sessions(server, set(names))
        dead = server.worker_pid()
        assert {s["pid"] for s in status["sessions"]} == {dead}
        ports = client_ports(server.rtmp_port)
        assert len(ports) == 2, ports

        os.kill(dead, signal.SIGKILL)
        killed_at = time.monotonic()
        new = _wait_new_worker(server, dead, timeout=5.0)
        print(f"worker {dead} killed; worker {new} answers /healthz {time.monotonic() - killed_at:.2f} s later")
        assert server.alive() and server.pid == keeper, "the keeper must survive its worker"
        assert server.log_lines(rf"serving worker died: starting a new one pid={dead} status=-9"), server.log_tail()

        # One worker served both streams: both died with it.
        for n in names:
            wait_proc(first[n], 15, f"publisher {n} of the killed worker")
        assert not (client_ports(server.rtmp_port) & ports), "a connection of the killed worker is still established"
        assert server_status(server)["sessions"] == []
        ended = {}
        for n in names:
            text = http_get(server.hls_url(n)).body.decode()
            assert "#EXT-X-ENDLIST" in text, f"{n}: the dead worker's playlist is not ended:\n{text}"
            ended[n] = _last_seq(text)
            assert ended[n] >= before[n], f"{n}: the playlist lost segments: {before[n]} -> {ended[n]}\n{text}"

        # The publishers reconnect to the same names: the new worker serves them.
        again = {n: _publish(server, clips.path(SMALL), n, tmp_path) for n in names}
        status = _wait_sessions(server, set(names))
        assert {s["pid"] for s in status["sessions"]} == {new}, status["sessions"]
        for n in names:
            assert wait_proc(again[n], 60) == 0, ffmpeg_log(again[n])
    finally:
        _kill_all(*first.values(), *again.values())

    for n in names:
        out = _ended_hls(server, n)
        groups = split_at_discontinuities(out.segments)
        assert len(groups) >= 2, f"{n}: no discontinuity where the new publish starts:\n{out.text}"
        killed, republished = groups[-2], groups[-1]
        assert republished[0].discontinuity and republished[0].seq == ended[n] + 1, (
            f"{n}: the new publish must go on at media sequence {ended[n] + 1} after a discontinuity:\n{out.text}"
        )
        assert killed[-1].seq == ended[n]
        # What the killed worker had written is a clean prefix of what was sent.
        assert_exact(clips.get(LONG), killed, segment_target=TARGET, prefix=True, label=f"{n} before the kill")
        assert_exact(clips.get(SMALL), republished, segment_target=TARGET, label=f"{n} after the reconnect")
    assert server.stop() == 0, server.log_tail()


# -- 3. repeated worker deaths ---------------------------------------------------------------


@pytest.mark.timeout(90)
def test_the_keeper_keeps_restarting_a_worker_that_keeps_dying(server_factory, clips, tmp_path):
    server = server_factory()
    keeper = server.pid
    killed = []
    pid = server.worker_pid()
    for _ in range(3):
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
        pid = _wait_new_worker(server, pid, timeout=10.0)
    delays = [float(m) for line in server.log_lines(r"serving worker died") for m in re.findall(r"delay_s=([\d.]+)", line)]
    assert delays == [0.0, 0.5, 1.0], f"restart delays {delays}\n{server.log_tail()}"

    # A replacement that dies while it loads is replaced too.
    os.kill(pid, signal.SIGKILL)
    killed.append(pid)
    deadline = time.monotonic() + 10
    while True:
        starting = [p for p in server.worker_pids() if p not in killed and _exists(p)]
        if starting:
            break
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.005)
    os.kill(starting[0], signal.SIGKILL)
    killed.append(starting[0])
    pid = _wait_new_worker(server, starting[0], timeout=15.0)
    assert server.log_lines(r"replacement worker did not start"), server.log_tail()

    assert server.alive() and server.pid == keeper
    for p in killed:
        assert not _exists(p)
    keeper_info = server_status(server)["keeper"]
    assert keeper_info["pid"] == keeper
    assert [(w["pid"], w["role"], w["status"]) for w in keeper_info["workers"]] == [(pid, "restart", "serving")]
    # It serves: a publish goes through.
    proc = _publish(server, clips.path(SMALL), "after", tmp_path)
    assert wait_proc(proc, 60) == 0, ffmpeg_log(proc)
    out = _ended_hls(server, "after")
    assert_exact(clips.get(SMALL), out.segments, segment_target=2.0, label="after five deaths")
    assert server.stop() == 0, server.log_tail()


# -- 4. SIGTERM / SIGINT of the keeper ---------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_keeper_stops_everything_and_ends_the_playlists(server_factory, clips, tmp_path, sig):
    server = server_factory(hls={"segment_target": TARGET})
    names = ("s1", "s2")
    procs = {n: _publish(server, clips.path(LONG), n, tmp_path) for n in names}
    try:
        for n in names:
            wait_for_playlist(server.hls_url(n), 15, lambda t: _segments_listed(t) >= 1)
        _wait_sessions(server, set(names))
        workers = server.worker_pids()
        assert len(workers) == 1
        server.proc.send_signal(sig)
        try:
            code = server.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the keeper did not exit within 15 s of {sig.name}:\n{server.log_tail()}") from None
        assert code == 0, f"exit {code} after {sig.name}:\n{server.log_tail()}"
        _wait_gone(workers, 5, f"workers after the keeper's {sig.name}")
        for n in names:
            wait_proc(procs[n], 15, f"publisher {n}")
    finally:
        _kill_all(*procs.values())
    for n in names:
        out = read_hls_dir(server.hls_dir(n))
        assert out.endlist, f"{n}: playlist not ended after {sig.name}:\n{out.text}"
        assert_exact(clips.get(LONG), out.segments, segment_target=TARGET, prefix=True, label=f"{n} stopped")
    assert server.log_lines(r"worker exited .*status=0"), server.log_tail()
    server.assert_no_tracebacks()


def _start_own(tmp_path, *extra: str, new_session: bool = False) -> ServerProcess:
    """A `mediaserver serve` started here rather than by server_factory: with CLI options
    (`extra`), or in its own session as a terminal runs it. Stop it with `_kill_own`."""
    rtmp, http, admin = free_ports(3)
    config = merge(DEFAULT_CONFIG, {"data_dir": str(tmp_path / "s" / "data"), "rtmp": {"port": rtmp},
                                    "http": {"port": http}, "admin": {"port": admin}})
    server = ServerProcess(tmp_path / "s", config)
    with open(server.log_path, "ab") as log:
        server.proc = subprocess.Popen([*server_command(server.config_path), *extra], cwd=server.workdir,
                                       env=server_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                       start_new_session=new_session)
    try:
        _wait_healthy(server, 20)
    except AssertionError:
        _kill_own(server)
        raise
    return server


def _kill_own(server: ServerProcess) -> None:
    if server.proc is not None and server.proc.poll() is None:
        workers = server.worker_pids()
        server.proc.kill()
        server.proc.wait(timeout=10)
        _wait_gone(workers, 10, "workers of a killed keeper")


@pytest.mark.timeout(60)
def test_ctrl_c_in_a_terminal_stops_everything_without_a_restart(tmp_path, clips):
    """Ctrl-C sends SIGINT to the whole foreground process group: the keeper and its worker get it at
    once. The worker's own exit must not be taken for a crash (no replacement worker), exit 0."""
    server = _start_own(tmp_path, new_session=True)
    proc = None
    try:
        proc = _publish(server, clips.path(LONG), "t", tmp_path)
        wait_for_playlist(server.hls_url("t"), 15, lambda t: _segments_listed(t) >= 1)
        workers = server.worker_pids()
        os.killpg(server.pid, signal.SIGINT)
        try:
            code = server.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"not stopped within 15 s of Ctrl-C:\n{server.log_tail()}") from None
        assert code == 0, f"exit {code} after Ctrl-C:\n{server.log_tail()}"
        _wait_gone(workers, 5, "workers after Ctrl-C")
        assert not server.log_lines(r"serving worker died|worker started pid=\d+ role=restart"), server.log_tail()
        wait_proc(proc, 15, "the publisher")
    finally:
        _kill_all(proc)
        _kill_own(server)
    assert read_hls_dir(server.hls_dir("t")).endlist
    server.assert_no_tracebacks()


# -- 5. SIGKILL of the keeper ----------------------------------------------------------------


@pytest.mark.timeout(60)
def test_sigkill_of_the_keeper_takes_its_workers_and_frees_the_ports(server_factory, clips, tmp_path):
    server = server_factory(hls={"segment_target": TARGET})
    proc = _publish(server, clips.path(LONG), "k", tmp_path)
    try:
        wait_for_playlist(server.hls_url("k"), 15, lambda t: _segments_listed(t) >= 1)
        workers = server.worker_pids()
        assert len(workers) == 1
        os.kill(server.pid, signal.SIGKILL)
        server.proc.wait(timeout=10)
        _wait_gone(workers, 5, "workers after SIGKILL of their keeper")
        wait_proc(proc, 15, "the publisher of a killed server")
    finally:
        _kill_all(proc)
    for port in (server.rtmp_port, server.http_port, server.admin_port):
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", port))  # raises if anything still listens there
    # A new server on the same ports and data directory starts, and ends the orphaned playlist.
    server.start()
    text = http_get(server.hls_url("k")).body.decode()
    assert "#EXT-X-ENDLIST" in text, text
    assert server.stop() == 0, server.log_tail()


# -- 6. upgrade --keeper ----------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_upgrade_keeper_reexecutes_in_place_with_a_live_publisher(server_factory, clips, tmp_path):
    server = server_factory(hls={"segment_target": TARGET})
    keeper = server.pid
    poller = viewer(server, "live")
    proc = _publish(server, clips.path(MEDIUM), "live", tmp_path)
    try:
        server.wait_for_log(r"publish started stream=live\b")
        time.sleep(1.0)
        worker = server.worker_pid()
        ports = client_ports(server.rtmp_port)
        assert len(ports) == 1, ports

        code, report = upgrade(server, "--keeper")
        assert code == 0 and report["ok"] and report["action"] == "upgrade_keeper", report
        assert report["keeper_pid"] == keeper and report["workers"] == 1, report
        assert server.alive() and server.pid == keeper, "the keeper must re-execute in place (same pid)"
        assert server.log_lines(r"keeper re-executed"), server.log_tail()
        assert server.worker_pids() == [worker], "the worker must be kept across the keeper's re-execution"
        assert client_ports(server.rtmp_port) == ports, "the publisher's connection changed"
        status = server_status(server)
        assert status["keeper"]["pid"] == keeper
        assert status["keeper"]["upgrades"][-1]["action"] == "upgrade_keeper" and status["keeper"]["upgrades"][-1]["ok"]
        assert [s["pid"] for s in status["sessions"]] == [worker]

        # The re-executed keeper runs a normal upgrade.
        time.sleep(1.0)
        code, report = upgrade(server)
        assert code == 0 and report["ok"], report
        assert report["old_pid"] == worker and report["moved"] == 1, report
        new = report["new_pid"]
        assert client_ports(server.rtmp_port) == ports, "the publisher's connection changed in the upgrade"
        assert [s["pid"] for s in server_status(server)["sessions"]] == [new]
        assert wait_proc(proc, 60) == 0, ffmpeg_log(proc)
    finally:
        _kill_all(proc)
    out = finish_clean(server, "live", poller)
    assert_exact(clips.get(MEDIUM), out.segments, segment_target=TARGET, label="through upgrade --keeper")
    # The worker the re-executed keeper adopted retires and is reaped.
    _wait_gone([worker], 10, "the retired worker")
    assert server.worker_pid() == new
    # The re-executed keeper still replaces a dying worker, and SIGTERM still stops everything.
    os.kill(new, signal.SIGKILL)
    last = _wait_new_worker(server, new)
    assert server.stop() == 0, server.log_tail()
    _wait_gone([last], 5, "workers after SIGTERM")
    server.assert_no_tracebacks()


@pytest.mark.timeout(60)
def test_upgrade_keeper_keeps_the_command_line_options(tmp_path):
    """`serve --log-format json`: the keeper, and every worker it starts, log JSON, also after the
    keeper has re-executed itself (its command line is rebuilt from the state it carries over)."""
    server = _start_own(tmp_path, "--log-format", "json")
    try:
        code, report = upgrade(server, "--keeper")
        assert code == 0 and report["ok"], report
        code, report = upgrade(server)
        assert code == 0 and report["ok"], report
        new = report["new_pid"]
        # A worker started by the re-executed keeper after a crash, too.
        os.kill(new, signal.SIGKILL)
        _wait_new_worker(server, new)
        time.sleep(0.3)
    finally:
        _kill_own(server)
    lines = [line for line in server.log_text().splitlines() if line.strip()]
    not_json = []
    for line in lines:
        try:
            json.loads(line)
        except ValueError:
            not_json.append(line)
    assert lines and not not_json, (
        f"{len(not_json)} of {len(lines)} log lines are not JSON although serve ran with --log-format json; "
        "first ones:\n" + "\n".join(not_json[:8])
    )


def _break(package: Path, relative: str) -> None:
    path = package / relative
    path.write_text(path.read_text() + "\nthis line is not python\n")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("broken", ["keeper.py", "cli.py"])
def test_upgrade_keeper_is_refused_when_the_keeper_on_disk_cannot_start(server_factory, clips, tmp_path, broken):
    """keeper.py is what the keeper imports; cli.py is what `python -m mediaserver serve`, the
    re-executed keeper's entry point, imports first. Either broken: refused, and the old keeper runs on."""
    installs = Installs(tmp_path / "inst")
    installs.make("a")
    installs.make("broken", lambda package: _break(package, broken))
    installs.use("a")
    server = server_factory(pythonpath=installs.current, hls={"segment_target": TARGET})
    keeper = server.pid
    proc = _publish(server, clips.path(MEDIUM), "p", tmp_path)
    try:
        server.wait_for_log(r"publish started stream=p\b")
        worker = server.worker_pid()
        ports = client_ports(server.rtmp_port)

        installs.use("broken")
        code, report, err = cli(server, "upgrade", "--keeper")
        assert server.alive(), (
            f"upgrade --keeper with a broken {broken} on disk killed the keeper and every worker "
            f"(CLI exit {code}: {err.strip()}):\n{server.log_tail()}"
        )
        assert code == 1 and isinstance(report, dict) and not report["ok"], (code, report, err)
        assert "cannot be imported" in report["error"] and broken in report["error"], report
        assert server.pid == keeper and server.worker_pids() == [worker]
        assert client_ports(server.rtmp_port) == ports
        _wait_healthy(server)
        assert [s["pid"] for s in server_status(server)["sessions"]] == [worker]

        # Fixed on disk: the re-execution goes through, the publisher still on its connection.
        installs.use("a")
        code, report = upgrade(server, "--keeper")
        assert code == 0 and report["ok"], report
        assert server.pid == keeper and server.worker_pids() == [worker]
        assert client_ports(server.rtmp_port) == ports
        assert wait_proc(proc, 60) == 0, ffmpeg_log(proc)
    finally:
        _kill_all(proc)
    assert "#EXT-X-DISCONTINUITY" not in read_hls(server.hls_url("p")).text
    # The adopted worker is watched: its death is noticed and it is replaced.
    os.kill(worker, signal.SIGKILL)
    _wait_new_worker(server, worker)
    assert server.stop() == 0, server.log_tail()


@pytest.mark.timeout(60)
def test_upgrade_keeper_with_a_config_on_disk_the_keeper_refuses_keeps_the_server(server_factory, clips, tmp_path):
    """The re-executed keeper takes its config path, options and data_dir from the state the
    previous image handed it, not from the file: a typo on disk must not take the server down.
    The file is the workers' business: the next `upgrade` refuses it with the reason."""
    server = server_factory(hls={"segment_target": TARGET})
    keeper = server.pid
    proc = _publish(server, clips.path(MEDIUM), "c", tmp_path)
    try:
        server.wait_for_log(r"publish started stream=c\b")
        worker = server.worker_pid()
        ports = client_ports(server.rtmp_port)
        server.config_path.write_text("bogus_key = 1\n" + server.config_path.read_text())
        code, report, err = _admin_upgrade(server, "--keeper")
        time.sleep(0.5)
        assert server.alive(), (
            f"upgrade --keeper with an invalid config file on disk killed the keeper and every worker "
            f"(CLI exit {code}: {err.strip()}):\n{server.log_tail()}"
        )
        assert code == 0 and isinstance(report, dict) and report["ok"], (code, report, err)
        assert server.pid == keeper and server.worker_pids() == [worker]
        assert client_ports(server.rtmp_port) == ports
        code, report, err = _admin_upgrade(server)
        assert code == 1 and isinstance(report, dict) and not report["ok"], (code, report, err)
        assert "bogus_key" in report["error"], report
        assert server.worker_pids() == [worker]
        assert client_ports(server.rtmp_port) == ports
        assert wait_proc(proc, 60) == 0, ffmpeg_log(proc)
    finally:
        _kill_all(proc)
    assert server.stop() == 0, server.log_tail()


@pytest.mark.timeout(60)
def test_a_data_dir_changed_on_disk_stays_refused_after_upgrade_keeper(server_factory, clips, tmp_path):
    """`upgrade` refuses a config whose data_dir differs (the open segments are in the old one). The
    keeper remembers the directory the workers write in; re-executing it must not make it forget."""
    server = server_factory(hls={"segment_target": TARGET})
    poller = viewer(server, "d")
    proc = _publish(server, clips.path(MEDIUM), "d", tmp_path)
    try:
        server.wait_for_log(r"publish started stream=d\b")
        worker = server.worker_pid()
        ports = client_ports(server.rtmp_port)
        server.config_path.write_text(to_toml(merge(server.config, {"data_dir": str(tmp_path / "elsewhere")})))
        # (the CLI would look for the token in the new data_dir: it is given the old one's)
        code, report, err = _admin_upgrade(server)
        assert code == 1 and "data_dir" in report["error"], (code, report, err)

        code, keeper_report, err = _admin_upgrade(server, "--keeper")
        assert isinstance(keeper_report, dict), (code, err, server.log_tail())
        if keeper_report["ok"]:
            code, report, err = _admin_upgrade(server)
            assert code == 1 and not report["ok"] and "data_dir" in report["error"], (
                f"after upgrade --keeper the same data_dir change was accepted: {report}"
            )
        else:
            assert "data_dir" in keeper_report["error"], keeper_report
        assert server.worker_pids() == [worker] and client_ports(server.rtmp_port) == ports
        assert wait_proc(proc, 60) == 0, ffmpeg_log(proc)
    finally:
        _kill_all(proc)
    out = finish_clean(server, "d", poller)
    assert_exact(clips.get(MEDIUM), out.segments, segment_target=TARGET, label="data_dir change refused")


# -- 7. the config reload through upgrade ----------------------------------------------------------


@pytest.mark.timeout(90)
def test_upgrade_reloads_the_config_for_new_publishes_and_live_ones_go_on(server_factory, clips, tmp_path):
    server = server_factory(hls={"segment_target": TARGET})
    poller = viewer(server, "old")
    proc = _publish(server, clips.path(MEDIUM), "old", tmp_path)
    fresh = None
    try:
        server.wait_for_log(r"publish started stream=old\b")
        time.sleep(1.5)
        worker = server.worker_pid()
        ports = client_ports(server.rtmp_port)
        server.config_path.write_text(to_toml(merge(server.config, {"hls": {"segment_target": 4.0}})))
        code, report = upgrade(server)
        assert code == 0 and report["ok"] and report["moved"] == 1 and report["old_pid"] == worker, report
        assert client_ports(server.rtmp_port) == ports
        fresh = _publish(server, clips.path(SMALL), "fresh", tmp_path)
        assert wait_proc(proc, 60) == 0, ffmpeg_log(proc)
        assert wait_proc(fresh, 60) == 0, ffmpeg_log(fresh)
    finally:
        _kill_all(proc, fresh)
    # The live publish keeps the target it started with (TARGETDURATION must not change: the poller checks).
    old = finish_clean(server, "old", poller)
    assert_exact(clips.get(MEDIUM), old.segments, segment_target=TARGET, label="live across the reload")
    assert max(s.duration for s in old.segments) < 3.5, [s.duration for s in old.segments]
    # The new publish uses the new one: 4 s segments from a 1 s GOP.
    new = _ended_hls(server, "fresh")
    assert new.playlist.target_duration == 4, new.text
    assert new.segments[0].duration >= 3.5, new.text
    assert_exact(clips.get(SMALL), new.segments, segment_target=4.0, label="new publish after the reload")


@pytest.mark.timeout(90)
def test_upgrade_refuses_a_config_the_new_worker_refuses_and_nothing_changes(server_factory, clips, tmp_path):
    server = server_factory(hls={"segment_target": TARGET})
    good = server.config_path.read_text()
    poller = viewer(server, "r")
    proc = _publish(server, clips.path(MEDIUM), "r", tmp_path)
    try:
        server.wait_for_log(r"publish started stream=r\b")
        worker = server.worker_pid()
        ports = client_ports(server.rtmp_port)

        # An unknown key. The CLI reads the file too and says so itself...
        server.config_path.write_text("bogus_key = 1\n" + good)
        code, report, err = cli(server, "upgrade")
        assert code == 2 and "bogus_key" in err, (code, report, err)
        # ...and the server, asked without the file, refuses with the reason.
        code, report, err = _admin_upgrade(server)
        assert code == 1 and isinstance(report, dict) and not report["ok"], (code, report, err)
        assert report["error"].startswith("config refused") and "bogus_key" in report["error"], report
        assert server.worker_pid() == worker and client_ports(server.rtmp_port) == ports

        # A listening port cannot change under live connections: said so.
        server.config_path.write_text(to_toml(merge(server.config, {"rtmp": {"port": free_ports(1)[0]}})))
        code, report = upgrade(server)
        assert code == 1 and not report["ok"], report
        assert "rtmp.port" in report["error"] and "cannot change under live connections" in report["error"], report
        assert server.worker_pid() == worker and client_ports(server.rtmp_port) == ports
        status = server_status(server)
        assert [s["pid"] for s in status["sessions"]] == [worker]
        assert [u["ok"] for u in status["keeper"]["upgrades"]] == [False, False], status["keeper"]["upgrades"]

        # The good file again: the upgrade goes through.
        server.config_path.write_text(good)
        code, report = upgrade(server)
        assert code == 0 and report["ok"] and report["moved"] == 1, report
        assert wait_proc(proc, 60) == 0, ffmpeg_log(proc)
    finally:
        _kill_all(proc)
    out = finish_clean(server, "r", poller)
    assert_exact(clips.get(MEDIUM), out.segments, segment_target=TARGET, label="through refused upgrades")
    assert server.log_lines(r"upgrade refused"), server.log_tail()


# -- 8. status ---------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_status_shows_which_process_serves_which_stream_and_the_upgrade_history(server_factory, clips, tmp_path):
    server = server_factory(hls={"segment_target": TARGET})
    proc = _publish(server, clips.path(MEDIUM), "st", tmp_path)
    try:
        server.wait_for_log(r"publish started stream=st\b")
        worker = server.worker_pid()
        status = server_status(server)
        assert [(s["name"], s["pid"]) for s in status["sessions"]] == [("st", worker)]
        assert status["pid"] == worker and status["keeper"]["pid"] == server.pid
        assert [(w["pid"], w["role"], w["status"]) for w in status["keeper"]["workers"]] == [(worker, "first", "serving")]
        text = _text_cli(server, "status")
        assert text.returncode == 0, text.stderr
        assert re.search(rf"^  st: worker {worker}, ", text.stdout, re.M), text.stdout
        assert f"keeper {server.pid}:" in text.stdout and f"worker {worker} (first): serving" in text.stdout, text.stdout

        time.sleep(1.0)
        code, report = upgrade(server)
        assert code == 0 and report["ok"], report
        new = report["new_pid"]
        _wait_gone([worker], 10, "the old worker after the upgrade")
        status = server_status(server)
        assert [(s["name"], s["pid"]) for s in status["sessions"]] == [("st", new)]
        assert status["pid"] == new
        assert [(w["pid"], w["role"], w["status"]) for w in status["keeper"]["workers"]] == [(new, "successor", "serving")]
        last = status["keeper"]["upgrades"][-1]
        assert last["action"] == "upgrade" and last["ok"] and (last["old_pid"], last["new_pid"]) == (worker, new), last
        pauses = {s["stream"]: s["pause_ms"] for s in last["streams"]}
        assert set(pauses) == {"st"} and isinstance(pauses["st"], (int, float)) and pauses["st"] >= 0, last

        text = _text_cli(server, "status")
        assert text.returncode == 0, text.stderr
        assert re.search(rf"^  st: worker {new}, ", text.stdout, re.M), text.stdout
        assert f"worker {new} (successor): serving" in text.stdout, text.stdout
        assert "upgrade history:" in text.stdout, text.stdout
        assert re.search(rf"upgrade worker {worker} -> {new}: ok, max pause [\d.]+ ms", text.stdout), text.stdout
        assert wait_proc(proc, 60) == 0, ffmpeg_log(proc)
    finally:
        _kill_all(proc)


# -- 9. start-up failures ------------------------------------------------------------------------


def _config_file(tmp_path, **over) -> Path:
    rtmp, http, admin = free_ports(3)
    config = merge(
        {
            "data_dir": str(tmp_path / "data"),
            "rtmp": {"host": "127.0.0.1", "port": rtmp},
            "http": {"host": "127.0.0.1", "port": http},
            "admin": {"host": "127.0.0.1", "port": admin},
            "webrtc": {"host_addresses": ["127.0.0.1"]},
        },
        over,
    )
    path = tmp_path / "config.toml"
    path.write_text(to_toml(config))
    return path


def _serve(path: Path, tmp_path, pythonpath=None, timeout: float = 30) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(server_command(path), cwd=tmp_path, env=server_env(pythonpath), capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"serve still running after {timeout} s (a failure must stop it): {exc.stderr!r}") from None


@pytest.mark.parametrize("kind", ["rtmp", "http", "admin"])
def test_a_port_in_use_is_exit_1_with_a_message(tmp_path, kind):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        path = _config_file(tmp_path, **{kind: {"port": port}})
        proc = _serve(path, tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "in use" in proc.stderr and f"127.0.0.1:{port}" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "worker started" not in proc.stderr, proc.stderr


def test_a_bad_config_is_exit_2_before_any_worker(tmp_path):
    path = _config_file(tmp_path, hls={"segment_targett": 2.0})
    proc = _serve(path, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "segment_targett" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "worker started" not in proc.stderr, proc.stderr


def test_a_worker_that_cannot_import_stops_the_start_with_the_reason(tmp_path):
    """The keeper imports fine, the server it runs does not: exit 1 at once, saying why."""
    installs = Installs(tmp_path / "inst")
    installs.make("broken", lambda package: _break(package, "transport/rtmp_server.py"))
    installs.use("broken")
    started = time.monotonic()
    proc = _serve(_config_file(tmp_path), tmp_path, pythonpath=installs.current)
    assert time.monotonic() - started < 20
    assert proc.returncode == 1, proc.stderr
    assert re.search(r"the server did not start .*cannot be imported", proc.stderr), proc.stderr
