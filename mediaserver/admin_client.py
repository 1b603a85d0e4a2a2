"""The CLI side of the admin API: find the address and token, call, print.

Standard library only (urllib), so `mediaserver status` starts fast.

Exit codes: 0 done; 1 the server answered and refused (a relup or revert it
would not do, a wrong token, a bad request); 2 the request could not be made
(no token, bad --admin URL, server unreachable; argparse usage errors are 2 too).
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from .admin_token import token_path
from .config import Config

TIMEOUT = 120.0
"""Seconds to wait for an answer: a relup's preflight over many sessions takes a while."""
UPGRADE_TIMEOUT = 330.0
"""An upgrade waits for a new worker to start (60 s at most) and take every connection (60 s)."""


class AdminUnreachable(Exception):
    """The request could not be made or got no HTTP answer."""


class AdminClient:
    def __init__(self, config: Config, url: str | None = None, token: str | None = None) -> None:
        self.config = config
        self.url = (url or _default_url(config)).rstrip("/")
        self._token = token or config.admin.token or None

    @property
    def token(self) -> str:
        if self._token is None:
            self._token = _read_token(self.config)
        return self._token

    def call(self, method: str, path: str, body: Any = None, timeout: float = TIMEOUT) -> tuple[int, Any]:
        """(HTTP status, decoded JSON answer) for any answer the server gives."""
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise AdminUnreachable(f"--admin {self.url!r} is not an http:// URL, e.g. http://127.0.0.1:8081")
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, _decode(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, _decode(exc.read())
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
            raise AdminUnreachable(f"cannot reach the admin API at {self.url}: {_reason(exc)}") from None


def _default_url(config: Config) -> str:
    host = config.admin.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{config.admin.port}"


def _read_token(config: Config) -> str:
    """The token the server wrote to data_dir/admin.token (any owner: we only send it)."""
    path = token_path(config)
    hint = "pass --token, set [admin] token, or pass the server's --config so its data_dir is found"
    try:
        with open(path, encoding="ascii") as file:
            token = file.read(4096).strip()
    except FileNotFoundError:
        raise AdminUnreachable(f"no admin token: {path} does not exist; {hint}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AdminUnreachable(f"no admin token: cannot read {path}: {_reason(exc)}; {hint}") from None
    if not token:
        raise AdminUnreachable(f"no admin token: {path} is empty; {hint}")
    return token


def _decode(payload: bytes) -> Any:
    try:
        return json.loads(payload or b"null")
    except ValueError:
        return {"error": "not a JSON answer (is this the admin API?): "
                         + payload[:200].decode(errors="replace").strip()}


def _reason(exc: BaseException) -> str:
    """`connection refused`, `timed out`, `name or service not known`..."""
    reason: Any = getattr(exc, "reason", None) if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(reason, OSError) and reason.strerror:
        if reason.errno == errno.ECONNREFUSED:
            return "connection refused"
        return reason.strerror[:1].lower() + reason.strerror[1:]
    return str(reason) or type(reason).__name__


def relup_path_argument(path: str | None) -> str | None:
    """A bare name ("1.1.0") goes as is; a path goes absolute but unresolved, so
    the server sees (and refuses) symlinks itself."""
    if path is None or (os.sep not in path and path not in (".", "..")):
        return path
    return os.path.abspath(path)


def print_report(report: dict[str, Any]) -> None:
    action = report.get("action", "relup")
    versions = f"{report.get('from_version')} -> {report.get('to_version')}"
    if not report.get("ok"):
        outcome = "REFUSED (nothing changed)"
    elif action == "dry_run":
        outcome = "done (preflight only, nothing changed)"
    else:
        outcome = "done"
    print(f"{action} {versions}: {outcome}")
    print(f"  sessions: {report.get('sessions')}, took {report.get('duration_ms')} ms, "
          f"switch held the loop {report.get('switch_ms')} ms")
    if report.get("error"):
        print(f"  error: {report['error']}")
    if report.get("rehandled"):
        print(f"  quarantined messages handled again by {report.get('to_version')}: {report['rehandled']}")
    for error in report.get("session_errors") or []:
        print(f"  session {error.get('stream')}: {error.get('stage')}: {error.get('reason')}")
    # The failures are listed above with their stage; the passes are listed here.
    for result in report.get("session_results") or []:
        if result.get("ok"):
            print(f"  session {result.get('stream')}: ok: {result.get('detail')}")


def print_upgrade(report: dict[str, Any]) -> None:
    action = report.get("action", "upgrade")
    if not report.get("ok"):
        outcome = "REFUSED (nothing changed)"
    elif action == "upgrade_dry_run":
        outcome = "done (checked only, nothing moved)"
    else:
        outcome = "done"
    if action == "upgrade_keeper":
        print(f"upgrade of the keeper: {outcome}")
    else:
        print(f"{action} worker {report.get('old_pid')} -> {report.get('new_pid')}: {outcome}")
        print(f"  new worker: logic {report.get('new_version')}, package {report.get('new_package_version')}; "
              f"{report.get('connections', 0)} connection(s), {report.get('sessions', 0)} stream(s); "
              f"moved {report.get('moved', 0)} in {report.get('switch_ms')} ms; took {report.get('duration_ms')} ms")
    if report.get("error"):
        print(f"  error: {report['error']}")
    for error in report.get("session_errors") or []:
        print(f"  {error.get('client')} {error.get('stream') or ''}: {error.get('reason')}")
    pauses = [s["pause_ms"] for s in report.get("streams") or [] if s.get("pause_ms") is not None]
    held = [s["held_ms"] for s in report.get("streams") or [] if s.get("held_ms") is not None]
    if pauses:
        print(f"  per-stream pause (last read by the old worker -> first by the new): "
              f"max {max(pauses):.1f} ms over {len(pauses)} stream(s)")
    if held:
        print(f"  reading off for the move (old stopped -> new started): max {max(held):.1f} ms")
    for kept in report.get("kept") or []:
        print(f"  kept on the old worker: {kept}")


def print_status(status: dict[str, Any]) -> None:
    print(f"version {status.get('version')}")
    print("generations:")
    for g in status.get("generations") or []:
        role = "current" if g.get("current") else "kept for revert"
        print(f"  g{g.get('number')} {g.get('version')} (state v{g.get('state_version')}): "
              f"{g.get('sessions')} sessions, {role}")
    sessions = status.get("sessions") or []
    print(f"sessions: {len(sessions)}")
    for s in sessions:
        extra = "".join(f", {k} {s[k]}" for k in ("bitrate_kbps", "fps") if k in s)
        # Supervision counters only when something happened: a healthy line stays short.
        extra += "".join(f", {k} {s[k]}" for k in ("crashes", "quarantined", "held", "rehandled") if s.get(k))
        worker = f"worker {s['pid']}, " if s.get("pid") else ""
        print(f"  {s.get('name')}: {worker}{s.get('version')} state v{s.get('state_version')}, up {s.get('uptime')} s, "
              f"{s.get('video_frames', '?')} video / {s.get('audio_frames', '?')} audio frames{extra}")
    history = status.get("history") or []
    if history:
        print("relup history:")
        for r in history[-10:]:
            outcome = "ok" if r.get("ok") else f"refused: {r.get('error')}"
            if r.get("rehandled"):
                outcome += f", {r['rehandled']} quarantined messages handled again"
            print(f"  {r.get('action')} {r.get('from_version')} -> {r.get('to_version')}: {outcome}")
    keeper = status.get("keeper")
    if isinstance(keeper, dict) and "workers" in keeper:
        print(f"keeper {keeper.get('pid')}:")
        for w in keeper.get("workers") or []:
            kept = f", keeps {', '.join(w['kept'])}" if w.get("kept") else ""
            print(f"  worker {w.get('pid')} ({w.get('role')}): {w.get('status')}, logic {w.get('version')}, "
                  f"package {w.get('package_version')}{kept}")
        upgrades = keeper.get("upgrades") or []
        if upgrades:
            print("upgrade history:")
            for u in upgrades[-10:]:
                outcome = "ok" if u.get("ok") else f"refused: {u.get('error')}"
                pauses = [s["pause_ms"] for s in u.get("streams") or [] if s.get("pause_ms") is not None]
                pause = f", max pause {max(pauses):.1f} ms" if pauses else ""
                if u.get("action") == "upgrade_keeper":
                    print(f"  keeper re-executed in place: {outcome}")
                else:
                    print(f"  {u.get('action')} worker {u.get('old_pid')} -> {u.get('new_pid')}: {outcome}{pause}")


def _refusal(code: int, body: Any) -> str:
    text = body.get("error", body) if isinstance(body, dict) else body
    return f"mediaserver: the admin API answered {code}: {text}"


def run(command: str, config: Config, args: Any) -> int:
    client = AdminClient(config, args.admin, args.token)
    try:
        if command == "status":
            code, body = client.call("GET", "/api/v1/status")
        elif command == "apply":
            code, body = client.call(
                "POST", "/api/v1/relup", {"path": relup_path_argument(args.path), "dry_run": args.dry_run}
            )
        elif command == "upgrade":
            code, body = client.call(
                "POST", "/api/v1/upgrade",
                {"dry_run": args.dry_run, "keeper": args.keeper, "drain_timeout": args.drain_timeout},
                timeout=UPGRADE_TIMEOUT,
            )
        else:
            code, body = client.call("POST", "/api/v1/revert", {})
    except AdminUnreachable as exc:
        print(f"mediaserver: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(body, indent=2))
    if command == "status":
        if code == 200 and isinstance(body, dict):
            if not args.json:
                print_status(body)
            return 0
        print(_refusal(code, body), file=sys.stderr)
        return 1
    if code in (200, 409) and isinstance(body, dict) and "ok" in body:
        if not args.json:
            (print_upgrade if command == "upgrade" else print_report)(body)
        return 0 if body["ok"] and code == 200 else 1
    print(_refusal(code, body), file=sys.stderr)
    return 1
