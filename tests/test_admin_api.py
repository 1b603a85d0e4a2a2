"""The admin API of a real `mediaserver serve` process: the bearer token guards
every endpoint (unknown paths too), the generated token file is private and
found by the CLI, and a relup only ever loads from the relups directory.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO, server_env

ENDPOINTS = [
    ("GET", "/api/v1/status"),
    ("GET", "/api/v1/sessions"),
    ("GET", "/api/v1/relups"),
    ("POST", "/api/v1/relup"),
    ("POST", "/api/v1/revert"),
]
UNKNOWN = [
    ("GET", "/api/v1/nope"),
    ("GET", "/nope"),
    ("GET", "/api/v2/status"),
    ("DELETE", "/api/v1/status"),
    ("POST", "/api/v1/status"),
    ("GET", "/static/../admin.token"),
]


# -- helpers -------------------------------------------------------------------


def build_package(relups: Path, to: str = "1.0.1", from_version: str = "1.0.0") -> Path:
    """relups/<to>/: the installed logic with VERSION = to, identity migrations."""
    package = relups / to
    shutil.copytree(REPO / "mediaserver" / "logic", package / "logic",
                    ignore=shutil.ignore_patterns("__pycache__"))
    init = package / "logic" / "__init__.py"
    text = init.read_text()
    assert 'VERSION = "1.0.0"' in text
    init.write_text(text.replace('VERSION = "1.0.0"', f'VERSION = "{to}"'))
    (package / "migrations.py").write_text(
        "def up(state):\n    return dict(state)\n\n\ndef down(state):\n    return dict(state)\n"
    )
    (package / "relup.toml").write_text(textwrap.dedent(f"""\
        from = "{from_version}"
        to = "{to}"
        description = "admin API test package"

        [[instructions]]
        type = "load_logic"

        [[instructions]]
        type = "update_sessions"
        kind = "stream"
        """))
    return package


def token_of(server) -> str:
    return (server.data_dir / "admin.token").read_text().strip()


def api(server, method: str, path: str, body: Any = None, *, auth: str | None = "token",
        raw: bytes | None = None) -> tuple[int, Any, dict[str, str]]:
    headers = {"Content-Type": "application/json"}
    if auth == "token":
        headers["Authorization"] = f"Bearer {token_of(server)}"
    elif auth is not None:
        headers["Authorization"] = auth
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.admin_port}{path}", data=data, method=method, headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as exc:
        payload = exc.read()
        assert exc.headers.get("Content-Type", "").startswith("application/json"), (exc.code, payload)
        return exc.code, json.loads(payload), dict(exc.headers)


def raw_request(server, head: bytes) -> bytes:
    """One request written byte for byte (headers urllib would not send)."""
    with socket.create_connection(("127.0.0.1", server.admin_port), timeout=10) as sock:
        sock.sendall(head)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mediaserver", *args],
        capture_output=True, text=True, timeout=60, cwd=cwd, env=server_env(),
    )


def assert_unchanged(server, refusals: int | None = None) -> None:
    """Still the installed 1.0.0, one generation, nothing applied."""
    code, status, _ = api(server, "GET", "/api/v1/status")
    assert code == 200
    assert status["version"] == "1.0.0"
    assert [(g["version"], g["current"]) for g in status["generations"]] == [("1.0.0", True)]
    assert all(not r["ok"] or r["action"] == "dry_run" for r in status["history"]), status["history"]
    if refusals is not None:
        assert len(status["history"]) == refusals, status["history"]


@pytest.fixture
def relups(tmp_path: Path) -> Path:
    directory = tmp_path / "relups"
    directory.mkdir()
    return directory


@pytest.fixture
def admin_server(server_factory, relups):
    return server_factory(relup={"directory": str(relups)})


# -- the token -----------------------------------------------------------------


def test_every_endpoint_and_unknown_path_needs_the_token(admin_server, relups):
    server = admin_server
    build_package(relups)  # a valid relup is there: a request that got through would apply it
    token = token_of(server)
    wrong = [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Bearer wrong",
        f"Basic {token}",
        f"Bearer {token}x",
        f"Bearer {token[:-1]}",
        f"Token {token}",
        f"{token}",
    ]
    for method, path in ENDPOINTS + UNKNOWN:
        for auth in wrong:
            body = {"path": "1.0.1", "dry_run": False} if method == "POST" else None
            code, answer, headers = api(server, method, path, body, auth=auth)
            assert code == 401, (method, path, auth, code, answer)
            assert answer == {"error": "missing or wrong bearer token"}
            assert headers["WWW-Authenticate"].startswith("Bearer")
    # Bytes that are not UTF-8 in the header are a wrong token too, not a crash.
    answer = raw_request(
        server,
        b"POST /api/v1/relup HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe" + token.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    )
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
    assert_unchanged(server, refusals=0)
    # The scheme is case-insensitive (RFC 7235); the right token opens every endpoint.
    assert api(server, "GET", "/api/v1/status", auth=f"bearer {token}")[0] == 200
    assert api(server, "GET", "/api/v1/nope")[:2] == (404, {"error": "no such endpoint: GET /api/v1/nope"})
    code, answer, headers = api(server, "DELETE", "/api/v1/status")
    assert code == 405 and "DELETE" in answer["error"] and "GET" in headers["Allow"]
    assert "Traceback" not in server.log_text()
    assert server.log_lines(r"admin request refused: missing or wrong bearer token")


def test_generated_token_file_is_private_and_found_by_the_cli(admin_server):
    server = admin_server
    path = server.data_dir / "admin.token"
    info = path.lstat()
    assert stat.S_ISREG(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_uid == os.getuid()
    token = path.read_text().strip()
    assert len(token) >= 40  # token_urlsafe(32): 43 characters
    # Nothing else was left behind (the temporary file is renamed into place).
    assert sorted(p.name for p in server.data_dir.iterdir() if "token" in p.name) == ["admin.token"]
    # The CLI finds it through the config's data_dir, from any directory.
    done = cli("status", "--config", str(server.config_path), cwd=Path("/"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "version 1.0.0"
    # Restarted on the same data_dir, the server keeps its token.
    assert server.stop() == 0
    server.start()
    assert token_of(server) == token
    assert api(server, "GET", "/api/v1/status")[0] == 200


def test_a_token_file_others_can_read_is_replaced(server_factory, tmp_path):
    data_dir = tmp_path / "shared-data"
    data_dir.mkdir()
    leaked = data_dir / "admin.token"
    leaked.write_text("leaked-token\n")
    leaked.chmod(0o644)
    server = server_factory(data_dir=str(data_dir))
    fresh = token_of(server)
    assert fresh != "leaked-token"
    assert stat.S_IMODE(leaked.stat().st_mode) == 0o600
    assert api(server, "GET", "/api/v1/status", auth="Bearer leaked-token")[0] == 401
    assert api(server, "GET", "/api/v1/status", auth=f"Bearer {fresh}")[0] == 200


def test_a_symlinked_token_file_is_not_followed(server_factory, tmp_path):
    data_dir = tmp_path / "data-with-link"
    data_dir.mkdir()
    target = tmp_path / "elsewhere.txt"
    target.write_text("planted-token\n")
    target.chmod(0o600)
    (data_dir / "admin.token").symlink_to(target)
    server = server_factory(data_dir=str(data_dir))
    path = data_dir / "admin.token"
    assert not path.is_symlink() and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert token_of(server) != "planted-token"
    assert target.read_text() == "planted-token\n"  # untouched
    assert api(server, "GET", "/api/v1/status", auth="Bearer planted-token")[0] == 401


def test_a_configured_token_is_used_and_no_file_is_written(server_factory, relups):
    server = server_factory(admin={"token": "configured-secret-token"}, relup={"directory": str(relups)})
    assert not (server.data_dir / "admin.token").exists()
    assert api(server, "GET", "/api/v1/status", auth="Bearer configured-secret-token")[0] == 200
    assert api(server, "GET", "/api/v1/status", auth=None)[0] == 401
    done = cli("status", "--config", str(server.config_path))
    assert done.returncode == 0 and "version 1.0.0" in done.stdout, done.stderr


# -- with the token ------------------------------------------------------------


def test_status_sessions_and_history_with_the_token(admin_server):
    server = admin_server
    code, status, headers = api(server, "GET", "/api/v1/status")
    assert code == 200 and headers["Content-Type"].startswith("application/json")
    assert status["version"] == "1.0.0"
    assert len(status["generations"]) == 1
    generation = status["generations"][0]
    assert generation["version"] == "1.0.0" and generation["current"] and generation["sessions"] == 0
    assert status["sessions"] == [] and status["history"] == []
    assert api(server, "GET", "/api/v1/sessions")[:2] == (200, [])
    assert api(server, "GET", "/api/v1/relups")[:2] == (200, [])
    # Nothing to revert yet: refused with the report.
    code, report, _ = api(server, "POST", "/api/v1/revert", {})
    assert code == 409 and report["ok"] is False and "nothing to revert" in report["error"]
    code, history, _ = api(server, "GET", "/api/v1/relups")
    assert code == 200 and [(r["action"], r["ok"]) for r in history] == [("revert", False)]


def test_dry_run_then_apply_and_revert_through_the_api(admin_server, relups):
    server = admin_server
    build_package(relups)
    code, report, _ = api(server, "POST", "/api/v1/relup", {"path": "1.0.1", "dry_run": True})
    assert code == 200 and report["ok"] and report["action"] == "dry_run", report
    # Every report carries the live session count and one result per session (none live here).
    assert report["sessions"] == 0 and report["session_results"] == [] and report["rehandled"] == 0, report
    assert_unchanged(server)
    code, report, _ = api(server, "POST", "/api/v1/relup", {"path": str(relups / "1.0.1"), "dry_run": False})
    assert code == 200 and report["ok"] and (report["from_version"], report["to_version"]) == ("1.0.0", "1.0.1")
    status = api(server, "GET", "/api/v1/status")[1]
    assert status["version"] == "1.0.1"
    assert [(g["version"], g["current"]) for g in status["generations"]] == [("1.0.0", False), ("1.0.1", True)]
    code, report, _ = api(server, "POST", "/api/v1/revert", {})
    assert code == 200 and report["ok"] and report["to_version"] == "1.0.0", report
    assert report["rehandled"] == 0 and report["sessions"] == 0, report
    assert api(server, "GET", "/api/v1/status")[1]["version"] == "1.0.0"


# -- relups only from the relups directory -------------------------------------


def _outside_cases(relups: Path, tmp_path: Path) -> list[tuple[str, str]]:
    """(requested path, expected words in the error); each names a valid 1.0.1 package."""
    outside = tmp_path / "outside"
    outside.mkdir()
    build_package(outside)

    # A symlink in the relups directory pointing to a package outside it.
    (relups / "linked").symlink_to(outside / "1.0.1", target_is_directory=True)
    # A path through a symlink to the relups directory, from outside it.
    build_package(relups, "1.0.5")
    (tmp_path / "alias").symlink_to(relups, target_is_directory=True)

    # A package inside whose file is a symlink to a copy outside.
    file_link = build_package(relups, "1.0.2")
    stream_py = file_link / "logic" / "stream.py"
    copy = tmp_path / "stream_copy.py"
    shutil.copy(stream_py, copy)
    stream_py.unlink()
    stream_py.symlink_to(copy)

    # A package inside whose logic/ directory is a symlink to logic outside.
    dir_link = relups / "1.0.3"
    dir_link.mkdir()
    outside_103 = build_package(outside, "1.0.3")
    (dir_link / "logic").symlink_to(outside_103 / "logic", target_is_directory=True)
    for name in ("relup.toml", "migrations.py"):
        shutil.copy(outside_103 / name, dir_link / name)

    # A package inside whose migrations.py is a symlink.
    migrations_link = build_package(relups, "1.0.4")
    (migrations_link / "migrations.py").unlink()
    (migrations_link / "migrations.py").symlink_to(outside / "1.0.1" / "migrations.py")

    return [
        (str(outside / "1.0.1"), "outside the relups directory"),
        ("/tmp", "outside the relups directory"),
        ("/", "outside the relups directory"),
        ("../outside/1.0.1", "outside the relups directory"),
        ("1.0.1/../../outside/1.0.1", "outside the relups directory"),
        (str(relups / ".." / "outside" / "1.0.1"), "outside the relups directory"),
        (".", "outside the relups directory"),
        ("linked", "is a symlink"),
        (str(relups / "linked"), "is a symlink"),
        (str(tmp_path / "alias" / "1.0.5"), "outside the relups directory"),
        ("1.0.2", "is a symlink; relup files must be plain files"),
        ("1.0.3", "is a symlink; relup files must be plain files"),
        ("1.0.4", "is a symlink; relup files must be plain files"),
        ("9.9.9", "not found"),
    ]


@pytest.mark.parametrize("dry_run", [False, True])
def test_relup_from_outside_the_relups_directory_is_refused(admin_server, relups, tmp_path, dry_run):
    server = admin_server
    cases = _outside_cases(relups, tmp_path)
    for requested, expected in cases:
        code, report, _ = api(server, "POST", "/api/v1/relup", {"path": requested, "dry_run": dry_run})
        assert code == 409, (requested, code, report)
        assert report["ok"] is False and expected in report["error"], (requested, report["error"])
        assert report["action"] == ("dry_run" if dry_run else "apply")
    assert_unchanged(server, refusals=len(cases))
    assert "Traceback" not in server.log_text()


def test_load_logic_path_in_relup_toml_cannot_leave_the_relups_directory(admin_server, relups, tmp_path):
    server = admin_server
    outside = tmp_path / "outside"
    outside.mkdir()
    build_package(outside)
    package = build_package(relups)
    shutil.rmtree(package / "logic")
    spec = (package / "relup.toml").read_text()
    (package / "relup.toml").write_text(
        spec.replace('type = "load_logic"', f'type = "load_logic"\npath = "{outside / "1.0.1" / "logic"}"')
    )
    code, report, _ = api(server, "POST", "/api/v1/relup", {"path": "1.0.1", "dry_run": True})
    assert code == 409 and ".path" in report["error"] and "matching regex" in report["error"], report


# -- malformed requests --------------------------------------------------------


def test_malformed_relup_requests_are_400_and_name_the_problem(admin_server, relups):
    server = admin_server
    build_package(relups)
    cases: list[tuple[bytes, str]] = [
        (b'{"path": "1.0.1", "surprise": 1}', "unknown field `surprise`"),
        (b'{"path": "1.0.1", "dry_run": "yes"}', "$.dry_run"),
        (b'{"path": 101}', "$.path"),
        (b'["1.0.1"]', "Expected `object`"),
        (b'{"path": "1.0.1"', "truncated"),
        (b"{nope}", "malformed"),
        (b"", "request body must be a JSON object"),
        (b"   ", "request body must be a JSON object"),
        (b'{"path": "1.0.1\\u0000"}', "NUL"),
    ]
    for raw, expected in cases:
        code, answer, _ = api(server, "POST", "/api/v1/relup", raw=raw)
        assert code == 400, (raw, code, answer)
        assert expected in answer["error"], (raw, answer)
    code, answer, _ = api(server, "POST", "/api/v1/revert", raw=b'{"path": "1.0.1"}')
    assert code == 400 and "unknown field `path`" in answer["error"]
    # The body is capped: a big one is refused before it is decoded.
    code, answer, _ = api(server, "POST", "/api/v1/relup", raw=b'{"path": "' + b"x" * (70 * 1024) + b'"}')
    assert code == 413 and "larger than" in answer["error"]
    assert_unchanged(server, refusals=0)
    assert "Traceback" not in server.log_text()


# -- the token module in-process -----------------------------------------------


def test_load_or_create_token_rules(tmp_path):
    from mediaserver.admin_token import load_or_create_token, read_token_file, token_path
    from mediaserver.config import AdminConfig, Config

    config = Config(data_dir=str(tmp_path / "d"))
    path = token_path(config)
    assert path == tmp_path / "d" / "admin.token"
    first = load_or_create_token(config)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and read_token_file(path) == first
    assert load_or_create_token(config) == first  # reused
    path.chmod(0o640)
    second = load_or_create_token(config)  # readable by the group: replaced
    assert second != first and stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text("")
    third = load_or_create_token(config)  # empty: replaced
    assert third not in ("", second)
    configured = Config(data_dir=str(tmp_path / "e"), admin=AdminConfig(token="from-config"))
    assert load_or_create_token(configured) == "from-config"
    assert not (tmp_path / "e").exists()
