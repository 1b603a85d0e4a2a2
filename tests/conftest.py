"""Fixtures for the end-to-end tests: a real `mediaserver serve` process per test
(free ports, its own data dir, its stderr captured) and a cache of test clips
shared by every test and every xdist worker of one run."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from media import ClipSpec, Clip, http_get, make_clip, read_clip

REPO = Path(__file__).resolve().parents[1]

DEFAULT_CONFIG: dict[str, Any] = {
    "log_level": "info",
    "rtmp": {"host": "127.0.0.1", "handshake_timeout": 10.0, "idle_timeout": 30.0},
    "http": {"host": "127.0.0.1"},
    "admin": {"host": "127.0.0.1"},
    # WHIP peer connections gather on loopback only (aioice skips it by default).
    "webrtc": {"host_addresses": ["127.0.0.1"]},
    # 20 segments: a whole test clip (or two) stays in the live window, so the
    # final playlist holds every frame that was published.
    "hls": {"segment_target": 2.0, "playlist_size": 20},
    "publish": {"on_conflict": "refuse"},
}


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (bound to port 0, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v)} to TOML")


def to_toml(config: dict[str, Any]) -> str:
    lines = [f"{k} = {_toml_value(v)}" for k, v in config.items() if not isinstance(v, dict)]
    for k, v in config.items():
        if isinstance(v, dict):
            lines.append(f"\n[{k}]")
            lines += [f"{kk} = {_toml_value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def server_command(config_path: Path) -> list[str]:
    return [sys.executable, "-m", "mediaserver", "serve", "--config", str(config_path)]


def server_env(pythonpath: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """`pythonpath`: where the server's package is installed (default: this checkout)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(pythonpath or REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


class ServerProcess:
    """One running `mediaserver serve`."""

    def __init__(self, workdir: Path, config: dict[str, Any], pythonpath: str | os.PathLike[str] | None = None):
        self.pythonpath = pythonpath
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.data_dir = Path(config["data_dir"])
        self.rtmp_port = config["rtmp"]["port"]
        self.http_port = config["http"]["port"]
        self.admin_port = config["admin"]["port"]
        self.config_path = workdir / "config.toml"
        self.config_path.write_text(to_toml(config))
        self.log_path = workdir / "server.log"
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None

    # -- lifecycle

    def start(self, timeout: float = 20.0) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                server_command(self.config_path),
                cwd=self.workdir,
                env=server_env(self.pythonpath),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerDied(self)
            try:
                if http_get(self.http_url("/healthz"), timeout=1).status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"server not healthy within {timeout}s; log:\n{self.log_tail()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def worker_pids(self) -> list[int]:
        """The keeper's worker processes (children), oldest first."""
        try:
            text = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text()
        except FileNotFoundError:
            return []
        return [int(p) for p in text.split()]

    def worker_pid(self, timeout: float = 10.0) -> int:
        """The serving worker: the newest child once only one is left, or the only one."""
        deadline = time.monotonic() + timeout
        while True:
            pids = self.worker_pids()
            if len(pids) == 1:
                return pids[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"expected one worker, found {pids}; log:\n{self.log_tail()}")
            time.sleep(0.05)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait, return the exit code (kills and fails if it hangs)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(
                    f"server did not exit within {timeout}s of SIGTERM; log:\n{self.log_tail()}"
                )
        self.returncode = self.proc.returncode
        return self.returncode

    def kill(self) -> None:
        """SIGKILL the keeper; its workers die with it (PR_SET_PDEATHSIG): wait until they have."""
        if self.proc is not None and self.proc.poll() is None:
            workers = self.worker_pids()
            self.proc.kill()
            self.proc.wait(timeout=10)
            deadline = time.monotonic() + 10
            while any(Path(f"/proc/{pid}").exists() and "State:\tZ" not in _status(pid) for pid in workers):
                if time.monotonic() > deadline:
                    raise AssertionError(f"workers {workers} outlived their keeper")
                time.sleep(0.02)

    # -- addresses

    def rtmp_url(self, name: str, app: str = "live") -> str:
        return f"rtmp://127.0.0.1:{self.rtmp_port}/{app}/{name}"

    def http_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def hls_url(self, name: str) -> str:
        return self.http_url(f"/live/{name}/index.m3u8")

    def hls_dir(self, name: str) -> Path:
        return self.data_dir / "hls" / name

    # -- observation

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def log_lines(self, pattern: str) -> list[str]:
        rx = re.compile(pattern)
        return [line for line in self.log_text().splitlines() if rx.search(line)]

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> list[str]:
        """The log lines matching `pattern`; fails the test if none appear in time."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.log_lines(pattern)
            if found:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"no log line matching {pattern!r} within {timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def rss_kb(self) -> int:
        """RSS of the serving worker (the keeper is small and holds no stream)."""
        text = Path(f"/proc/{self.worker_pid()}/status").read_text()
        m = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
        assert m, text
        return int(m.group(1))

    def assert_no_tracebacks(self) -> None:
        text = self.log_text()
        assert "Traceback (most recent call last)" not in text, (
            f"the server logged a traceback:\n{self.log_tail(120)}"
        )


def _status(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return "State:\tZ"


class ServerDied(AssertionError):
    def __init__(self, server: ServerProcess):
        self.server = server
        super().__init__(
            f"server exited with {server.proc.returncode if server.proc else '?'} during start-up; "
            f"log:\n{server.log_tail()}"
        )


@pytest.fixture
def server_factory(tmp_path):
    """`server_factory(**overrides)` starts a server and waits for /healthz.

    Overrides are merged into the config by section, e.g.
    `server_factory(hls={"playlist_size": 3}, rtmp={"handshake_timeout": 1.0})`.
    Every server is SIGKILLed at teardown if the test did not stop it; its log
    tail is printed (pytest shows it for failed tests).
    """
    servers: list[ServerProcess] = []

    def factory(pythonpath: str | os.PathLike[str] | None = None, **overrides: Any) -> ServerProcess:
        last_error: Exception | None = None
        for attempt in range(3):
            rtmp, http, admin = free_ports(3)
            workdir = tmp_path / f"server{len(servers)}"
            config = merge(
                DEFAULT_CONFIG,
                {
                    "data_dir": str(workdir / "data"),
                    "rtmp": {"port": rtmp},
                    "http": {"port": http},
                    "admin": {"port": admin},
                },
            )
            config = merge(config, overrides)
            server = ServerProcess(workdir, config, pythonpath)
            servers.append(server)
            try:
                server.start()
                return server
            except ServerDied as exc:
                last_error = exc
                # A free port taken by someone else in between: try new ports.
                if "in use" not in server.log_text().lower():
                    raise
        assert last_error is not None
        raise last_error

    yield factory
    for server in servers:
        alive = server.alive()
        server.kill()
        print(f"--- server log {server.log_path} (killed at teardown: {alive}) ---")
        print(server.log_tail(150))


@pytest.fixture
def server(server_factory) -> ServerProcess:
    return server_factory()


class ClipCache:
    """Clips are encoded once per run and shared between xdist workers (atomic
    rename into a shared directory); parsed packets are memoised per worker."""

    def __init__(self, root: Path):
        self.root = root
        self._clips: dict[ClipSpec, Clip] = {}

    def path(self, spec: ClipSpec) -> Path:
        path = self.root / f"{spec.key()}.flv"
        if not path.exists():
            make_clip(spec, path)
        return path

    def get(self, spec: ClipSpec) -> Clip:
        clip = self._clips.get(spec)
        if clip is None:
            clip = self._clips[spec] = read_clip(self.path(spec), spec)
        return clip


@pytest.fixture(scope="session")
def clips(tmp_path_factory) -> ClipCache:
    base = tmp_path_factory.getbasetemp()
    # Under xdist every worker has basetemp .../popen-gwN; share their parent.
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "clips"
    root.mkdir(parents=True, exist_ok=True)
    return ClipCache(root)


@pytest.fixture
def ffmpeg_publisher(tmp_path):
    """`ffmpeg_publisher(clip_path, url, realtime=True, extra_output_args=())`
    starts `ffmpeg [-re] -i clip -c copy -f flv URL` (log in tmp_path); every
    process still running at teardown is killed."""
    from media import ffmpeg_publish

    procs: list[subprocess.Popen] = []

    def start(clip_path: Path, url: str, **kwargs: Any) -> subprocess.Popen:
        log_path = tmp_path / f"ffmpeg{len(procs)}.log"
        proc = ffmpeg_publish(clip_path, url, log_path=log_path, **kwargs)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
