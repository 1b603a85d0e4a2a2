"""Helpers for rtmp_ingest.py: processes, /proc figures, publishers, segment keeping.

Nothing here is specific to one server: a run gives a playlist path per stream,
and `SegmentKeeper` hard-links every segment a playlist lists (before the
server's window slides past it and deletes it), so that afterwards the video
frames written can be counted against the frames each publisher sent.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl


def _die_with_parent() -> None:  # runs in the child between fork and exec
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def spawn(argv: list[str], **kwargs) -> subprocess.Popen:
    """Popen that the kernel kills if this benchmark dies (even by SIGKILL)."""
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.Popen(argv, preexec_fn=_die_with_parent, **kwargs)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        except ProcessLookupError:
            pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def serve_mediaserver(command: list[str], work: Path, config: str, http_port: int,
                      timeout: float = 30.0) -> tuple[subprocess.Popen | None, str]:
    """Run `command serve --config` with `config` in `work` until its /healthz answers.

    Returns the server, or None (it is stopped) and the tail of its log. Its
    output is appended to work/log. cwd is the run's own directory, so
    `python -m mediaserver` imports the build on PYTHONPATH or installed in
    the command's venv, not ./mediaserver of wherever the script was started.
    """
    import urllib.request

    (work / "config.toml").write_text(config)
    log = work / "log"
    with open(log, "ab") as out:
        server = spawn([*command, "serve", "--config", str(work / "config.toml")], stdout=out,
                       stderr=subprocess.STDOUT, cwd=work)
    deadline = time.monotonic() + timeout
    while server.poll() is None and time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=1).read()
            return server, ""
        except OSError:
            time.sleep(0.1)
    stop(server)
    return None, log.read_text(errors="replace")[-2000:]


# ------------------------------------------------------------------ /proc


def tree(pid: int) -> list[int]:
    """pid and its live descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            kids = []
        todo.extend(int(k) for k in kids)
    return out


def cpu_ticks(pids: list[int]) -> int:
    """utime + stime of each process itself (reaped children's cutime/cstime excluded)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError):
            pass
    return total


def rss_kb(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies over all cores, from /proc/stat (idle + iowait are not busy)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:8]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


# ------------------------------------------------------------------ publishers


class Publishers:
    """N `ffmpeg -re -stream_loop -1 -i clip -c copy -f flv URL`, each writing
    `-progress` to a file: `frame=` is the video frames it has sent, `out_time_us`
    how much media time. They are stopped with `q` on stdin, which ffmpeg reads
    between packets: a signal would also abort a write blocked on a full socket,
    cutting the frame being sent (that frame would then count as lost)."""

    def __init__(self, clip: Path, urls: list[str], workdir: Path) -> None:
        self.progress_files = [workdir / f"pub{i}.progress" for i in range(len(urls))]
        self.logs = [workdir / f"pub{i}.log" for i in range(len(urls))]
        self.procs: list[subprocess.Popen] = []
        self.signalled = 0
        for url, progress, log in zip(urls, self.progress_files, self.logs):
            self.procs.append(spawn(
                ["ffmpeg", "-hide_banner", "-v", "error", "-re", "-stream_loop", "-1",
                 "-i", str(clip), "-c", "copy", "-progress", str(progress), "-stats_period", "0.5",
                 "-f", "flv", url],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=open(log, "wb"),
            ))

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.poll() is None]

    def progress(self, i: int) -> dict[str, str]:
        """The last complete progress block of publisher i."""
        try:
            text = self.progress_files[i].read_text(errors="replace")
        except OSError:
            return {}
        block: dict[str, str] = {}
        last: dict[str, str] = {}
        for line in text.splitlines():
            key, _, value = line.partition("=")
            block[key] = value
            if key == "progress":
                last, block = block, {}
        return last

    def media_seconds(self) -> list[float]:
        out = []
        for i in range(len(self.procs)):
            try:
                out.append(int(self.progress(i).get("out_time_us", "0")) / 1e6)
            except ValueError:
                out.append(0.0)
        return out

    def all_sending(self) -> bool:
        return all(int(self.progress(i).get("frame", "0") or 0) > 0 for i in range(len(self.procs)))

    def died(self) -> int:
        return sum(1 for p in self.procs if p.poll() is not None)

    def stop(self, timeout: float = 15.0) -> None:
        """`q` (ffmpeg finishes the packet in hand, closes the RTMP session, writes
        progress=end); SIGINT for those still running after `timeout`, then kill."""
        for p in self.procs:
            try:
                p.stdin.write(b"q")
                p.stdin.close()
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
        for p in self.procs:
            if p.poll() is None:
                self.signalled += 1
                p.send_signal(signal.SIGINT)
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    def final_frames(self) -> list[int | None]:
        """Video frames each publisher sent, None if it did not end cleanly."""
        out: list[int | None] = []
        for i in range(len(self.procs)):
            block = self.progress(i)
            out.append(int(block["frame"]) if block.get("progress") == "end" and "frame" in block else None)
        return out

    def errors(self) -> list[str]:
        lines = []
        for log in self.logs:
            try:
                lines += [l for l in log.read_text(errors="replace").splitlines() if l.strip()]
            except OSError:
                pass
        return lines


# ------------------------------------------------------------------ segments


def playlist_uris(text: str) -> list[str]:
    return [l.strip() for l in text.splitlines() if l.strip() and not l.startswith("#")]


class SegmentKeeper(threading.Thread):
    """Every `interval` s, reads each stream's playlist and hard-links each newly
    listed segment into `keep_dir/<i>/`, so it can be counted after the server
    has deleted it. Only segments that a playlist listed are kept: a segment
    the server wrote but never published does not count as written."""

    def __init__(self, playlists: list[Path], keep_dir: Path, interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.playlists = playlists
        self.keep_dir = keep_dir
        self.interval = interval
        self.kept: list[list[str]] = [[] for _ in playlists]
        self.missed: list[list[str]] = [[] for _ in playlists]
        self.ended = [False] * len(playlists)
        self._seen: list[set[str]] = [set() for _ in playlists]
        self._halt = threading.Event()
        self._lock = threading.Lock()
        for i in range(len(playlists)):
            (keep_dir / str(i)).mkdir(parents=True, exist_ok=True)

    def scan(self) -> None:
        with self._lock:
            for i, playlist in enumerate(self.playlists):
                try:
                    text = playlist.read_text(errors="replace")
                except OSError:
                    continue
                self.ended[i] = "#EXT-X-ENDLIST" in text
                for uri in playlist_uris(text):
                    if uri in self._seen[i]:
                        continue
                    self._seen[i].add(uri)
                    target = self.keep_dir / str(i) / f"{len(self.kept[i]) + len(self.missed[i]):05d}.ts"
                    try:
                        os.link(playlist.parent / uri, target)
                        self.kept[i].append(uri)
                    except OSError:
                        self.missed[i].append(uri)

    def counts(self) -> list[int]:
        with self._lock:
            return [len(k) + len(m) for k, m in zip(self.kept, self.missed)]

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.scan()

    def stop(self) -> None:
        self._halt.set()
        self.join(10)
        self.scan()

    def wait_settled(self, timeout: float, quiet: float = 2.0, want_endlist: bool = False) -> None:
        """After the publishers stopped: scan until the playlists stop changing
        for `quiet` s (or all carry ENDLIST when `want_endlist`), at most `timeout` s."""
        deadline = time.monotonic() + timeout
        last, since = None, time.monotonic()
        while time.monotonic() < deadline:
            self.scan()
            now = self.counts()
            if want_endlist and all(self.ended):
                return
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet and not want_endlist:
                return
            time.sleep(0.25)


def _count_stream(directory: str) -> int:
    import av

    total = 0
    for seg in sorted(Path(directory).glob("*.ts")):
        try:
            with av.open(str(seg)) as container:
                if container.streams.video:
                    total += sum(1 for p in container.demux(container.streams.video[0]) if p.size)
        except av.error.FFmpegError:
            pass
    return total


def count_video_frames(keep_dir: Path, n: int) -> list[int]:
    """Video packets (= frames) across the kept segments of each stream, demuxed
    with PyAV, one process per core (the server is stopped by then)."""
    from concurrent.futures import ProcessPoolExecutor

    dirs = [str(keep_dir / str(i)) for i in range(n)]
    if n == 1:
        return [_count_stream(dirs[0])]
    with ProcessPoolExecutor(max_workers=min(os.cpu_count() or 1, n)) as pool:
        return list(pool.map(_count_stream, dirs))
