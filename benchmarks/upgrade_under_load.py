"""`mediaserver upgrade` under load: N live RTMP streams, K upgrades in a row, and a restart beside it.

Phase 1 (upgrades): `mediaserver serve` (keeper + worker) with rtmp_ingest.py's
config and clip (1080p30, ~5 Mbit/s H.264 + AAC, FLV), N publishers
`ffmpeg -re -stream_loop -1 -i clip -c copy -f flv rtmp://.../live/uI`, then K
upgrades (`POST /api/v1/upgrade {"dry_run": false}` on the admin port, token
from data_dir/admin.token) one after another, `--spacing` s apart. Measured:

- per-stream pause, from each upgrade's report (`pause_ms`: first read by the
  new worker - last read by the old one; `held_ms`: the old worker stopped
  reading -> the new one resumed), and from outside: a netlink sock_diag dump
  (what `ss` reads) of the server side of every publisher's socket every
  `--sample-ms` during each upgrade gives its receive queue (bytes not yet
  read by any process) and tcpi_bytes_received - Recv-Q (bytes the server
  has read). "read gap": longest time the server read nothing from a socket;
  "unread": longest time bytes sat in a socket with nobody reading them. Both
  +-1 sample interval; the same figures over a window without an upgrade are
  printed as the baseline;
- the whole switch (`switch_ms`: the move of every connection) and
  `duration_ms` (including the new worker's start);
- frames lost: each publisher's video frames (`-progress` frame=, final
  block) against the video frames in the segments its playlist listed (every
  listed segment hard-linked aside before the server deletes it, demuxed with
  PyAV after the end); also the largest DTS step and steps backwards in the
  HLS output, #EXT-X-DISCONTINUITY seen, and the server's own counters;
- connections dropped: publishers that exited before being told to, or not 0,
  or without a final progress block; the server-side sockets (client port +
  socket inode, from sock_diag; and `ss`) before the first upgrade and after
  the last; sessions listed by the admin API after each upgrade;
- RSS (VmRSS) and open fds (/proc/PID/fd) of the serving worker and of the
  keeper just before each upgrade and `--spacing` s after it (the "before" of
  the next one), against their level before the first upgrade.

Phase 2 (restart, what peers offer): a fresh server and N publishers of the
same clip; SIGTERM to the keeper, `mediaserver serve` again on the same ports
and data directory. ffmpeg does not reconnect: each publisher that exits is
started again (a supervisor doing what a reconnecting encoder would, as fast as
possible: as soon as the new server's RTMP port accepts). Measured: publishers
disconnected, seconds the server was down, per stream the time from its
publisher's failed write (ffmpeg's exit) to its new publish being accepted
(admin API sessions, polled every 50 ms), frames the old publisher sent that
never reached a segment, and the seconds of media missing in the HLS output.

    .venv/bin/python benchmarks/upgrade_under_load.py                 # 100 streams, 10 upgrades, ~5 min
    .venv/bin/python benchmarks/upgrade_under_load.py --quick         # 10 streams, 2 upgrades, ~1.5 min
    .venv/bin/python benchmarks/upgrade_under_load.py --streams 50 --upgrades 5 [--skip-restart]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _ingest_lib import TICK, SegmentKeeper, free_port, machine_ticks, serve_mediaserver, spawn, stop, tree  # noqa: E402
from rtmp_ingest import make_clip, mediaserver_config, server_metrics  # noqa: E402

CPUS = os.cpu_count() or 1
FPS = 30  # the clip's frame rate (rtmp_ingest.make_clip)

# ------------------------------------------------------------------ /proc


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def ticks(pid: int, children: bool = False) -> int:
    """utime + stime of `pid` (+ cutime + cstime: its reaped children, e.g. workers the keeper reaped)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(x) for x in fields[11:15 if children else 13])
    except (OSError, IndexError):
        return 0


def server_ticks(keeper: int) -> int:
    """The keeper with every worker it ran: live ones, and reaped ones through cutime/cstime."""
    return ticks(keeper, children=True) + sum(ticks(pid) for pid in tree(keeper)[1:])


class CpuWindow:
    """Where the machine's CPU went between start() and stop(), in % of one core."""

    def start(self, keeper: int, publishers: list[int]) -> None:
        self.keeper, self.publishers = keeper, publishers
        self.t0 = time.monotonic()
        self.m0 = machine_ticks()
        self.s0, self.p0, self.o0 = server_ticks(keeper), sum(ticks(p) for p in publishers), ticks(os.getpid())

    def stop(self) -> dict:
        wall = time.monotonic() - self.t0
        (b0, t0), (b1, t1) = self.m0, machine_ticks()
        server = 100 * (server_ticks(self.keeper) - self.s0) / TICK / wall
        pubs = 100 * (sum(ticks(p) for p in self.publishers) - self.p0) / TICK / wall
        own = 100 * (ticks(os.getpid()) - self.o0) / TICK / wall
        machine = 100 * (b1 - b0) / max(t1 - t0, 1)
        return {"machine": machine, "server": server, "publishers": pubs, "script": own,
                "other": max(machine * CPUS - server - pubs - own, 0.0), "wall": wall}


def describe_cpu(c: dict) -> str:
    return (f"machine {c['machine']:.0f} % of {CPUS} cores busy = server (keeper + workers) {c['server']:.0f}"
            f" + publishers {c['publishers']:.0f} + this script {c['script']:.0f} + anything else {c['other']:.0f}"
            f" (% of one core, over {c['wall']:.0f} s)")


def ss_ports(port: int) -> set[int]:
    """Client ports of the established connections to 127.0.0.1:`port`, as `ss` lists them."""
    out = subprocess.run(["ss", "-Htn", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, check=False).stdout
    ports = set()
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 4 and (m := re.search(r":(\d+)$", fields[3])):
            ports.add(int(m.group(1)))
    return ports


# ------------------------------------------------------------------ sock_diag


class SockDiag:
    """One netlink sock_diag dump (the interface `ss` uses) of the established IPv4
    TCP sockets whose local port is `port` (the server's side of each publisher's
    connection): {client port: (Recv-Q, bytes read by the application, inode)}.
    Bytes read = tcpi_bytes_received - Recv-Q; it advances only when a process
    reads the socket, whichever process holds it."""

    NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY, INET_DIAG_INFO = 4, 20, 2
    NLMSG_ERROR, NLMSG_DONE = 2, 3
    TCPI_BYTES_RECEIVED = 128  # offset in struct tcp_info (since Linux 4.1)

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, self.NETLINK_SOCK_DIAG)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        self.sock.bind((0, 0))
        # Bytecode filter: sport >= port, then sport <= port (op: code, yes, no; the port in the next op's no).
        bc = struct.pack("=BBHBBH", 2, 8, 20, 0, 0, port) + struct.pack("=BBHBBH", 3, 8, 12, 0, 0, port)
        attr = struct.pack("=HH", 4 + len(bc), 1) + bc  # INET_DIAG_REQ_BYTECODE
        req = struct.pack("=BBBBI", socket.AF_INET, socket.IPPROTO_TCP, 1 << (self.INET_DIAG_INFO - 1), 0,
                          1 << 1) + bytes(48)  # states: TCP_ESTABLISHED; id: any
        self.request = struct.pack("=IHHII", 16 + len(req) + len(attr), self.SOCK_DIAG_BY_FAMILY,
                                   0x1 | 0x300, 1, 0) + req + attr  # NLM_F_REQUEST | NLM_F_DUMP

    def sample(self) -> dict[int, tuple[int, int, int]]:
        self.sock.send(self.request)
        out: dict[int, tuple[int, int, int]] = {}
        while True:
            data = self.sock.recv(1 << 20)
            off = 0
            while off + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, off)
                if kind == self.NLMSG_DONE:
                    return out
                if kind == self.NLMSG_ERROR:
                    raise OSError("sock_diag dump refused")
                (dport,) = struct.unpack_from(">H", data, off + 16 + 6)
                rq, _wq, _uid, inode = struct.unpack_from("=IIII", data, off + 16 + 56)
                received = None
                attr, end = off + 16 + 72, off + length
                while attr + 4 <= end:
                    alen, atype = struct.unpack_from("=HH", data, attr)
                    if alen < 4:
                        break
                    if atype == self.INET_DIAG_INFO and alen >= 4 + self.TCPI_BYTES_RECEIVED + 8:
                        (received,) = struct.unpack_from("=Q", data, attr + 4 + self.TCPI_BYTES_RECEIVED)
                    attr += (alen + 3) & ~3
                out[dport] = (rq, (received - rq) if received is not None else -1, inode)
                off += (length + 3) & ~3

    def close(self) -> None:
        self.sock.close()


class SockLookup(SockDiag):
    """Exact look-ups of known sockets (local `port`, the given client ports), all requests in
    one send, same answer as SockDiag.sample(). A dump walks the kernel's whole established
    hash (~1.7 ms of CPU here, whatever it finds); a look-up costs ~20 us per socket, so a
    sample of the streams can be watched every few ms for a few % of a core."""

    def __init__(self, port: int, client_ports: list[int]) -> None:
        super().__init__(port)
        self.ports = list(client_ports)
        lo = socket.inet_aton("127.0.0.1")
        parts = []
        for seq, client in enumerate(self.ports, 1):
            sockid = (struct.pack(">HH", port, client) + lo + bytes(12) + lo + bytes(12)
                      + struct.pack("=III", 0, 0xFFFFFFFF, 0xFFFFFFFF))  # interface any, no cookie
            req = struct.pack("=BBBBI", socket.AF_INET, socket.IPPROTO_TCP, 1 << (self.INET_DIAG_INFO - 1), 0,
                              0xFFFFFFFF) + sockid
            parts.append(struct.pack("=IHHII", 16 + len(req), self.SOCK_DIAG_BY_FAMILY, 0x1, seq, 0) + req)
        self.request = b"".join(parts)

    def sample(self) -> dict[int, tuple[int, int, int]]:
        self.sock.send(self.request)
        out: dict[int, tuple[int, int, int]] = {}
        answered = 0
        while answered < len(self.ports):
            data = self.sock.recv(1 << 20)
            off = 0
            while off + 16 <= len(data):
                length, kind, _flags, seq = struct.unpack_from("=IHHI", data, off)
                answered += 1
                if kind != self.NLMSG_ERROR and 1 <= seq <= len(self.ports):
                    rq, _wq, _uid, inode = struct.unpack_from("=IIII", data, off + 16 + 56)
                    received = None
                    attr, end = off + 16 + 72, off + length
                    while attr + 4 <= end:
                        alen, atype = struct.unpack_from("=HH", data, attr)
                        if alen < 4:
                            break
                        if atype == self.INET_DIAG_INFO and alen >= 4 + self.TCPI_BYTES_RECEIVED + 8:
                            (received,) = struct.unpack_from("=Q", data, attr + 4 + self.TCPI_BYTES_RECEIVED)
                        attr += (alen + 3) & ~3
                    out[self.ports[seq - 1]] = (rq, (received - rq) if received is not None else -1, inode)
                off += (length + 3) & ~3
        return out


class Sampler(threading.Thread):
    """SockDiag every `interval` s between start() and stop()."""

    def __init__(self, diag: SockDiag, interval: float) -> None:
        super().__init__(daemon=True)
        self.diag, self.interval = diag, interval
        self.samples: list[tuple[float, dict[int, tuple[int, int, int]]]] = []
        self.cpu = 0.0
        self._halt = threading.Event()

    def run(self) -> None:
        if self.interval <= 0:  # --sample-ms 0: no outside measurement
            return
        started = time.thread_time()
        next_at = time.monotonic()
        while not self._halt.is_set():
            self.samples.append((time.monotonic(), self.diag.sample()))
            next_at += self.interval
            delay = next_at - time.monotonic()
            if delay > 0:
                self._halt.wait(delay)
            else:
                next_at = time.monotonic()
        self.cpu = time.thread_time() - started

    def stop(self) -> list[tuple[float, dict[int, tuple[int, int, int]]]]:
        self._halt.set()
        self.join(10)
        return self.samples


def outside_pauses(samples, ports, since: float = 0.0) -> dict[int, dict]:
    """Per client port: longest read gap (between two samples at which the server's
    read count advanced), longest unread stretch (Recv-Q > 0 while the read count
    stood still), whether the socket vanished or changed inode during the window.
    Only samples from `since` (CLOCK_MONOTONIC) on."""
    samples = [s for s in samples if s[0] >= since]
    out: dict[int, dict] = {}
    if not samples:
        return out
    for port in ports:
        prev = None
        last_read = waiting_since = None
        gap = unread = 0.0
        missing = False
        inodes = set()
        for t, snap in samples:
            value = snap.get(port)
            if value is None:
                missing = True
                continue
            rq, read, inode = value
            inodes.add(inode)
            if prev is not None and read != prev:
                if last_read is not None:
                    gap = max(gap, t - last_read)
                last_read = t
                if waiting_since is not None:
                    unread = max(unread, t - waiting_since)
                waiting_since = t if rq > 0 else None
            elif rq > 0 and waiting_since is None:
                waiting_since = t
            prev = read
        if waiting_since is not None and samples:
            unread = max(unread, samples[-1][0] - waiting_since)
        out[port] = {"gap_ms": gap * 1000, "unread_ms": unread * 1000, "missing": missing,
                     "inode_changed": len(inodes) > 1}
    return out


# ------------------------------------------------------------------ publishers


class Publisher:
    """One stream's ffmpeg publisher processes (a new one per restart), each with its own
    -progress file. `-t` bounds each process in time; they are stopped with `q`."""

    def __init__(self, clip: Path, url: str, workdir: Path, tag: str, bound_s: float) -> None:
        self.clip, self.url, self.workdir, self.tag, self.bound_s = clip, url, workdir, tag, bound_s
        self.runs: list[dict] = []

    def start(self) -> None:
        k = len(self.runs)
        progress = self.workdir / f"{self.tag}.{k}.progress"
        log = self.workdir / f"{self.tag}.{k}.log"
        proc = spawn(
            ["ffmpeg", "-hide_banner", "-nostats", "-v", "error", "-re", "-stream_loop", "-1", "-i", str(self.clip),
             "-c", "copy", "-t", f"{self.bound_s:.0f}", "-progress", str(progress), "-stats_period", "0.5",
             "-f", "flv", self.url],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=open(log, "wb"),
        )
        self.runs.append({"proc": proc, "progress": progress, "log": log, "started": time.monotonic(),
                          "exited": None})

    @property
    def proc(self) -> subprocess.Popen:
        return self.runs[-1]["proc"]

    def poll(self) -> int | None:
        """Exit status of the current process (recording when it was first seen exited)."""
        run = self.runs[-1]
        code = run["proc"].poll()
        if code is not None and run["exited"] is None:
            run["exited"] = time.monotonic()
        return code

    @staticmethod
    def progress(run: dict) -> dict[str, str]:
        try:
            text = run["progress"].read_text(errors="replace")
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

    def frames(self, run: dict) -> tuple[int | None, bool]:
        """(video frames the process sent, whether that is its final block)."""
        block = self.progress(run)
        if "frame" not in block:
            return None, False
        return int(block["frame"]), block.get("progress") == "end"

    def sending(self) -> bool:
        return int(self.progress(self.runs[-1]).get("frame", "0") or 0) > 0

    def quit(self) -> None:
        try:
            self.proc.stdin.write(b"q")
            self.proc.stdin.close()
        except (OSError, ValueError):
            pass

    def errors(self) -> list[str]:
        lines = []
        for run in self.runs:
            try:
                lines += [line for line in run["log"].read_text(errors="replace").splitlines() if line.strip()]
            except OSError:
                pass
        return lines


def stop_publishers(pubs: list[Publisher], timeout: float = 15.0) -> int:
    """`q` to each; SIGINT to those still running after `timeout`; how many needed it."""
    for pub in pubs:
        pub.quit()
    deadline = time.monotonic() + timeout
    for pub in pubs:
        try:
            pub.proc.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            pass
    signalled = 0
    for pub in pubs:
        if pub.proc.poll() is None:
            signalled += 1
            pub.proc.send_signal(signal.SIGINT)
            try:
                pub.proc.wait(5)
            except subprocess.TimeoutExpired:
                pub.proc.kill()
                pub.proc.wait(5)
        pub.poll()
    return signalled


# ------------------------------------------------------------------ segments and frames


class Keeper(SegmentKeeper):
    """SegmentKeeper that also notes, per stream, whether a playlist ever had a discontinuity."""

    def __init__(self, playlists: list[Path], keep_dir: Path) -> None:
        super().__init__(playlists, keep_dir)
        self.discontinuities = [0] * len(playlists)

    def scan(self) -> None:
        super().scan()
        for i, playlist in enumerate(self.playlists):
            try:
                text = playlist.read_text(errors="replace")
            except OSError:
                continue
            self.discontinuities[i] = max(self.discontinuities[i], text.count("#EXT-X-DISCONTINUITY\n"))


def _count(args: tuple[str, int]) -> tuple[int, int, float, int]:
    """(frames in segments [0, split), frames from split on, largest video DTS step in ms,
    DTS steps backwards) over the kept segments of one stream, in the order listed."""
    import av

    directory, split = args
    before = after = backwards = 0
    largest = 0.0
    last = last_index = None
    for seg in sorted(Path(directory).glob("*.ts")):
        index = int(seg.stem)
        try:
            with av.open(str(seg)) as container:
                if not container.streams.video:
                    continue
                stream = container.streams.video[0]
                base = float(stream.time_base)
                for packet in container.demux(stream):
                    if not packet.size:
                        continue
                    if index < split:
                        before += 1
                    else:
                        after += 1
                    if packet.dts is None:
                        continue
                    dts = packet.dts * base
                    # not across the old session -> new session boundary (a restart)
                    if last is not None and not (last_index < split <= index):
                        step = dts - last
                        if step < 0:
                            backwards += 1
                        largest = max(largest, step * 1000)
                    last, last_index = dts, index
        except av.error.FFmpegError:
            pass
    return before, after, largest, backwards


def count_frames(keep_dir: Path, splits: list[int]) -> list[tuple[int, int, float, int]]:
    jobs = [(str(keep_dir / str(i)), split) for i, split in enumerate(splits)]
    with ProcessPoolExecutor(max_workers=CPUS) as pool:
        return list(pool.map(_count, jobs, chunksize=4))


# ------------------------------------------------------------------ the server


class Server:
    def __init__(self, command: list[str], n: int, prefix: str) -> None:
        self.command = command
        self.work = Path(tempfile.mkdtemp(prefix=prefix))
        self.ports = [free_port() for _ in range(3)]
        self.rtmp_port, self.http_port, self.admin_port = self.ports
        self.config = mediaserver_config(self.work, self.ports, n, previews=False)
        self.proc: subprocess.Popen | None = None
        self.workers_seen: set[int] = set()

    def start(self) -> float:
        started = time.monotonic()
        self.proc, log = serve_mediaserver(self.command, self.work, self.config, self.http_port)
        if self.proc is None:
            raise RuntimeError(f"mediaserver did not start:\n{log}")
        return time.monotonic() - started

    @property
    def token(self) -> str:
        return (self.work / "data" / "admin.token").read_text().strip()

    def api(self, path: str, body: dict | None = None, timeout: float = 10.0) -> tuple[int, dict]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.admin_port}/api/v1/{path}",
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
            method="GET" if body is None else "POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            text = exc.read()
            try:
                return exc.code, json.loads(text)
            except ValueError:
                return exc.code, {"ok": False, "error": text.decode(errors="replace")}

    def status(self) -> dict:
        _, body = self.api("status")
        for worker in (body.get("keeper") or {}).get("workers", []):
            self.workers_seen.add(worker["pid"])
        return body

    def live_names(self) -> set[str]:
        try:
            _, body = self.api("sessions", timeout=5)
        except (OSError, ValueError):
            return set()
        return {s.get("name") for s in body} if isinstance(body, list) else set()

    def log_lines(self) -> list[str]:
        try:
            return (self.work / "log").read_text(errors="replace").splitlines()
        except OSError:
            return []

    def errors(self) -> list[str]:
        return [line for line in self.log_lines() if re.search(r" (ERROR|CRITICAL) |^Traceback", line)]

    def kill(self) -> None:
        if self.proc is not None:
            stop(self.proc, signal.SIGTERM, 20)
        for pid in self.workers_seen:  # a worker outliving its keeper (it should not)
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.work, ignore_errors=True)


def wait_live(server: Server, pubs: list[Publisher], names: list[str], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(p.sending() for p in pubs) and set(names) <= server.live_names():
            return True
        time.sleep(0.25)
    return False


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def dist(values: list[float]) -> str:
    if not values:
        return "-"
    return f"p50 {pct(values, .5):.1f} / p99 {pct(values, .99):.1f} / max {max(values):.1f}"


# ------------------------------------------------------------------ phase 1: upgrades


def run_upgrades(args, clip: Path) -> dict:
    n, k = args.streams, args.upgrades
    server = Server(shlex.split(args.server_cmd), n, "ms-upgrade-bench-")
    names = [f"u{i}" for i in range(n)]
    bound = 120 + args.warmup + 3 + k * (args.spacing + 5)
    pubs = [Publisher(clip, f"rtmp://127.0.0.1:{server.rtmp_port}/live/{name}", server.work, name, bound)
            for name in names]
    result: dict = {"n": n, "upgrades": [], "work": str(server.work)}
    keeper = None
    try:
        server.start()
        keeper_pid = server.proc.pid
        status = server.status()
        result["idle"] = {"worker": (rss_mb(status["pid"]), fds(status["pid"])),
                          "keeper": (rss_mb(keeper_pid), fds(keeper_pid))}
        result["keeper_is_proc"] = (status.get("keeper") or {}).get("pid") == keeper_pid
        keeper = Keeper([server.work / "data" / "hls" / name / "index.m3u8" for name in names], server.work / "keep")
        keeper.start()
        for pub in pubs:
            pub.start()
        result["late_start"] = not wait_live(server, pubs, names, 30 + n / 5)
        time.sleep(args.warmup)
        diag = SockDiag(server.rtmp_port)
        first = diag.sample()
        result["ss_before"] = ss_ports(server.rtmp_port)
        result["sockets_before"] = {port: v[2] for port, v in first.items()}
        clients = sorted(first)
        watched = clients[:: max(len(clients) // max(min(args.outside_streams, len(clients)), 1), 1)][: args.outside_streams]
        result["watched"] = len(watched)
        lookup = SockLookup(server.rtmp_port, watched)
        cpu = CpuWindow()
        cpu.start(keeper_pid, [p.proc.pid for p in pubs])

        sampler = Sampler(lookup, args.sample_ms / 1000)
        sampler.start()
        time.sleep(args.baseline)
        base = outside_pauses(sampler.stop(), watched)
        result["baseline"] = {"gap": [v["gap_ms"] for v in base.values()],
                              "unread": [v["unread_ms"] for v in base.values()],
                              "sampler_cpu": sampler.cpu / args.baseline if args.sample_ms > 0 else 0.0}
        status = server.status()
        level = {"worker": (rss_mb(status["pid"]), fds(status["pid"])),
                 "keeper": (rss_mb(keeper_pid), fds(keeper_pid))}
        result["level"] = level
        for step in range(k):
            status = server.status()
            worker = status["pid"]
            before = {"worker": (rss_mb(worker), fds(worker)), "keeper": (rss_mb(keeper_pid), fds(keeper_pid))}
            sampler = Sampler(lookup, args.sample_ms / 1000)
            sampler.start()
            called = time.monotonic()
            code, report = server.api("upgrade", {"dry_run": False}, timeout=300)
            answered = time.monotonic()
            time.sleep(0.3)
            samples = sampler.stop()
            outside = outside_pauses(samples, watched)
            # the move itself: from shortly before switch_ms began (the states are exported just before) on
            move_from = answered - (report.get("switch_ms") or 0) / 1000 - 0.2
            outside_move = outside_pauses(samples, watched, since=move_from)
            old = report.get("old_pid") or worker
            exited_after = None
            while time.monotonic() - answered < args.spacing:
                if exited_after is None and not alive(old):
                    exited_after = time.monotonic() - answered
                time.sleep(0.05)
            if exited_after is None and not alive(old):
                exited_after = time.monotonic() - answered
            status = server.status()
            serving = status["pid"]
            sessions = status.get("sessions", [])
            after = {"worker": (rss_mb(serving), fds(serving)), "keeper": (rss_mb(keeper_pid), fds(keeper_pid))}
            entry = {
                "step": step + 1, "http": code, "report": report, "wall_ms": (answered - called) * 1000,
                "before": before, "after": after, "old": old, "serving": serving,
                "old_exited_after": exited_after,
                "workers": len((status.get("keeper") or {}).get("workers", [])),
                "sessions": len(sessions), "sessions_on_serving": sum(1 for s in sessions if s.get("pid") == serving),
                "outside": outside, "outside_move": outside_move, "samples": len(samples),
                "sample_interval_ms": (samples[-1][0] - samples[0][0]) / max(len(samples) - 1, 1) * 1000
                if len(samples) > 1 else float("nan"),
                "sampler_cpu": sampler.cpu / max(samples[-1][0] - samples[0][0], 1e-3) if len(samples) > 1 else 0.0,
            }
            result["upgrades"].append(entry)
            pauses = [s["pause_ms"] for s in report.get("streams", []) if s.get("pause_ms") is not None]
            print(f"  upgrade {step + 1}/{k}: ok={report.get('ok')} moved={report.get('moved')}"
                  f" switch {report.get('switch_ms')} ms, duration {report.get('duration_ms')} ms,"
                  f" pause max {max(pauses) if pauses else '-'} ms"
                  + (f", error: {report.get('error')}" if report.get("error") else ""), flush=True)
        result["cpu"] = cpu.stop()
        last = diag.sample()
        result["sockets_after"] = {port: v[2] for port, v in last.items()}
        result["ss_after"] = ss_ports(server.rtmp_port)
        diag.close()
        lookup.close()
        result["died"] = sum(1 for p in pubs if p.poll() is not None)
        result["signalled"] = stop_publishers(pubs)
        keeper.wait_settled(timeout=20.0, want_endlist=True)
        keeper.stop()
        result["ended"] = sum(keeper.ended)
        result["own_counters"] = server_metrics(server.http_port)
        server.kill()
        result["errors"] = server.errors()
        result["warnings"] = [line for line in server.log_lines() if " WARNING " in line]
        sent = [pub.frames(pub.runs[0]) for pub in pubs]
        counted = count_frames(server.work / "keep", [10 ** 9] * n)
        result["frames"] = [
            {"sent": s, "final": final, "written": c[0], "gap_ms": c[2], "backwards": c[3],
             "exit": pub.runs[0]["proc"].returncode, "errors": pub.errors(), "disc": d}
            for (s, final), c, pub, d in zip(sent, counted, pubs, keeper.discontinuities)
        ]
        return result
    finally:
        for pub in pubs:
            for run in pub.runs:
                stop(run["proc"], signal.SIGKILL, 5)
        if keeper is not None and keeper.is_alive():
            keeper.stop()
        server.kill()
        if not args.keep:
            shutil.rmtree(server.work, ignore_errors=True)


# ------------------------------------------------------------------ phase 2: restart


def run_restart(args, clip: Path) -> dict:
    n = args.streams
    server = Server(shlex.split(args.server_cmd), n, "ms-restart-bench-")
    names = [f"r{i}" for i in range(n)]
    bound = 120 + args.warmup + args.restart_tail
    pubs = [Publisher(clip, f"rtmp://127.0.0.1:{server.rtmp_port}/live/{name}", server.work, name, bound)
            for name in names]
    result: dict = {"n": n, "work": str(server.work)}
    keeper = None
    try:
        server.start()
        keeper = Keeper([server.work / "data" / "hls" / name / "index.m3u8" for name in names], server.work / "keep")
        keeper.start()
        for pub in pubs:
            pub.start()
        result["late_start"] = not wait_live(server, pubs, names, 30 + n / 5)
        time.sleep(args.warmup)
        server.status()
        result["ss_before"] = ss_ports(server.rtmp_port)

        terminated = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(5)
        down = time.monotonic()
        result["keeper_exit_s"] = down - terminated
        result["keeper_status"] = server.proc.returncode
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(p.poll() is None for p in pubs):
            time.sleep(0.01)
        result["disconnected"] = sum(1 for p in pubs if p.poll() is not None)
        result["exit_codes"] = sorted({p.poll() for p in pubs}, key=str)
        for pub in pubs:
            if pub.poll() is None:  # still running without a server: not a publisher any more
                pub.proc.kill()
                pub.proc.wait(5)
                pub.poll()
        keeper.scan()
        splits = keeper.counts()  # segments of the old sessions (every playlist ended by the shutdown)
        result["ended_before_restart"] = sum(keeper.ended)

        server.proc = None
        result["start_s"] = server.start()
        up = time.monotonic()
        server.status()
        result["down_s"] = up - terminated
        # Started one after another while a thread polls the sessions: on this machine starting
        # 100 ffmpeg processes takes seconds of its own (each is counted from its own start).
        # (Not the other way round: PR_SET_PDEATHSIG fires when the thread that forked exits.)
        live_at: dict[str, float] = {}
        deadline = time.monotonic() + 30 + n / 5

        def poll() -> None:
            while len(live_at) < n and time.monotonic() < deadline:
                for name in server.live_names():
                    live_at.setdefault(name, time.monotonic())
                time.sleep(0.05)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        for pub in pubs:
            pub.start()
        result["spawn_s"] = pubs[-1].runs[-1]["started"] - up
        poller.join(max(deadline - time.monotonic(), 0) + 10)
        result["relive"] = len(live_at)
        time.sleep(args.restart_tail)
        result["ss_after"] = ss_ports(server.rtmp_port)
        result["signalled"] = stop_publishers(pubs)
        keeper.wait_settled(timeout=20.0, want_endlist=True)
        keeper.stop()
        server.kill()
        result["errors"] = server.errors()
        counted = count_frames(server.work / "keep", splits)
        streams = []
        for name, pub, c, d in zip(names, pubs, counted, keeper.discontinuities):
            old_run = pub.runs[0]
            old_sent, old_final = pub.frames(old_run)
            new_sent, new_final = pub.frames(pub.runs[-1]) if len(pub.runs) > 1 else (None, False)
            exited = old_run["exited"] or down
            stream = {
                "name": name, "old_exit": old_run["proc"].returncode, "exited_after_term": exited - terminated,
                "old_sent": old_sent, "old_final": old_final, "old_written": c[0],
                "new_sent": new_sent, "new_final": new_final, "new_written": c[1], "disc": d,
                "dark_s": (live_at[name] - exited) if name in live_at else None,
                "restarted_after_exit": pub.runs[-1]["started"] - exited if len(pub.runs) > 1 else None,
                "accepted_after_start": (live_at[name] - pub.runs[-1]["started"])
                if name in live_at and len(pub.runs) > 1 else None,
            }
            if stream["dark_s"] is not None and old_sent is not None:
                stream["missing_s"] = stream["dark_s"] + max(old_sent - c[0], 0) / FPS
            streams.append(stream)
        result["streams"] = streams
        return result
    finally:
        for pub in pubs:
            for run in pub.runs:
                stop(run["proc"], signal.SIGKILL, 5)
        if keeper is not None and keeper.is_alive():
            keeper.stop()
        server.kill()
        if not args.keep:
            shutil.rmtree(server.work, ignore_errors=True)


# ------------------------------------------------------------------ report


def mark(ok: bool) -> str:
    return "met" if ok else "MISSED"


def mb(v: float | None) -> str:
    return f"{v:.1f}" if v is not None else "?"


def report_upgrades(r: dict, args) -> list[tuple[str, str, bool]]:
    n, ups = r["n"], r["upgrades"]
    print(f"\n== {len(ups)} upgrades under {n} ffmpeg publishers; sock_diag of {r['watched']} of the {n} sockets every"
          f" {args.sample_ms:g} ms while each upgrade ran\n   over the upgrades: {describe_cpu(r['cpu'])}\n")
    head = (f"{'#':>2} | {'pids old->new':>13} | {'moved':>5} | {'switch ms':>9} | {'duration ms':>11} |"
            f" {'pause ms p50/p99/max (report)':>29} | {'held max':>8} | {'outside gap/unread':>18} |"
            f" {'worker RSS MB':>13} | {'worker fds':>10} | {'keeper RSS':>10} | {'keeper fds':>10} | {'old gone s':>10}")
    print(head)
    print("-" * len(head))
    pauses, helds, gaps, unreads, switches, durations, none_pauses = [], [], [], [], [], [], 0
    whole_gaps, whole_unreads, diffs = [], [], []
    for u in ups:
        rep = u["report"]
        ps = [s["pause_ms"] for s in rep.get("streams", []) if s.get("pause_ms") is not None]
        hs = [s["held_ms"] for s in rep.get("streams", []) if s.get("held_ms") is not None]
        none_pauses += sum(1 for s in rep.get("streams", []) if s.get("pause_ms") is None)
        g = [v["gap_ms"] for v in u["outside_move"].values()]
        un = [v["unread_ms"] for v in u["outside_move"].values()]
        whole_gaps += [v["gap_ms"] for v in u["outside"].values()]
        whole_unreads += [v["unread_ms"] for v in u["outside"].values()]
        for s in rep.get("streams", []):
            port = int(str(s.get("client", ":0")).rsplit(":", 1)[1] or 0)
            if s.get("pause_ms") is not None and port in u["outside_move"]:
                diffs.append(u["outside_move"][port]["gap_ms"] - s["pause_ms"])
        pauses += ps
        helds += hs
        gaps += g
        unreads += un
        if rep.get("switch_ms") is not None:
            switches.append(rep["switch_ms"])
        if rep.get("duration_ms") is not None:
            durations.append(rep["duration_ms"])
        (wr0, wf0), (wr1, wf1) = u["before"]["worker"], u["after"]["worker"]
        (kr0, kf0), (kr1, kf1) = u["before"]["keeper"], u["after"]["keeper"]
        pause_s = (f"{pct(ps, .5):.1f} / {pct(ps, .99):.1f} / {max(ps):.1f}" if ps else "-")
        old_gone = f"{u['old_exited_after']:.2f}" if u["old_exited_after"] is not None else "alive"
        print(f"{u['step']:>2} | {str(rep.get('old_pid')) + '->' + str(rep.get('new_pid')):>13} |"
              f" {str(rep.get('moved')):>5} | {str(rep.get('switch_ms')):>9} | {str(rep.get('duration_ms')):>11} |"
              f" {pause_s:>29} | {max(hs) if hs else '-':>8} | {f'{max(g):.0f} / {max(un):.0f}' if g else '-':>18} |"
              f" {mb(wr0) + '->' + mb(wr1):>13} | {str(wf0) + '->' + str(wf1):>10} |"
              f" {mb(kr0) + '->' + mb(kr1):>10} | {str(kf0) + '->' + str(kf1):>10} | {old_gone:>10}")
        if not rep.get("ok"):
            print(f"     refused (HTTP {u['http']}): {rep.get('error')}")
    print(f"\nper-stream pause over {len(pauses)} stream-upgrades (report, pause_ms): {dist(pauses)} ms"
          + (f"; {none_pauses} without a pause figure (no first read within the report's wait)" if none_pauses else ""))
    print(f"  held (old stopped reading -> new resumed, report held_ms): {dist(helds)} ms")
    print(f"  outside (sock_diag), the move (from 0.2 s before switch_ms began): longest read gap per stream and"
          f" upgrade {dist(gaps)} ms; longest unread stretch {dist(unreads)} ms")
    print(f"    read gap minus the report's pause_ms, same stream and upgrade: {dist(diffs)} ms")
    print(f"  outside, the whole upgrade (the new worker's start included): read gap {dist(whole_gaps)} ms;"
          f" unread {dist(whole_unreads)} ms")
    print(f"  outside, baseline without an upgrade ({args.baseline:g} s): read gap {dist(r['baseline']['gap'])} ms;"
          f" unread {dist(r['baseline']['unread'])} ms  (resolution +-{args.sample_ms:g} ms; the sampler used"
          f" {100 * r['baseline']['sampler_cpu']:.0f} % of a core while it ran)")
    print(f"whole switch (switch_ms): {dist(switches)} ms; with the new worker's start (duration_ms): {dist(durations)} ms")

    frames = r["frames"]
    clean = [f for f in frames if f["sent"] is not None and f["final"]]
    lost = sum(max(f["sent"] - f["written"], 0) for f in clean)
    extra = sum(max(f["written"] - f["sent"], 0) for f in clean)
    losing = sum(1 for f in clean if f["sent"] != f["written"])
    gap_max = max((f["gap_ms"] for f in frames), default=0)
    backwards = sum(f["backwards"] for f in frames)
    disc = sum(1 for f in frames if f["disc"])
    print(f"frames: {sum(f['sent'] for f in clean)} video frames sent, {sum(f['written'] for f in clean)} in listed"
          f" segments: {lost} lost, {extra} extra, {losing} streams differ"
          + (f"; {len(frames) - len(clean)} publishers without a final progress block (not counted)"
             if len(clean) < len(frames) else "")
          + f"; {r['own_counters']}")
    print(f"  HLS output: largest video DTS step {gap_max:.1f} ms (one frame = {1000 / FPS:.1f} ms), {backwards} steps"
          f" backwards, {disc} streams with #EXT-X-DISCONTINUITY, {r['ended']}/{n} playlists ended")
    bad_exit = [f for f in frames if f["exit"] != 0]
    err_lines = sum(len(f["errors"]) for f in frames)
    before, after = r["sockets_before"], r["sockets_after"]
    same_sockets = sum(1 for port, inode in before.items() if after.get(port) == inode)
    upgrades_ok = sum(1 for u in ups if u["report"].get("ok"))
    moved_all = sum(1 for u in ups if u["report"].get("moved") == n)
    sessions_ok = sum(1 for u in ups if u["sessions_on_serving"] == n)
    dropped = r["died"] + len(bad_exit) + (len(before) - same_sockets)
    print(f"connections: {len(before)} before the first upgrade, {same_sockets} of them the same socket (client port +"
          f" inode) after the last; ss client ports before {len(r['ss_before'])}, after {len(r['ss_after'])},"
          f" common {len(r['ss_before'] & r['ss_after'])}; publishers died before told to stop {r['died']}, exit status"
          f" not 0: {len(bad_exit)}, stderr lines: {err_lines}" + (f", needed SIGINT: {r['signalled']}" if r["signalled"] else ""))
    print(f"  upgrades ok {upgrades_ok}/{len(ups)}, moved all {n} in {moved_all}, every session on the new worker"
          f" after {sessions_ok}; server log {len(r['errors'])} errors, {len(r['warnings'])} warnings")
    for line in (r["errors"] + r["warnings"])[:4]:
        print(f"    | {line[:220]}")
    for f in frames:
        if f["errors"]:
            print(f"    publisher | {f['errors'][0][:200]}")
            break

    lw, lk = r["level"]["worker"], r["level"]["keeper"]

    def back(level, now) -> bool:
        return (None not in (*level, *now)) and now[0] <= level[0] * 1.10 and abs(now[1] - level[1]) <= 2

    worker_back = [back(lw, u["after"]["worker"]) for u in ups]
    keeper_back = [back(lk, u["after"]["keeper"]) for u in ups]
    if ups:
        print(f"RSS/fds level before the first upgrade: worker {mb(lw[0])} MB / {lw[1]} fds, keeper {mb(lk[0])} MB /"
              f" {lk[1]} fds (idle, before publishers: worker {mb(r['idle']['worker'][0])} MB / {r['idle']['worker'][1]},"
              f" keeper {mb(r['idle']['keeper'][0])} MB / {r['idle']['keeper'][1]}); after the last upgrade: worker"
              f" {mb(ups[-1]['after']['worker'][0])} MB / {ups[-1]['after']['worker'][1]}, keeper"
              f" {mb(ups[-1]['after']['keeper'][0])} MB / {ups[-1]['after']['keeper'][1]};"
              f" old worker gone within {args.spacing:g} s: {sum(1 for u in ups if u['old_exited_after'] is not None)}"
              f"/{len(ups)}; workers listed after each: {sorted({u['workers'] for u in ups})}")

    checks = [
        ("connections dropped", f"{dropped}", dropped == 0 and upgrades_ok == len(ups) and moved_all == len(ups)),
        ("frames lost", f"{lost}" + ("?" if len(clean) < len(frames) else "") + (f" (+{extra} extra)" if extra else ""),
         lost == 0 and extra == 0 and len(clean) == len(frames) and backwards == 0 and disc == 0),
        ("pause p99 <= 50 ms (report)", f"{pct(pauses, .99):.1f} ms", bool(pauses) and pct(pauses, .99) <= 50),
        ("pause max <= 200 ms (report)", f"{max(pauses, default=float('nan')):.1f} ms",
         bool(pauses) and max(pauses) <= 200 and none_pauses == 0),
        ("pause p99 <= 50 ms (outside, read gap at the move)", f"{pct(gaps, .99):.1f} ms" if gaps else "not measured",
         pct(gaps, .99) <= 50 if gaps else None),
        ("pause max <= 200 ms (outside, read gap at the move)", f"{max(gaps):.1f} ms" if gaps else "not measured",
         max(gaps) <= 200 if gaps else None),
        (f"whole {n}-stream hand-over <= 1 s (switch_ms max)", f"{max(switches, default=float('nan')):.0f} ms",
         bool(switches) and max(switches) <= 1000),
        ("worker RSS/fds back to level (<= +10 %, +-2 fds)", f"{sum(worker_back)}/{len(ups)} upgrades",
         all(worker_back) and bool(ups)),
        ("keeper RSS/fds back to level (<= +10 %, +-2 fds)", f"{sum(keeper_back)}/{len(ups)} upgrades",
         all(keeper_back) and bool(ups)),
    ]
    return checks


def report_restart(r: dict) -> list[tuple[str, str, bool]]:
    n, streams = r["n"], r["streams"]
    print(f"\n== restart (what peers offer): SIGTERM to the keeper, `mediaserver serve` again, {n} ffmpeg publishers\n")
    dark = [s["dark_s"] for s in streams if s["dark_s"] is not None]
    missing = [s["missing_s"] for s in streams if s.get("missing_s") is not None]
    lost_old = [max(s["old_sent"] - s["old_written"], 0) for s in streams if s["old_sent"] is not None]
    lost_new = [max(s["new_sent"] - s["new_written"], 0) for s in streams if s["new_sent"] is not None]
    exits = [s["exited_after_term"] for s in streams]
    print(f"keeper exited {r['keeper_exit_s']:.2f} s after SIGTERM (status {r['keeper_status']}); new server answering"
          f" {r['start_s']:.2f} s later: down {r['down_s']:.2f} s")
    print(f"publishers disconnected: {r['disconnected']}/{n} (ffmpeg exit statuses {r['exit_codes']}; ffmpeg does not"
          f" reconnect: each was started again as soon as the new server answered); ss client ports before"
          f" {len(r['ss_before'])}, after {len(r['ss_after'])}, in common {len(r['ss_before'] & r['ss_after'])}")
    print(f"  ffmpeg saw the connection fail {dist([1000 * x for x in exits])} ms after the SIGTERM")
    print(f"  publish accepted again for {r['relive']}/{n}; dark per stream (failed write -> new publish accepted):"
          f" {dist(dark)} s")
    print(f"    of which: failed write -> its ffmpeg started again"
          f" {dist([s['restarted_after_exit'] for s in streams if s['restarted_after_exit'] is not None])} s"
          f" (the server down, then this script starting {n} ffmpeg processes one after another:"
          f" {r['spawn_s']:.1f} s for all); ffmpeg started -> publish accepted"
          f" {dist([s['accepted_after_start'] for s in streams if s['accepted_after_start'] is not None])} s")
    print(f"  frames the old publisher sent that are in no segment: {sum(lost_old)} ({dist(lost_old)} per stream);"
          f" after the restart: {sum(lost_new)} lost")
    print(f"  media missing in the HLS output per stream (dark + sent-but-lost / {FPS} fps): {dist(missing)} s;"
          f" streams with #EXT-X-DISCONTINUITY: {sum(1 for s in streams if s['disc'])}/{n};"
          f" server log errors: {len(r['errors'])}")
    return [("restart: publishers disconnected (peers' way)", f"{r['disconnected']}/{n}", r["disconnected"] == 0),
            ("restart: media missing per stream", f"max {max(missing, default=float('nan')):.2f} s", not missing or max(missing) == 0)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--upgrades", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="short smoke run: 10 streams, 2 upgrades")
    parser.add_argument("--spacing", type=float, default=3.0, help="seconds from one upgrade's answer to the next")
    parser.add_argument("--warmup", type=float, default=None, help="seconds after every stream is live (default max(4, 2 + N/20))")
    parser.add_argument("--baseline", type=float, default=3.0, help="seconds of sock_diag sampling without an upgrade")
    parser.add_argument("--sample-ms", type=float, default=10.0,
                        help="sock_diag sample interval during upgrades (0: no outside measurement)")
    parser.add_argument("--outside-streams", type=int, default=20,
                        help="streams whose sockets are sampled from outside (spread over all N)")
    parser.add_argument("--restart-tail", type=float, default=None, help="seconds published after the restart (default 6)")
    parser.add_argument("--skip-restart", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the work directories (logs, segments)")
    parser.add_argument("--server-cmd", default=f"{sys.executable} -m mediaserver",
                        help="command that runs mediaserver; `serve --config FILE` is appended")
    args = parser.parse_args()
    if args.quick:
        args.streams, args.upgrades, args.spacing = min(args.streams, 10), min(args.upgrades, 2), min(args.spacing, 2.0)
    if args.warmup is None:
        args.warmup = max(4.0, 2.0 + args.streams / 20)
    if args.restart_tail is None:
        args.restart_tail = 4.0 if args.quick else 6.0
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))

    clip = make_clip()
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(f"clip: {clip} ({clip.stat().st_size * 8 / 20 / 1e6:.1f} Mbit/s); {CPUS} cores, load average {load};"
          f" {args.streams} streams, {args.upgrades} upgrades {args.spacing:g} s apart"
          + ("" if args.skip_restart else ", then a restart"), flush=True)
    checks: list[tuple[str, str, bool]] = []
    started = time.monotonic()
    try:
        print("\nphase 1: upgrades", flush=True)
        upgrades = run_upgrades(args, clip)
        checks += report_upgrades(upgrades, args)
        if not args.skip_restart:
            print("\nphase 2: restart", flush=True)
            restart = run_restart(args, clip)
            checks += report_restart(restart)
    except KeyboardInterrupt:
        print("\ninterrupted: every process started was stopped", flush=True)
        return 130
    print(f"\ntargets ({time.monotonic() - started:.0f} s run):")
    width = max(len(c[0]) for c in checks)
    for name, value, ok in checks:
        restart_row = name.startswith("restart")
        verdict = "(for comparison)" if restart_row else "-" if ok is None else mark(ok)
        print(f"  {name:<{width}}  {value:>20}  {verdict}")
    with open("/proc/loadavg") as f:
        print("load average after:", f.read().split()[:3])
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
