"""Installs of the server for upgrade tests, the CLI calls that upgrade it, and
the viewer checks every upgrade test makes.

An install is a directory holding a copy of the `mediaserver` package; the
server runs with PYTHONPATH at `root/current`, a symlink the test points at
one install or another, as a package manager replaces files in site-packages.
A new worker imports whatever `current` names when it starts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from conftest import REPO, server_env
from media import HlsPoller, read_hls


class Installs:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.current = root / "current"

    def make(self, name: str, edit: Callable[[Path], None] | None = None) -> Path:
        """A copy of this checkout's package under root/name; `edit(package_dir)` changes it."""
        target = self.root / name
        shutil.copytree(
            REPO / "mediaserver", target / "mediaserver",
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
        if edit is not None:
            edit(target / "mediaserver")
        return target

    def use(self, name: str) -> None:
        """Point `current` at install `name` (atomically, like a package upgrade)."""
        tmp = self.root / "current.tmp"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(self.root / name, target_is_directory=True)
        os.replace(tmp, self.current)


def replace_in(path: Path, old: str, new: str, count: int = 1) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, count))


def set_package_version(package: Path, version: str) -> None:
    replace_in(package / "__init__.py", '__version__ = "1.0.0"', f'__version__ = "{version}"')


def cli(server, *args: str, timeout: float = 120) -> tuple[int, Any, str]:
    """Run `mediaserver ARGS --config <server's> --json`: (exit code, JSON answer or None, stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "mediaserver", *args, "--config", str(server.config_path), "--json"],
        capture_output=True, text=True, timeout=timeout, env=server_env(),
    )
    try:
        body = json.loads(proc.stdout) if proc.stdout.strip() else None
    except json.JSONDecodeError:
        body = None
    return proc.returncode, body, proc.stderr


def upgrade(server, *extra: str, timeout: float = 120) -> tuple[int, dict[str, Any]]:
    code, body, err = cli(server, "upgrade", *extra, timeout=timeout)
    assert isinstance(body, dict), f"no JSON answer from upgrade (exit {code}): {err}\n{server.log_tail()}"
    return code, body


def client_ports(server_port: int) -> set[int]:
    """Local ports of the established TCP connections to `server_port` on 127.0.0.1, seen with `ss`."""
    out = subprocess.run(
        ["ss", "-Htn", "state", "established", f"( dport = :{server_port} )"],
        capture_output=True, text=True, check=True,
    ).stdout
    ports = set()
    for line in out.splitlines():
        fields = line.split()
        # Recv-Q Send-Q Local:Port Peer:Port
        local = fields[2] if len(fields) >= 4 else ""
        m = re.search(r":(\d+)$", local)
        if m:
            ports.add(int(m.group(1)))
    return ports


def server_status(server) -> dict[str, Any]:
    """`mediaserver status --json`, which must answer."""
    code, body, err = cli(server, "status")
    assert code == 0 and isinstance(body, dict), f"status exit {code}: {err}\n{server.log_tail()}"
    return body


def viewer(server, name: str) -> HlsPoller:
    """A player polling the stream's playlist (started)."""
    poller = HlsPoller(server.hls_url(name), interval=0.1, max_segments=server.config["hls"]["playlist_size"])
    poller.start()
    return poller


def finish_clean(server, name: str, poller: HlsPoller):
    """The stream ended, every playlist the viewer saw was valid, no discontinuity: the HLS output."""
    ended = poller.wait_endlist(15)
    poller.stop()
    assert ended, f"{name}: no #EXT-X-ENDLIST; last playlist:\n{poller.last_text}\n{server.log_tail()}"
    poller.assert_clean()
    out = read_hls(server.hls_url(name))
    assert "#EXT-X-DISCONTINUITY" not in out.text, f"{name}: discontinuity in\n{out.text}"
    return out
