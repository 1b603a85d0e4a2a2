"""`mediaserver upgrade`: live RTMP connections handed to a new worker process.

Real publishers (the ffmpeg CLI, GStreamer's rtmp2sink, PyAV's RTMP muxer)
publish through upgrades; each must keep its one TCP connection (the same
local port, seen with `ss`), exit 0, and its HLS output must be every frame it
sent, once, in order, byte-identical, without a discontinuity. The server runs
from an install directory (tests/installs.py) so that an upgrade can start a
worker from different code: a copy of the package whose transport and HLS
writer differ, or whose logic is 1.1.0.
"""

from __future__ import annotations

import shutil
import threading
import time

import pytest

from conftest import REPO
from installs import Installs, client_ports, finish_clean, replace_in, set_package_version, server_status, upgrade, viewer
from media import ClipSpec, assert_exact, ffmpeg_log, ffmpeg_publish, pyav_publish, read_clip, wait_proc

GST = shutil.which("gst-launch-1.0")
CLIP = ClipSpec(duration=12.0, fps=25, gop=50, audio_rate=32000)
TARGET = 2.0


def _changed_install(package) -> None:
    """Transport and HLS writer code differ from the running one's, and the version says so."""
    set_package_version(package, "1.0.1")
    replace_in(package / "transport/rtmp_server.py", '"connection adopted"', '"connection adopted by install b"')
    replace_in(
        package / "hls/segmenter.py", "    def detach(self) -> WriterState:",
        '    INSTALL = "b"\n    """Marks the writer of install b."""\n\n    def detach(self) -> WriterState:',
    )


def _logic_1_1_0(package) -> None:
    shutil.rmtree(package / "logic")
    shutil.copytree(REPO / "relups/1.1.0/logic", package / "logic")


@pytest.mark.timeout(180)
@pytest.mark.skipif(GST is None, reason="gst-launch-1.0 missing: run tests/install-system-deps.sh")
def test_ffmpeg_gstreamer_and_pyav_publish_through_three_upgrades(server_factory, clips, tmp_path):
    from test_gstreamer import gst_publish

    installs = Installs(tmp_path / "inst")
    installs.make("a")
    installs.make("b", _changed_install)
    installs.use("a")
    server = server_factory(pythonpath=installs.current, hls={"segment_target": TARGET})
    clip = clips.get(CLIP)
    pollers = {name: viewer(server, name) for name in ("ff", "gst", "pyav")}

    ff = ffmpeg_publish(clip.path, server.rtmp_url("ff"), log_path=tmp_path / "ff.log")
    sent = tmp_path / "gst.flv"
    gst = gst_publish(server.rtmp_url("gst"), sent, seconds=12)
    pyav_result: dict = {}
    pyav = threading.Thread(
        target=lambda: pyav_result.setdefault("sent", pyav_publish(clip, server.rtmp_url("pyav"))), daemon=True
    )
    pyav.start()
    try:
        deadline = time.monotonic() + 10
        while len(server_status(server)["sessions"]) < 3:
            assert time.monotonic() < deadline, f"publishers not live:\n{server.log_tail()}"
            time.sleep(0.1)
        ports = client_ports(server.rtmp_port)
        assert len(ports) == 3, ports
        first_worker = server.worker_pid()

        reports = []
        for step, install in enumerate(("a", "b", "a")):
            time.sleep(1.5)
            installs.use(install)
            code, report = upgrade(server)
            assert code == 0 and report["ok"], report
            assert report["moved"] == 3, report
            reports.append(report)
            assert client_ports(server.rtmp_port) == ports, f"after upgrade {step + 1} the publishers' ports changed"
            status = server_status(server)
            serving = report["new_pid"]
            assert {s["pid"] for s in status["sessions"]} == {serving}, status["sessions"]
            assert len(status["sessions"]) == 3
            expected_version = "1.0.1" if install == "b" else "1.0.0"
            assert status["package_version"] == expected_version, status
        assert server.log_lines(r"connection adopted by install b"), "install b's transport code did not run"
        assert reports[0]["old_pid"] == first_worker
        assert [r["old_pid"] for r in reports[1:]] == [r["new_pid"] for r in reports[:-1]]
        pauses = [s["pause_ms"] for r in reports for s in r["streams"] if s["pause_ms"] is not None]
        print(f"per-stream pauses (ms): {sorted(pauses)}; switch_ms: {[r['switch_ms'] for r in reports]}")

        assert wait_proc(ff, 60) == 0, ffmpeg_log(ff)
        out, _ = gst.communicate(timeout=60)
        assert gst.returncode == 0, out.decode(errors="replace")[-2000:]
        pyav.join(60)
        assert not pyav.is_alive() and pyav_result.get("sent"), "PyAV publisher did not finish"
    finally:
        for proc in (ff, gst):
            if proc.poll() is None:
                proc.kill()

    assert_exact(clip, finish_clean(server, "ff", pollers["ff"]).segments, segment_target=TARGET, label="ffmpeg")
    assert_exact(clip, finish_clean(server, "pyav", pollers["pyav"]).segments, segment_target=TARGET, label="PyAV")
    gst_out = finish_clean(server, "gst", pollers["gst"])
    assert_exact(read_clip(sent), gst_out.segments, segment_target=TARGET, label="GStreamer")
    server.assert_no_tracebacks()


@pytest.mark.timeout(120)
def test_upgrade_to_an_install_with_logic_1_1_0_migrates_through_the_relup(server_factory, clips, tmp_path):
    installs = Installs(tmp_path / "inst")
    installs.make("a")
    installs.make("b", _logic_1_1_0)
    installs.use("a")
    server = server_factory(
        pythonpath=installs.current, hls={"segment_target": TARGET}, relup={"directory": str(REPO / "relups")}
    )
    clip = clips.get(CLIP)
    poller = viewer(server, "m")
    ff = ffmpeg_publish(clip.path, server.rtmp_url("m"), log_path=tmp_path / "ff.log")
    try:
        server.wait_for_log(r"publish started stream=m")
        time.sleep(3)
        assert server_status(server)["sessions"][0]["version"] == "1.0.0"
        installs.use("b")
        code, report = upgrade(server)
        assert code == 0 and report["ok"], report
        assert report["new_logic_version"] == "1.1.0", report
        session = server_status(server)["sessions"][0]
        assert session["version"] == "1.1.0" and session["pid"] == report["new_pid"], session
        # 1.1.0's state has the bitrate window, filled from here on.
        time.sleep(2)
        assert "bitrate_kbps" in server_status(server)["sessions"][0]
        assert wait_proc(ff, 60) == 0, ffmpeg_log(ff)
    finally:
        if ff.poll() is None:
            ff.kill()
    assert_exact(clip, finish_clean(server, "m", poller).segments, segment_target=TARGET, label="1.0.0 -> 1.1.0")


@pytest.mark.timeout(120)
def test_upgrade_without_a_migration_path_is_refused_before_anything_moves(server_factory, clips, tmp_path):
    installs = Installs(tmp_path / "inst")
    installs.make("a")

    def logic_9(package) -> None:
        replace_in(package / "logic/__init__.py", 'VERSION = "1.0.0"', 'VERSION = "9.0.0"')

    installs.make("b", logic_9)
    installs.use("a")
    server = server_factory(
        pythonpath=installs.current, hls={"segment_target": TARGET}, relup={"directory": str(REPO / "relups")}
    )
    clip = clips.get(CLIP)
    poller = viewer(server, "n")
    ff = ffmpeg_publish(clip.path, server.rtmp_url("n"), log_path=tmp_path / "ff.log")
    try:
        server.wait_for_log(r"publish started stream=n")
        worker = server.worker_pid()
        ports = client_ports(server.rtmp_port)
        time.sleep(2)
        installs.use("b")
        code, report = upgrade(server)
        assert code == 1 and not report["ok"], report
        assert "no relup path between logic 1.0.0" in report["error"] and "9.0.0" in report["error"], report
        assert report.get("moved", 0) == 0
        assert server.worker_pid() == worker, "the old worker must go on serving"
        assert client_ports(server.rtmp_port) == ports
        assert server_status(server)["sessions"][0]["pid"] == worker
        # A dry run says the same, and nothing moves either.
        code, report = upgrade(server, "--dry-run")
        assert code == 1 and "no relup path" in report["error"], report
        assert wait_proc(ff, 60) == 0, ffmpeg_log(ff)
    finally:
        if ff.poll() is None:
            ff.kill()
    assert_exact(clip, finish_clean(server, "n", poller).segments, segment_target=TARGET, label="refused upgrade")


@pytest.mark.timeout(120)
def test_dry_run_checks_everything_and_moves_nothing(server_factory, clips, tmp_path):
    server = server_factory(hls={"segment_target": TARGET})
    clip = clips.get(CLIP)
    poller = viewer(server, "d")
    ff = ffmpeg_publish(clip.path, server.rtmp_url("d"), log_path=tmp_path / "ff.log")
    try:
        server.wait_for_log(r"publish started stream=d")
        worker = server.worker_pid()
        time.sleep(1)
        code, report = upgrade(server, "--dry-run")
        assert code == 0 and report["ok"] and report["action"] == "upgrade_dry_run", report
        assert report["connections"] == 1 and report["sessions"] == 1
        assert report["preflight"] and all(r["ok"] for r in report["preflight"]), report
        assert report["moved"] == 0
        assert server.worker_pid() == worker
        assert wait_proc(ff, 60) == 0, ffmpeg_log(ff)
    finally:
        if ff.poll() is None:
            ff.kill()
    assert_exact(clip, finish_clean(server, "d", poller).segments, segment_target=TARGET, label="dry run")
