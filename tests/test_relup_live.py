"""Relups applied to a running server while the ffmpeg CLI publishes.

The publishers never see an error or a reconnect, the HLS output stays
frame-exact, the new behaviour shows between the relups and is gone after
the reverts. Bad relups change nothing; a crashing generation is reverted by
the server itself.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from media import SMALL, assert_exact, read_hls, wait_for_endlist, wait_proc
from relup_factory import make_relup

REPO_RELUPS = Path(__file__).resolve().parent.parent / "relups"
LONG = dataclasses.replace(SMALL, duration=14.0)


def relups_dir(tmp_path: Path) -> Path:
    target = tmp_path / "relups"
    shutil.copytree(REPO_RELUPS, target, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def token(server) -> str:
    return (server.data_dir / "admin.token").read_text().strip()


def api(server, method: str, path: str, body=None, auth: str | None = "token"):
    headers = {"Content-Type": "application/json"}
    if auth == "token":
        headers["Authorization"] = f"Bearer {token(server)}"
    elif auth:
        headers["Authorization"] = auth
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.admin_port}{path}",
        data=json.dumps(body).encode() if body is not None else None,
        method=method,
        headers=headers,
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def cli(server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mediaserver", *args, "--config", str(server.config_path)],
        capture_output=True, text=True, timeout=60,
    )


def session_keys(server) -> list[set[str]]:
    status, body = api(server, "GET", "/api/v1/status")
    assert status == 200
    return [set(s) for s in body["sessions"]]


def start_publishers(server, clips, ffmpeg_publisher, names):
    procs = {name: ffmpeg_publisher(clips.path(LONG), server.rtmp_url(name)) for name in names}
    for name in names:
        server.wait_for_log(f"publish started.*stream={name}")
    return procs


def finish(server, clips, procs):
    clip = clips.get(LONG)
    for name, proc in procs.items():
        assert wait_proc(proc, 60) == 0, f"publisher {name} failed"
        wait_for_endlist(server.hls_url(name), 10)
        assert_exact(clip, read_hls(server.hls_url(name)).segments, segment_target=2.0, label=name)
        assert len(server.log_lines(f"publish started.*stream={name} ")) == 1, "publisher reconnected"


def test_relup_chain_and_reverts_under_live_publishers(server_factory, clips, ffmpeg_publisher, tmp_path):
    server = server_factory(relup={"directory": str(relups_dir(tmp_path))})
    procs = start_publishers(server, clips, ffmpeg_publisher, ["a", "b", "c"])
    time.sleep(1.5)
    assert all("bitrate_kbps" not in keys for keys in session_keys(server))

    dry = cli(server, "relup", "apply", "1.1.0", "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "dry_run 1.0.0 -> 1.1.0: done" in dry.stdout

    applied = cli(server, "relup", "apply", "1.1.0")
    assert applied.returncode == 0, applied.stdout + applied.stderr
    time.sleep(2.0)
    status, body = api(server, "GET", "/api/v1/status")
    assert body["version"] == "1.1.0"
    assert [g["version"] for g in body["generations"]] == ["1.0.0", "1.1.0"]
    assert all(s["version"] == "1.1.0" and s["state_version"] == 2 for s in body["sessions"])
    assert all(s["bitrate_kbps"] > 0 and 25 <= s["fps"] <= 35 for s in body["sessions"]), body["sessions"]

    applied = cli(server, "relup", "apply")  # no PATH: the one upgrading from 1.1.0
    assert applied.returncode == 0 and "1.1.0 -> 1.2.0: done" in applied.stdout, applied.stdout + applied.stderr
    time.sleep(2.0)
    assert all("keyframe_interval_ms" in keys for keys in session_keys(server))
    shown = cli(server, "status")
    assert "version 1.2.0" in shown.stdout and "bitrate_kbps" in shown.stdout

    for expected in ("1.1.0", "1.0.0"):
        reverted = cli(server, "relup", "revert")
        assert reverted.returncode == 0 and f"-> {expected}: done" in reverted.stdout, reverted.stdout
        time.sleep(0.7)
    status, body = api(server, "GET", "/api/v1/status")
    assert body["version"] == "1.0.0" and len(body["generations"]) == 1
    assert all("bitrate_kbps" not in s and s["state_version"] == 1 for s in body["sessions"])
    assert [h["action"] for h in body["history"]] == ["dry_run", "apply", "apply", "revert", "revert"]

    finish(server, clips, procs)
    server.assert_no_tracebacks()


BAD_RELUPS = {
    "syntax": dict(edits={"stream.py": ("def handle(", "def handle(:")}),
    "migration-raises": dict(migrations="def up(state):\n    raise RuntimeError('boom in up')\n\ndef down(state):\n    return state\n"),
    "wrong-from": dict(from_version="0.9.0"),
}


def test_bad_relups_change_nothing_under_live_publishers(server_factory, clips, ffmpeg_publisher, tmp_path):
    relups = tmp_path / "relups"
    relups.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    make_relup(outside, "1.0.1")
    for index, (kind, kwargs) in enumerate(BAD_RELUPS.items()):
        make_relup(relups, f"1.0.{index + 1}", **kwargs)
    server = server_factory(relup={"directory": str(relups)})
    procs = start_publishers(server, clips, ffmpeg_publisher, ["x", "y"])
    time.sleep(1.0)
    expected = ["syntax error", "boom in up", "upgrades from 0.9.0"]
    for index, reason in enumerate(expected):
        status, report = api(server, "POST", "/api/v1/relup", {"path": f"1.0.{index + 1}"})
        assert status == 409 and not report["ok"] and reason in report["error"], report
    status, report = api(server, "POST", "/api/v1/relup", {"path": str(outside / "1.0.1")})
    assert status == 409 and "outside the relups directory" in report["error"]
    refused = cli(server, "relup", "apply", str(outside / "1.0.1"))
    assert refused.returncode == 1 and "outside the relups directory" in refused.stdout

    status, body = api(server, "GET", "/api/v1/status")
    assert body["version"] == "1.0.0" and len(body["generations"]) == 1
    assert all(s["crashes"] == 0 for s in body["sessions"])
    finish(server, clips, procs)


def test_admin_api_refuses_every_endpoint_without_the_token(server):
    token_file = server.data_dir / "admin.token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    for method, path in [("GET", "/api/v1/status"), ("GET", "/api/v1/sessions"), ("GET", "/api/v1/relups"),
                         ("POST", "/api/v1/relup"), ("POST", "/api/v1/revert"), ("GET", "/nope")]:
        for auth in (None, "Bearer wrong", "Basic abc", f"bearer {token(server)}x"):
            status, body = api(server, method, path, {} if method == "POST" else None, auth=auth)
            assert status == 401, (method, path, auth, status)
    status, body = api(server, "POST", "/api/v1/relup", {"path": "1.0.1", "surprise": 1})
    assert status == 400 and "surprise" in body["error"]
    no_token = subprocess.run(
        [sys.executable, "-m", "mediaserver", "status", "--config", str(server.config_path), "--token", "wrong"],
        capture_output=True, text=True, timeout=30,
    )
    assert no_token.returncode == 1 and "401" in no_token.stderr


def test_crashing_generation_is_quarantined_then_reverted(server_factory, clips, ffmpeg_publisher, tmp_path):
    relups = tmp_path / "relups"
    relups.mkdir()
    # The first video frame 100 ms after each 3 s mark (a P-frame) crashes the new handler.
    make_relup(
        relups, "1.0.1",
        edits={"stream.py": (
            '    if kind == "video":\n',
            '    if kind == "video":\n'
            '        if 1100 <= message.ts % 3000 < 1134 and not message.keyframe:\n'
            '            raise RuntimeError("injected crash at %d" % message.ts)\n',
        )},
    )
    # One failing message is one crash: the first is quarantined (later frames went out
    # before the revert, so it cannot be re-handled in order), the second reverts.
    server = server_factory(relup={"directory": str(relups), "auto_revert_crashes": 2, "auto_revert_window": 60.0})
    procs = start_publishers(server, clips, ffmpeg_publisher, ["q"])
    time.sleep(1.0)
    status, report = api(server, "POST", "/api/v1/relup", {"path": "1.0.1"})
    assert status == 200, report
    server.wait_for_log("automatic revert", timeout=15)
    assert wait_proc(procs["q"], 60) == 0
    wait_for_endlist(server.hls_url("q"), 10)

    dead = [json.loads(line) for line in (server.data_dir / "dead-letters" / "q.jsonl").read_text().splitlines()]
    assert len(dead) == 1 and all("injected crash" in d["reason"] for d in dead)
    lost = {d["message"]["ts"] for d in dead}
    clip = clips.get(LONG)
    kept = dataclasses.replace(clip, packets=[p for p in clip.packets if not (p.kind == "video" and p.dts in lost)])
    assert len(kept.packets) == len(clip.packets) - 1
    assert_exact(kept, read_hls(server.hls_url("q")).segments, segment_target=2.0, label="quarantine",
                 max_gap_without_discontinuity=2.0)
    status, body = api(server, "GET", "/api/v1/status")
    assert body["version"] == "1.0.0"
    assert [h["action"] for h in body["history"]] == ["apply", "auto_revert"]
    assert len(server.log_lines("publish started.*stream=q ")) == 1
