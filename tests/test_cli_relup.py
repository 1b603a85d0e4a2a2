"""`mediaserver status` and `mediaserver relup apply|revert` against a running
server: output, exit codes, and the server's version after each step.

The relup package is built here (the installed logic with VERSION 1.0.1 and
identity migrations), in a relups directory of the test's own.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO, free_ports, server_env
from media import CorePublisher

IDENTITY = "def up(state):\n    return dict(state)\n\n\ndef down(state):\n    return dict(state)\n"


def build_package(relups: Path, to: str = "1.0.1", migrations: str = IDENTITY) -> Path:
    package = relups / to
    shutil.copytree(REPO / "mediaserver" / "logic", package / "logic",
                    ignore=shutil.ignore_patterns("__pycache__"))
    init = package / "logic" / "__init__.py"
    text = init.read_text()
    assert 'VERSION = "1.0.0"' in text
    init.write_text(text.replace('VERSION = "1.0.0"', f'VERSION = "{to}"'))
    (package / "migrations.py").write_text(migrations)
    (package / "relup.toml").write_text(textwrap.dedent(f"""\
        from = "1.0.0"
        to = "{to}"
        description = "CLI test package"

        [[instructions]]
        type = "load_logic"

        [[instructions]]
        type = "update_sessions"
        kind = "stream"
        up = "up"
        down = "down"
        """))
    return package


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mediaserver", *args],
        capture_output=True, text=True, timeout=60, cwd=cwd, env=server_env(),
    )


class Cli:
    """The CLI pointed at one server through its config file."""

    def __init__(self, server) -> None:
        self.server = server

    def __call__(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return run(*args, "--config", str(self.server.config_path), cwd=cwd)

    def version(self) -> str:
        done = self("status", "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)["version"]


@pytest.fixture
def relups(tmp_path: Path) -> Path:
    directory = tmp_path / "relups"
    directory.mkdir()
    build_package(directory)
    return directory


@pytest.fixture
def server(server_factory, relups):
    return server_factory(relup={"directory": str(relups)})


@pytest.fixture
def cli(server) -> Cli:
    return Cli(server)


def test_status_prints_the_version(cli):
    done = cli("status")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "version 1.0.0"
    assert "generations:" in lines
    assert any(line.strip().startswith("g") and "1.0.0" in line and "current" in line for line in lines)
    assert "sessions: 0" in lines
    as_json = cli("status", "--json")
    assert as_json.returncode == 0
    body = json.loads(as_json.stdout)
    assert body["version"] == "1.0.0" and len(body["generations"]) == 1


def test_dry_run_apply_and_revert(cli, server):
    done = cli("relup", "apply", "1.0.1", "--dry-run")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[0] == "dry_run 1.0.0 -> 1.0.1: done (preflight only, nothing changed)"
    assert cli.version() == "1.0.0"

    done = cli("relup", "apply", "1.0.1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[0] == "apply 1.0.0 -> 1.0.1: done"
    status = cli("status")
    assert status.stdout.splitlines()[0] == "version 1.0.1"
    assert "1.0.0" in status.stdout and "kept for revert" in status.stdout
    assert "apply 1.0.0 -> 1.0.1: ok" in status.stdout  # the history

    # 1.0.1 is running now: the package (from 1.0.0) is refused, with the reason.
    done = cli("relup", "apply", "1.0.1")
    assert done.returncode == 1
    assert done.stdout.splitlines()[0] == "apply 1.0.1 -> 1.0.1: REFUSED (nothing changed)"
    assert "error: relup 1.0.1 upgrades from 1.0.0, but the running version is 1.0.1" in done.stdout
    assert cli.version() == "1.0.1"

    done = cli("relup", "revert")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[0] == "revert 1.0.1 -> 1.0.0: done"
    assert cli.version() == "1.0.0"

    done = cli("relup", "revert")
    assert done.returncode == 1
    assert "REFUSED" in done.stdout and "nothing to revert: 1.0.0 is the base version" in done.stdout
    assert cli.version() == "1.0.0"
    server.assert_no_tracebacks()


def test_apply_without_a_path_and_json_output(cli):
    # No PATH: the one package upgrading from the running version.
    done = cli("relup", "apply", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is True and report["action"] == "apply"
    assert (report["from_version"], report["to_version"]) == ("1.0.0", "1.0.1")
    assert cli.version() == "1.0.1"
    done = cli("relup", "revert", "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["to_version"] == "1.0.0"
    done = cli("relup", "revert", "--json")
    assert done.returncode == 1 and json.loads(done.stdout)["ok"] is False


def test_paths_are_sent_absolute_but_not_resolved(cli, relups, tmp_path):
    # A relative path from the operator's directory reaches the package...
    done = cli("relup", "apply", "relups/1.0.1", "--dry-run", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    # ...and one through a symlink is seen as such by the server, and refused.
    (tmp_path / "shortcut").symlink_to(relups / "1.0.1", target_is_directory=True)
    (relups / "latest").symlink_to(relups / "1.0.1", target_is_directory=True)
    for path, error in [
        ("./shortcut", "outside the relups directory"),  # /tmp/.../shortcut, as written
        (str(tmp_path / "shortcut"), "outside the relups directory"),
        ("relups/latest", "latest is a symlink"),
        ("latest", "latest is a symlink"),
        ("shortcut", "relup package 'shortcut' not found"),  # a bare name: looked up in the relups directory
    ]:
        done = cli("relup", "apply", path, cwd=tmp_path)
        assert done.returncode == 1, (path, done.stdout, done.stderr)
        assert "REFUSED" in done.stdout and error in done.stdout, (path, done.stdout)
    done = cli("relup", "apply", "../elsewhere", cwd=relups)
    assert done.returncode == 1 and "outside the relups directory" in done.stdout
    assert cli.version() == "1.0.0"


def test_preflight_errors_are_printed_per_session(cli, server, relups):
    build_package(relups, "1.0.2", migrations=(
        "def up(state):\n    raise RuntimeError('boom in up')\n\n\ndef down(state):\n    return dict(state)\n"
    ))
    publisher = CorePublisher("127.0.0.1", server.rtmp_port, "cam")
    try:
        publisher.open()
        server.wait_for_log("publish started.*stream=cam")
        done = cli("relup", "apply", "1.0.2", "--dry-run")
        assert done.returncode == 1, done.stdout + done.stderr
        lines = done.stdout.splitlines()
        assert lines[0] == "dry_run 1.0.0 -> 1.0.2: REFUSED (nothing changed)"
        assert "  session cam: up migration: RuntimeError: boom in up" in lines
        # A dry run that passes names each session's result too.
        done = cli("relup", "apply", "1.0.1", "--dry-run")
        assert done.returncode == 0, done.stdout + done.stderr
        assert any(
            line.startswith("  session cam: ok: up migration valid, down(up(state)) == state")
            for line in done.stdout.splitlines()
        ), done.stdout
        # The good package switches the live session, and back.
        done = cli("relup", "apply", "1.0.1")
        assert done.returncode == 0 and "sessions: 1," in done.stdout, done.stdout
        status = json.loads(cli("status", "--json").stdout)
        assert status["version"] == "1.0.1"
        assert [(g["version"], g["sessions"]) for g in status["generations"]] == [("1.0.0", 0), ("1.0.1", 1)]
        assert cli("relup", "revert").returncode == 0
        status = json.loads(cli("status", "--json").stdout)
        assert [(g["version"], g["sessions"]) for g in status["generations"]] == [("1.0.0", 1)]
        assert [s["name"] for s in status["sessions"]] == ["cam"]
    finally:
        publisher.close()


def test_wrong_or_missing_token_and_unreachable_server(cli, server, tmp_path):
    done = cli("status", "--token", "wrong")
    assert done.returncode == 1
    assert "the admin API answered 401: missing or wrong bearer token" in done.stderr
    done = cli("relup", "apply", "1.0.1", "--token", "wrong")
    assert done.returncode == 1 and "401" in done.stderr

    # --admin and --token override the config: no config needed at all.
    token = (server.data_dir / "admin.token").read_text().strip()
    done = run("status", "--admin", f"http://127.0.0.1:{server.admin_port}", "--token", token, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.startswith("version 1.0.0"), done.stderr

    # No token anywhere: the defaults' data_dir (relative to the directory) has none.
    done = run("status", "--admin", f"http://127.0.0.1:{server.admin_port}", cwd=tmp_path)
    assert done.returncode == 2
    assert "no admin token" in done.stderr and "mediaserver-data/admin.token" in done.stderr

    (port,) = free_ports(1)
    url = f"http://127.0.0.1:{port}"
    for args in (["status"], ["relup", "apply", "1.0.1"], ["relup", "revert"]):
        done = run(*args, "--admin", url, "--token", "t")
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.strip() == f"mediaserver: cannot reach the admin API at {url}: connection refused"

    done = run("status", "--admin", "127.0.0.1:8081", "--token", "t")
    assert done.returncode == 2 and "is not an http:// URL" in done.stderr
    # The public HTTP port is not the admin API: a clear refusal, not a traceback.
    done = run("status", "--admin", f"http://127.0.0.1:{server.http_port}", "--token", token)
    assert done.returncode == 1 and "404" in done.stderr and "Traceback" not in done.stderr


def test_usage_errors_and_help(tmp_path):
    for command in (["status"], ["relup"], ["relup", "apply"], ["relup", "revert"], ["serve"], []):
        done = run(*command, "--help")
        assert done.returncode == 0, (command, done.stderr)
        assert done.stdout.startswith("usage: mediaserver"), done.stdout
    assert "exit status:" in run("relup", "apply", "--help").stdout
    assert run("relup").returncode == 2  # an action is required
    assert run("relup", "apply", "--nope").returncode == 2
    missing = run("status", "--config", str(tmp_path / "missing.toml"))
    assert missing.returncode == 2 and "missing.toml" in missing.stderr


def test_status_and_reports_show_what_a_revert_handed_back(capsys):
    from mediaserver.admin_client import print_report, print_status

    print_status({
        "version": "1.0.0", "generations": [],
        "sessions": [
            {"name": "cam", "version": "1.0.0", "state_version": 1, "uptime": 3.0, "video_frames": 90,
             "audio_frames": 130, "crashes": 3, "quarantined": 0, "held": 0, "rehandled": 2},
            {"name": "calm", "version": "1.0.0", "state_version": 1, "uptime": 3.0, "video_frames": 90,
             "audio_frames": 130, "crashes": 0, "quarantined": 0, "held": 0, "rehandled": 0},
        ],
        "history": [{"action": "auto_revert", "from_version": "1.0.1", "to_version": "1.0.0", "ok": True,
                     "rehandled": 2}],
    })
    print_report({"action": "auto_revert", "from_version": "1.0.1", "to_version": "1.0.0", "ok": True,
                  "sessions": 2, "duration_ms": 0.2, "switch_ms": 0.1, "rehandled": 2})
    lines = capsys.readouterr().out.splitlines()
    assert "  cam: 1.0.0 state v1, up 3.0 s, 90 video / 130 audio frames, crashes 3, rehandled 2" in lines
    assert "  calm: 1.0.0 state v1, up 3.0 s, 90 video / 130 audio frames" in lines
    assert "  auto_revert 1.0.1 -> 1.0.0: ok, 2 quarantined messages handled again" in lines
    assert "  quarantined messages handled again by 1.0.0: 2" in lines
