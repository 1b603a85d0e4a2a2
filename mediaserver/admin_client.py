"""The CLI side of the admin API: find the address and token, call, print.

Standard library only (urllib), so `mediaserver status` starts fast.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any

from .admin_token import read_token_file, token_path
from .config import Config


class AdminUnreachable(Exception):
    pass


class AdminClient:
    def __init__(self, config: Config, url: str | None = None, token: str | None = None) -> None:
        host = config.admin.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        self.url = (url or f"http://{host}:{config.admin.port}").rstrip("/")
        self.token = token or config.admin.token or read_token_file(token_path(config)) or ""

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        if not self.token:
            raise AdminUnreachable(
                "no admin token: pass --token, set [admin] token, or run where the server's "
                "data_dir/admin.token is readable"
            )
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            payload = exc.read()
            try:
                return exc.code, json.loads(payload)
            except ValueError:
                return exc.code, {"error": payload.decode(errors="replace")}
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AdminUnreachable(f"cannot reach the admin API at {self.url}: {reason}") from None


def relup_path_argument(path: str | None) -> str | None:
    """A bare name ("1.1.0") goes as is; a path goes absolute but unresolved, so
    the server sees (and refuses) symlinks itself."""
    if path is None or ("/" not in path and path not in (".", "..")):
        return path
    return os.path.abspath(path)


def print_report(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
        return
    action = report.get("action", "relup")
    outcome = "done" if report.get("ok") else "REFUSED"
    print(f"{action} {report.get('from_version')} -> {report.get('to_version')}: {outcome}")
    print(f"  sessions: {report.get('sessions')}, took {report.get('duration_ms')} ms, "
          f"switch held the loop {report.get('switch_ms')} ms")
    if report.get("error"):
        print(f"  error: {report['error']}")
    for error in report.get("session_errors") or []:
        print(f"  session {error['stream']}: {error['stage']}: {error['reason']}")


def print_status(status: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(status, indent=2))
        return
    print(f"version {status['version']}")
    print("generations:")
    for g in status["generations"]:
        role = "current" if g["current"] else "kept for revert"
        print(f"  g{g['number']} {g['version']} (state v{g['state_version']}): {g['sessions']} sessions, {role}")
    print(f"sessions: {len(status['sessions'])}")
    for s in status["sessions"]:
        extra = "".join(
            f", {k} {s[k]}" for k in ("bitrate_kbps", "fps") if k in s
        )
        print(f"  {s['name']}: {s['version']} state v{s.get('state_version')}, up {s['uptime']} s, "
              f"{s.get('video_frames', '?')} video / {s.get('audio_frames', '?')} audio frames{extra}")
    history = status.get("history") or []
    if history:
        print("relup history:")
        for r in history[-10:]:
            print(f"  {r['action']} {r['from_version']} -> {r['to_version']}: "
                  f"{'ok' if r['ok'] else 'refused: ' + r['error']}")


def run(command: str, config: Config, args: Any) -> int:
    client = AdminClient(config, args.admin, args.token)
    try:
        if command == "status":
            code, body = client.call("GET", "/api/v1/status")
            if code != 200:
                print(f"mediaserver: admin API answered {code}: {body.get('error', body)}", file=sys.stderr)
                return 1
            print_status(body, args.json)
            return 0
        if command == "apply":
            code, body = client.call(
                "POST", "/api/v1/relup", {"path": relup_path_argument(args.path), "dry_run": args.dry_run}
            )
        else:
            code, body = client.call("POST", "/api/v1/revert", {})
    except AdminUnreachable as exc:
        print(f"mediaserver: {exc}", file=sys.stderr)
        return 2
    if code in (200, 409) and isinstance(body, dict) and "ok" in body:
        print_report(body, args.json)
        return 0 if body["ok"] else 1
    print(f"mediaserver: admin API answered {code}: {body.get('error', body) if isinstance(body, dict) else body}",
          file=sys.stderr)
    return 2 if code in (400, 401) else 1
