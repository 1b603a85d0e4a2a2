"""WHIP -> HLS ingest cost: server CPU and RSS per aiortc publisher.

Runs N WebRTC publishers (tests/whip_client.py: aiortc, one OS process each)
that send a 720p30 H.264 ~2.5 Mbit/s + Opus clip's own packets (no
re-encode, paced by their timestamps, looping with timestamps going on) to
`mediaserver serve` over WHIP, one stream name each, and over a steady window
(after a warm-up) measures:

- the server's CPU: utime + stime from /proc/PID/stat per second of media the
  publishers sent (= % of one core per publisher), split into the event loop
  thread and the other threads (aiortc's receive threads: Opus -> AAC);
  "publishers per core" = 100 / that;
- its RSS idle before the publishers and loaded at the end of the window,
  and (loaded - idle) / N per added publisher;
- the publishers' own CPU and the machine's total (/proc/stat), since the
  publishers run on the same cores, and how much of it was none of these;
- frames: every segment a playlist lists is hard-linked aside before the
  server deletes it; after the publishers stop (`q` on stdin: tracks end,
  DELETE, final progress block) the video frames in those segments are
  compared with the video packets each publisher handed to aiortc. Also:
  every publisher got 201 and its DELETE 200, every stream has a playlist
  ending in ENDLIST, and the server log has no errors;
- whether the event loop thread kept up: its time on a CPU and waiting for
  one (/proc schedstat), sampled states (idle in epoll, asleep on the GIL),
  and UDP datagrams the kernel dropped on full receive buffers.

With `--profile`, py-spy samples the server over the window (by default the
thread holding the GIL, without pausing the server) and the script prints
each thread group's CPU, where the time goes by component (SRTP, RTP
parsing, jitter buffer, our depacketize path, HLS muxing, Opus -> AAC,
event loop...) and the top functions. See benchmarks/README.md.

    .venv/bin/python benchmarks/whip_ingest.py [--publishers 1,5,10] [--duration 20] [--warmup 5]
        [--profile [gil|active|native]] [--video-only] [--shared-udp-port] [--server-cmd CMD]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _ingest_lib import (
    TICK,
    Publishers,
    SegmentKeeper,
    cpu_ticks,
    free_port,
    machine_ticks,
    rss_kb,
    serve_mediaserver,
    spawn,
    stop,
    tree,
)
from rtmp_ingest import count_frames, mark, mediaserver_config, server_metrics

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "tests" / "whip_client.py"
CACHE = Path(tempfile.gettempdir()) / "mediaserver-bench"
CPUS = os.cpu_count() or 1
CLIP_SECONDS = 20
TARGET_PER_CORE = 30  # H.264 passthrough publishers per core


def make_clip() -> Path:
    """20 s of 720p30 testsrc2 + temporal noise (so x264 really spends ~2.5 Mbit/s), constrained
    baseline (no B-frames, as WebRTC publishers send), 2 s GOP, Opus 64k stereo, MPEG-TS (Annex B)."""
    CACHE.mkdir(exist_ok=True)
    clip = CACHE / "720p30-2500k-opus.ts"
    if not clip.exists():
        print("encoding the 720p30 test clip (once, a few seconds)...", flush=True)
        subprocess.run(
            ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc2=size=1280x720:rate=30",
             "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000", "-t", str(CLIP_SECONDS),
             "-vf", "noise=alls=12:allf=t", "-c:v", "libx264", "-preset", "veryfast", "-profile:v", "baseline",
             "-bf", "0", "-b:v", "2500k", "-maxrate", "2500k", "-bufsize", "2500k", "-g", "60", "-keyint_min", "60",
             "-sc_threshold", "0", "-pix_fmt", "yuv420p",
             "-c:a", "libopus", "-b:a", "64k", "-ac", "2", "-ar", "48000", "-f", "mpegts", str(clip) + ".tmp"],
            check=True,
        )
        os.replace(str(clip) + ".tmp", clip)
    return clip


def video_only(clip: Path) -> Path:
    """The same clip without its audio: what H.264 passthrough alone costs (no Opus -> AAC)."""
    out = clip.with_name(clip.stem + "-video-only.ts")
    if not out.exists():
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(clip), "-an", "-c", "copy", "-f", "mpegts",
                        str(out) + ".tmp"], check=True)
        os.replace(str(out) + ".tmp", out)
    return out


# ------------------------------------------------------------------ publishers


class WhipPublishers(Publishers):
    """N `whip_client.py URL CLIP --loop --progress FILE --quit-on-stdin`: the client writes
    ffmpeg-style progress blocks (`frame=` video packets sent, `out_time_us`) and ends
    cleanly on `q`, so everything of `Publishers` but the start applies as it is."""

    def __init__(self, clip: Path, urls: list[str], workdir: Path, max_seconds: float) -> None:
        self.progress_files = [workdir / f"pub{i}.progress" for i in range(len(urls))]
        self.logs = [workdir / f"pub{i}.log" for i in range(len(urls))]
        self.outputs = [workdir / f"pub{i}.out" for i in range(len(urls))]
        self.procs: list[subprocess.Popen] = []
        self.signalled = 0
        for url, progress, log, out in zip(urls, self.progress_files, self.logs, self.outputs):
            self.procs.append(spawn(
                # --duration: a bound of its own, should this script fail to stop it
                [sys.executable, str(CLIENT), url, str(clip), "--loop", "--duration", f"{max_seconds:.0f}",
                 "--progress", str(progress), "--quit-on-stdin"],
                stdin=subprocess.PIPE, stdout=open(out, "wb"), stderr=open(log, "wb"),
            ))

    def results(self) -> list[dict]:
        """The JSON line each client printed at its end ({} if none)."""
        out = []
        for path in self.outputs:
            result: dict = {}
            try:
                for line in path.read_text(errors="replace").splitlines():
                    if line.startswith("{"):
                        result = json.loads(line)
            except (OSError, ValueError):
                pass
            out.append(result)
        return out


def free_udp_range(size: int) -> int:
    """A base port such that base..base+size-1 are free for UDP on 127.0.0.1 now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + size > 65535:
            continue
        held = []
        try:
            for port in range(base, base + size):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                held.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError("no free UDP port range")


# ------------------------------------------------------------------ /proc per thread


def thread_stats(pid: int) -> dict[int, tuple[int, int, int, int]]:
    """Per thread of `pid`: (utime, stime, voluntary, involuntary context switches)."""
    out: dict[int, tuple[int, int, int, int]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
            switches = dict(line.split(":") for line in status.splitlines() if "ctxt_switches:" in line)
            out[int(tid)] = (int(fields[11]), int(fields[12]), int(switches["voluntary_ctxt_switches"]),
                             int(switches["nonvoluntary_ctxt_switches"]))
        except (OSError, IndexError, ValueError):
            pass
    return out


def thread_deltas(before: dict, after: dict) -> dict[int, tuple[int, ...]]:
    """Per thread, what its figures advanced over the window (threads that ended
    meanwhile are missing; their CPU is still in the process total)."""
    zero = (0, 0, 0, 0)
    return {tid: tuple(b - a for a, b in zip(before.get(tid, zero), now)) for tid, now in after.items()}


def schedstat(pid: int, tid: int) -> tuple[int, int]:
    """(ns on a CPU, ns runnable but waiting for a CPU) of one thread."""
    try:
        fields = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
        return int(fields[0]), int(fields[1])
    except (OSError, ValueError, IndexError):
        return 0, 0


class ThreadStateSampler(threading.Thread):
    """Samples what one thread is doing (running, or asleep and where: a futex is the GIL
    or a lock, epoll is the event loop's poll) `rate` times a second from /proc."""

    def __init__(self, pid: int, tid: int, rate: float = 50.0) -> None:
        super().__init__(daemon=True)
        self.base = f"/proc/{pid}/task/{tid}"
        self.interval = 1.0 / rate
        self.counts: Counter[str] = Counter()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            try:
                state = Path(f"{self.base}/stat").read_text().rsplit(")", 1)[1].split()[0]
                wchan = Path(f"{self.base}/wchan").read_text().strip()
            except (OSError, IndexError):
                return
            if state == "R":
                self.counts["running or runnable"] += 1
            elif "futex" in wchan:
                self.counts["asleep on a futex (GIL, lock)"] += 1
            elif "poll" in wchan:
                self.counts["asleep in epoll (nothing to do)"] += 1
            else:
                self.counts[f"asleep ({wchan if wchan not in ('', '0') else 'wchan not shown'})"] += 1

    def stop(self) -> dict[str, float]:
        self._halt.set()
        self.join(5)
        total = sum(self.counts.values()) or 1
        return {k: v / total for k, v in self.counts.most_common()}


def udp_drops() -> int:
    """Datagrams the kernel dropped because a socket's receive buffer was full (whole machine)."""
    try:
        lines = [l.split() for l in Path("/proc/net/snmp").read_text().splitlines() if l.startswith("Udp:")]
        return int(lines[1][lines[0].index("RcvbufErrors")])
    except (OSError, ValueError, IndexError):
        return 0


# ------------------------------------------------------------------ profile


def find_py_spy() -> str | None:
    """py-spy beside this Python or on PATH; installed into this venv with pip when missing."""
    beside = Path(sys.executable).parent / "py-spy"
    if not beside.exists() and shutil.which("py-spy") is None:
        print("installing py-spy into this venv for --profile ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=False)
    return str(beside) if beside.exists() else shutil.which("py-spy")


# (pattern on a frame's file, component): the first that matches, walking from the leaf up,
# takes the sample. Frames of no listed module (asyncio, threading, queue...) are passed over,
# so asyncio.Queue.put called by aiortc's receiver counts as aiortc's receiver.
COMPONENTS: list[tuple[str, str]] = [
    (r"pylibsrtp/", "SRTP/SRTCP decrypt (pylibsrtp)"),
    (r"aiortc/rtcdtlstransport\.py", "DTLS transport: demux, SRTP calls, RTP/RTCP dispatch (aiortc)"),
    (r"aiortc/rtp\.py", "RTP/RTCP packet parsing (aiortc/rtp.py)"),
    (r"aiortc/jitterbuffer\.py", "jitter buffer (aiortc)"),
    (r"aiortc/codecs/h264\.py", "H.264 depayload (aiortc/codecs/h264.py)"),
    (r"aiortc/codecs/", "other RTP depayload (aiortc/codecs)"),
    (r"aiortc/rate\.py", "receive bandwidth estimation, REMB (aiortc/rate.py)"),
    (r"aiortc/rtcrtpreceiver\.py", "RTP receiver: stats, NACK, RTCP, queues (aiortc)"),
    (r"aiortc/(rtcicetransport|rtcpeerconnection|rtcsctptransport|rtcrtpsender)\.py", "aiortc other transports"),
    (r"aiortc/", "aiortc other"),
    (r"aioice/", "ICE/STUN, UDP datagram receive (aioice)"),
    (r"mediaserver/media/opus_aac\.py", "Opus -> AAC transcode (ours, receive threads)"),
    (r"mediaserver/transport/webrtc_decoders\.py", "receive-thread hand-off (ours: webrtc_decoders)"),
    (r"mediaserver/proto/h264\.py", "Annex B -> AVCC access units (ours: proto/h264)"),
    (r"mediaserver/proto/rtp_clock\.py", "RTP -> ms timeline (ours: proto/rtp_clock)"),
    (r"mediaserver/(hls|media)/", "HLS segmenting and muxing (ours + PyAV)"),
    (r"mediaserver/logic/", "session logic (ours)"),
    (r"mediaserver/runtime/", "session runtime and effects (ours)"),
    (r"mediaserver/transport/whip_server\.py", "WHIP transport: consume, hold, flush (ours)"),
    (r"mediaserver/transport/(http_server|admin_server|static_files)\.py", "HTTP (playlists, API)"),
    (r"aiohttp/", "HTTP (aiohttp)"),
    (r"mediaserver/", "mediaserver other"),
    (r"^av/|/av/", "PyAV (other)"),
    (r"^(threading|queue)\.py", "thread hand-off: queue wait/wake, GIL (receive threads)"),
]
# Entry frames at the root of every stack: never the component a sample belongs to.
SKIPPED = re.compile(r"mediaserver/(__main__|cli)\.py|<frozen runpy>")
# Left out of the inclusive list: every sample of a thread passes through them.
ENTRY_POINTS = re.compile(
    r"mediaserver/(__main__|cli)\.py|<frozen runpy>|uvloop/__init__\.py|asyncio/runners\.py|"
    r"Thread\.(_bootstrap|_bootstrap_inner|run) \(threading\.py"
)
_FRAME_FILE = re.compile(r"\((.*?)(?::\d+)?\)$")


def _frame_key(frame: str) -> str:
    return re.sub(r":\d+\)$", ")", frame)


def _frame_file(frame: str) -> str:
    m = _FRAME_FILE.search(frame)
    return m.group(1) if m else frame


def _thread_group(label: str) -> str:
    if "MainThread" in label:
        return "event loop thread (MainThread)"
    name = label.split(":", 1)[1].strip() if ":" in label else label
    return re.sub(r"\d+", "N", name) or "unnamed thread"


def analyse_profile(raw: Path, top: int = 20) -> dict:
    """py-spy's raw (collapsed stacks) output -> self and inclusive samples per function,
    samples per component and per thread."""
    self_samples: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    components: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    compiled = [(re.compile(p), name) for p, name in COMPONENTS]
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        try:
            count = int(count_text)
        except ValueError:
            continue
        frames = stack.split(";")
        if frames and frames[0].startswith("thread ("):
            threads[_thread_group(frames[0])] += count
            frames = frames[1:]
        if not frames:
            continue
        total += count
        self_samples[_frame_key(frames[-1])] += count
        for key in {_frame_key(f) for f in frames}:
            inclusive[key] += count
        component = None
        for frame in reversed(frames):
            path = _frame_file(frame)
            if SKIPPED.search(path):
                continue
            for pattern, name in compiled:
                if pattern.search(path):
                    component = name
                    break
            if component:
                break
        if component is None:
            leaf = _frame_file(frames[-1])
            if re.search(r"asyncio/|uvloop/|selectors", leaf):
                component = "event loop itself (uvloop's C code under the loop: poll, recvfrom, callbacks)"
            else:
                component = f"other (leaf in {leaf})"
        components[component] += count
    return {
        "total": total,
        "self": self_samples.most_common(top),
        "inclusive": [kv for kv in inclusive.most_common() if not ENTRY_POINTS.search(kv[0])][:top],
        "components": components.most_common(),
        "threads": threads.most_common(),
    }


PROFILE_MODES = {
    "gil": ("--gil", ("samples of the thread holding the GIL (Python work; C code that releases the GIL,"
                      " such as FFmpeg's codecs, libsrtp and system calls, is not in them)")),
    "active": ("--nonblocking", ("samples of threads py-spy takes as running (it also takes threads waiting"
                                 " in Condition.wait / the event loop's poll as running: over-counts)")),
    "native": ("--native", ("samples with C frames, the server paused at each sample (inflates its CPU in this"
                            " step; waits in libc are counted as running)")),
}


def thread_names(py_spy: str, pid: int) -> dict[int, str]:
    """OS thread id -> Python thread name, from one `py-spy dump` (not pausing the server)."""
    try:
        out = subprocess.run([py_spy, "dump", "--pid", str(pid), "--json", "--nonblocking"], check=False,
                             capture_output=True, text=True, timeout=30).stdout
        return {int(t["os_thread_id"]): str(t.get("thread_name") or "unnamed") for t in json.loads(out)
                if t.get("os_thread_id")}
    except (OSError, ValueError, KeyError, TypeError, subprocess.TimeoutExpired):
        return {}


def thread_groups(names: dict[int, str], deltas: dict[int, tuple[int, ...]], pid: int) -> list[tuple[str, int, list]]:
    """/proc figures of the server's threads grouped by their Python name:
    [(group, threads, [utime, stime, voluntary, involuntary switches])]."""
    groups: dict[str, list] = {}
    counts: Counter[str] = Counter()
    for tid, delta in deltas.items():
        label = names.get(tid)
        name = "event loop thread (MainThread)" if tid == pid else (
            re.sub(r"\d+", "N", label) if label else "native threads (no Python thread state)")
        acc = groups.setdefault(name, [0, 0, 0, 0])
        for i, v in enumerate(delta):
            acc[i] += v
        counts[name] += 1
    return sorted(((g, counts[g], v) for g, v in groups.items()), key=lambda x: -(x[2][0] + x[2][1]))


def describe_profile(profile: dict, r: dict, rate: float, mode: str, saved: Path | None) -> str:
    """Samples per component and function, as % of all samples and as % of a core per
    publisher (samples / rate = CPU seconds; / media seconds sent = per publisher)."""
    total = profile["total"]
    if not total:
        return "    profile: no samples"
    media = r["media_s"]
    pub = lambda n: 100 * n / rate / media
    wall = r["wall"]
    lines = [
        "    threads (/proc, % of a core; per publisher; user/sys; context switches per s, voluntary/involuntary):",
    ]
    for name, count, (ut, st, vol, invol) in r.get("thread_groups", []):
        cpu = 100 * (ut + st) / TICK / wall
        lines.append(f"      {cpu:6.1f} % {cpu / r['n']:6.2f} %pub  user {100 * ut / TICK / wall:5.1f} sys"
                     f" {100 * st / TICK / wall:5.1f}  switches {vol / wall:6.0f}/{invol / wall:<5.0f}"
                     f" {name} x{count}")
    lines += [
        f"    profile (py-spy --{mode}, {rate:g} Hz): {total} {PROFILE_MODES[mode][1]}"
        f" = {100 * total / rate / wall:.0f} % of a core (the server's CPU by /proc: {r['server_core_pct']:.0f} %);"
        f" %pub = % of a core per publisher" + (f"; raw stacks: {saved}" if saved else ""),
        "    by thread: " + ", ".join(f"{name} {100 * n / total:.0f} %" for name, n in profile["threads"]),
        "    where the time goes (each sample to the innermost frame of a known component):",
    ]
    for name, n in profile["components"]:
        if n / total >= 0.005:
            lines.append(f"      {100 * n / total:5.1f} %  {pub(n):6.3f} %pub  {name}")
    lines.append("    top functions by own time (self):")
    for key, n in profile["self"]:
        lines.append(f"      {100 * n / total:5.1f} %  {pub(n):6.3f} %pub  {key[:150]}")
    lines.append("    top functions by inclusive time (self + callees; entry points left out):")
    for key, n in profile["inclusive"]:
        lines.append(f"      {100 * n / total:5.1f} %  {pub(n):6.3f} %pub  {key[:150]}")
    return "\n".join(lines)


# ------------------------------------------------------------------ one step


def whip_config(work: Path, ports: list[int], n: int, shared_port: bool) -> str:
    """rtmp_ingest's config (limits raised to N + 10, previews off) + WebRTC on 127.0.0.1:
    a UDP port per peer connection from a free range, or one port shared by all."""
    if shared_port:
        ice = f"udp_port = {free_udp_range(1)}\n"
    else:
        size = n + 16
        base = free_udp_range(size)
        ice = f"port_min = {base}\nport_max = {base + size - 1}\n"
    return mediaserver_config(work, ports, n, previews=False) + f'[webrtc]\nhost_addresses = ["127.0.0.1"]\n{ice}'


def start_server(command: list[str], work: Path, ports: list[int], n: int, shared_port: bool) -> subprocess.Popen:
    server, log = serve_mediaserver(command, work, whip_config(work, ports, n, shared_port), ports[1])
    if server is None:
        raise RuntimeError(f"mediaserver did not start:\n{log}")
    return server


def run_step(clip: Path, n: int, args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="ms-whip-bench-"))
    ports = [free_port() for _ in range(3)]
    server = None
    profiler = None
    publishers = None
    result: dict = {"n": n}
    try:
        server = start_server(shlex.split(args.server_cmd), work, ports, n, args.shared_udp_port)
        pid = server.pid
        urls = [f"http://127.0.0.1:{ports[1]}/live/w{i}/whip" for i in range(n)]
        playlists = [work / "data" / "hls" / f"w{i}" / "index.m3u8" for i in range(n)]
        time.sleep(1.0)
        idle_rss = rss_kb(tree(pid))
        start_budget = 20 + 1.5 * n  # Python + aiortc start-up of N processes on these cores
        max_seconds = start_budget + args.warmup + args.duration + 60
        drops0 = udp_drops()
        publishers = WhipPublishers(clip, urls, work, max_seconds)
        keeper = SegmentKeeper(playlists, work / "keep")
        keeper.start()
        try:
            begun = time.monotonic()
            while time.monotonic() - begun < start_budget and not publishers.all_sending():
                if publishers.died() == n:
                    break
                time.sleep(0.25)
            result["start_s"] = time.monotonic() - begun
            result["late_start"] = not publishers.all_sending()
            time.sleep(args.warmup)

            pids = tree(pid)
            c0, (b0, t0) = cpu_ticks(pids), machine_ticks()
            pub0 = {p: cpu_ticks([p]) for p in publishers.pids}
            drops_w0 = udp_drops()
            sched0 = schedstat(pid, pid)
            sampler = ThreadStateSampler(pid, pid)
            sampler.start()
            th0, own0 = thread_stats(pid), cpu_ticks([os.getpid()])
            m0, s0, w0 = publishers.media_seconds(), keeper.counts(), time.monotonic()
            if args.profile:
                profiler = start_profiler(pid, work, args)
            time.sleep(args.duration)
            pids = tree(pid)
            c1, (b1, t1) = cpu_ticks(pids), machine_ticks()
            pub1 = {p: cpu_ticks([p]) for p in publishers.pids}
            drops_w1 = udp_drops()
            sched1 = schedstat(pid, pid)
            loop_states = sampler.stop()
            th1, own1 = thread_stats(pid), cpu_ticks([os.getpid()])
            m1, s1, w1 = publishers.media_seconds(), keeper.counts(), time.monotonic()
            prof_ticks = cpu_ticks([profiler.pid]) if profiler is not None and profiler.poll() is None else 0
            names = thread_names(args.py_spy, pid) if args.profile else {}
            loaded_rss = rss_kb(pids)
            pub_rss = rss_kb(list(pub1)) / max(len(pub1), 1)
            result["server_exit"] = server.poll()
            result["publishers_died"] = publishers.died()
            if profiler is not None:
                try:
                    profiler.wait(30)
                except subprocess.TimeoutExpired:
                    stop(profiler, signal.SIGINT, 10)
        finally:
            publishers.stop()
            try:
                keeper.wait_settled(timeout=20.0, want_endlist=True)
            finally:
                keeper.stop()
        drops1 = udp_drops()
        wall = w1 - w0
        # publishers that exited in the window took their CPU figures with them: counted are the others
        alive = [p for p in pub1 if p in pub0]
        pub_ticks = sum(pub1[p] - pub0[p] for p in alive)
        media = sum(max(b - a, 0.0) for a, b in zip(m0, m1))
        cpu_s = (c1 - c0) / TICK
        deltas = thread_deltas(th0, th1)
        main_ticks = sum(deltas.get(pid, (0, 0))[:2])
        other_ticks = sum(d[0] + d[1] for tid, d in deltas.items() if tid != pid)
        user_ticks = sum(d[0] for d in deltas.values())
        switches = [sum(d[i] for d in deltas.values()) for i in (2, 3)]
        new_segments = [b - a for a, b in zip(s0, s1)]
        machine_pct = 100 * (b1 - b0) / max(t1 - t0, 1)
        clients = publishers.results()
        result.update(
            wall=wall,
            cpu_s=cpu_s,
            cpu_ticks=c1 - c0,
            server_core_pct=100 * cpu_s / wall,
            main_core_pct=100 * main_ticks / TICK / wall,
            threads_core_pct=100 * other_ticks / TICK / wall,
            user_share=user_ticks / max(main_ticks + other_ticks, 1),
            switches_per_s=[x / wall for x in switches],
            media_s=media,
            realtime=media / (n * wall),
            cpu_pct_per_stream=100 * cpu_s / media if media > 0 else float("nan"),
            idle_rss_mb=idle_rss / 1024,
            loaded_rss_mb=loaded_rss / 1024,
            rss_per_stream_mb=(loaded_rss - idle_rss) / 1024 / n,
            publisher_rss_mb=pub_rss / 1024,
            machine_pct=machine_pct,
            publishers_core_pct=100 * pub_ticks / TICK / wall,
            publishers_measured=len(alive),
            bench_core_pct=100 * (own1 - own0) / TICK / wall,
            profiler_core_pct=100 * prof_ticks / TICK / wall,
            other_core_pct=max(machine_pct * CPUS - 100 * (c1 - c0 + pub_ticks + own1 - own0 + prof_ticks) / TICK / wall, 0),
            udp_drops_window=drops_w1 - drops_w0,
            loop_on_cpu=(sched1[0] - sched0[0]) / 1e9 / wall,
            loop_waiting_cpu=(sched1[1] - sched0[1]) / 1e9 / wall,
            loop_states=loop_states,
            udp_drops_step=drops1 - drops0,
            segments_min=min(new_segments),
            segments_max=max(new_segments),
            no_playlist=sum(1 for k, m in zip(keeper.kept, keeper.missed) if not k and not m),
            no_endlist=sum(1 for e in keeper.ended if not e),
            missed_segments=sum(len(m) for m in keeper.missed),
            sent=publishers.final_frames(),
            publisher_errors=publishers.errors(),
            publishers_signalled=publishers.signalled,
            failed_publishers=sum(1 for c in clients if c.get("status") != 201 or c.get("delete_status") != 200),
            failures=[f"w{i}: status {c.get('status')}, DELETE {c.get('delete_status')}, peer connection"
                      f" {'/'.join(c.get('states', [])) or '?'}, sent {c.get('sent')}"
                      for i, c in enumerate(clients) if c.get("status") != 201 or c.get("delete_status") != 200],
            own_counters=server_metrics(ports[1]),
        )
        stop(server, signal.SIGTERM, 20)
        lines = (work / "log").read_text(errors="replace").splitlines()
        result["errors"] = [l for l in lines if re.search(r" (ERROR|CRITICAL) |^Traceback", l)]
        if result["server_exit"] is not None:
            result["errors"].insert(0, f"mediaserver exited during the window (status {result['server_exit']})")
        result["warnings"] = [l for l in lines if " WARNING " in l]
        count_frames(result, work)
        raw = work / "profile.txt"
        if args.profile and raw.exists() and raw.stat().st_size:
            saved = CACHE / f"whip-profile-N{n}.txt"
            shutil.copy(raw, saved)
            result["profile"] = analyse_profile(raw, args.profile_top)
            result["profile_file"] = saved
            result["thread_groups"] = thread_groups(names, deltas, pid)
        elif args.profile:
            result["profile_error"] = (work / "profile.log").read_text(errors="replace")[-500:] if (
                work / "profile.log").exists() else "py-spy wrote nothing"
        return result
    finally:
        if profiler is not None:
            stop(profiler, signal.SIGKILL)
        if publishers is not None:
            for p in publishers.procs:
                stop(p, signal.SIGKILL, 5)
        if server is not None:
            stop(server, signal.SIGKILL)
        shutil.rmtree(work, ignore_errors=True)


def start_profiler(pid: int, work: Path, args) -> subprocess.Popen:
    command = [args.py_spy, "record", "--pid", str(pid), "--duration", f"{max(int(args.duration), 1)}",
               "--rate", f"{args.profile_rate:g}", "--threads", "--format", "raw", "-o", str(work / "profile.txt")]
    # gil and active read the server's memory without stopping it; --native needs its threads
    # stopped while their C stacks are read (the server is paused at every sample then).
    command.append(PROFILE_MODES[args.profile][0])
    if args.profile == "gil":
        command.append("--nonblocking")
    return spawn(command, stdout=subprocess.DEVNULL, stderr=open(work / "profile.log", "wb"))


# ------------------------------------------------------------------ report


def describe(r: dict) -> str:
    frames = (
        f"{r['sent_total']} video frames sent, {r['written']} in listed segments: "
        f"{r['lost']} lost ({r['streams_losing']} streams)"
        + (f", {r['extra']} extra" if r["extra"] else "")
        + (f", {r['unclean_publishers']} publishers did not end cleanly (not counted)" if r["unclean_publishers"] else "")
    )
    per_pub = r["cpu_pct_per_stream"]
    lines = [
        f"  server: CPU {r['cpu_s']:.2f} s in {r['wall']:.1f} s = {r['server_core_pct']:.1f} % of a core"
        f" (event loop thread {r['main_core_pct']:.1f} + other threads {r['threads_core_pct']:.1f};"
        f" {100 * r['user_share']:.0f} % user; {r['switches_per_s'][0] / r['n']:.0f} + {r['switches_per_s'][1] / r['n']:.0f}"
        f" context switches per s per publisher)"
        f" -> {per_pub:.2f} % of a core per publisher = {100 / per_pub if per_pub > 0 else float('inf'):.1f}"
        f" publishers per core (target >= {TARGET_PER_CORE}: {mark(per_pub <= 100 / TARGET_PER_CORE)})"
        + (f" [+-{100 / max(r['cpu_ticks'], 1):.0f} %: {r['cpu_ticks']} clock ticks]" if r["cpu_ticks"] < 200 else ""),
        f"    RSS {r['idle_rss_mb']:.1f} -> {r['loaded_rss_mb']:.1f} MB ({r['rss_per_stream_mb']:+.2f} MB per added"
        f" publisher); each publisher process: {r['publishers_core_pct'] / max(r['publishers_measured'], 1):.1f} % of a core,"
        f" {r['publisher_rss_mb']:.0f} MB RSS",
        f"    machine {r['machine_pct']:.0f} % of {CPUS} cores busy = server {r['server_core_pct']:.0f} + publishers"
        f" {r['publishers_core_pct']:.0f} + this script {r['bench_core_pct']:.0f}"
        + (f" + profiler {r['profiler_core_pct']:.0f}" if r["profiler_core_pct"] else "")
        + f" + anything else {r['other_core_pct']:.0f} (% of one core); media sent at {r['realtime']:.3f}x real time"
        + (" (publishers fell behind: machine saturated?)" if r["realtime"] < 0.97 else ""),
        f"    segments per stream in the window: {r['segments_min']}..{r['segments_max']}"
        f" (expect ~{r['wall'] / 2:.0f}); streams without a playlist: {r['no_playlist']}; without ENDLIST at the end:"
        f" {r['no_endlist']}; listed segments gone before kept: {r['missed_segments']}",
        f"    event loop thread: on a CPU {100 * r['loop_on_cpu']:.0f} % of the window, runnable but waiting for a CPU"
        f" {100 * r['loop_waiting_cpu']:.0f} % (/proc schedstat); sampled: "
        + ", ".join(f"{k} {100 * v:.0f} %" for k, v in r["loop_states"].items()),
        f"    frames: {frames}; {r['own_counters']}; UDP datagrams dropped on full receive buffers (whole"
        f" machine, /proc/net/snmp RcvbufErrors): {r['udp_drops_window']} in the window, {r['udp_drops_step']} in"
        f" the step",
        f"    publishers: {r['n']} started in {r['start_s']:.1f} s" + (" (not all sending in time)" if r["late_start"] else "")
        + f"; failed (not 201 + DELETE 200): {r['failed_publishers']}; died during window: {r['publishers_died']};"
        f" stderr lines: {len(r['publisher_errors'])}"
        + (f"; {r['publishers_signalled']} ignored q and got SIGINT" if r["publishers_signalled"] else "")
        + f"; server log: {len(r['errors'])} errors, {len(r['warnings'])} warnings",
    ]
    for line in (r["errors"] + r["warnings"])[:3] + r["publisher_errors"][:3] + r["failures"][:3]:
        lines.append(f"      | {line[:200]}")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    head = (
        f"{'N':>3} | {'srv %core/pub':>13} | {'pubs/core':>9} | {'loop/thr %core':>14} | {'RSS MB/+pub':>11} |"
        f" {'pub %core each':>14} | {'machine busy':>12} | {'else %core':>10} | {'realtime':>8} | {'lost/err/fail':>13}"
    )
    out = [head, "-" * len(head)]
    for r in rows:
        per = r["cpu_pct_per_stream"]
        lost = f"{r['lost']}/{len(r['errors'])}/{r['failed_publishers']}" + ("?" if r["unclean_publishers"] else "")
        out.append(
            f"{r['n']:>3} | {per:>13.2f} | {100 / per if per > 0 else 0:>9.1f} |"
            f" {r['main_core_pct']:>6.1f}/{r['threads_core_pct']:<7.1f} | {r['rss_per_stream_mb']:>11.2f} |"
            f" {r['publishers_core_pct'] / max(r['publishers_measured'], 1):>14.1f} | {r['machine_pct']:>11.0f}% | {r['other_core_pct']:>10.0f} |"
            f" {r['realtime']:>7.3f}x | {lost:>13}"
        )
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--publishers", default="1,5,10", help="comma-separated publisher counts (default 1,5,10)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds measured per step (default 20)")
    parser.add_argument("--warmup", type=float, default=5.0,
                        help="seconds after every publisher sends before the window (default 5)")
    parser.add_argument("--profile", nargs="?", const="gil", default=None, choices=sorted(PROFILE_MODES),
                        help="sample the server with py-spy over each window: gil (default: the thread holding the"
                             " GIL), active (every thread py-spy takes as running), native (with C frames; pauses"
                             " the server at each sample)")
    parser.add_argument("--profile-rate", type=float, default=100.0, help="py-spy samples per second (default 100)")
    parser.add_argument("--profile-top", type=int, default=20, help="functions listed per profile (default 20)")
    parser.add_argument("--video-only", action="store_true",
                        help="publish the clip without its audio: H.264 passthrough alone, no Opus -> AAC")
    parser.add_argument("--shared-udp-port", action="store_true",
                        help="[webrtc] udp_port: one UDP port for every peer connection (default: a port each)")
    parser.add_argument("--server-cmd", default=f"{sys.executable} -m mediaserver",
                        help="command that runs mediaserver; `serve --config FILE` is appended (to benchmark another build)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))

    counts = [int(x) for x in args.publishers.split(",") if x.strip()]
    if not counts or min(counts) < 1 or max(counts) > 100:
        parser.error("--publishers: counts from 1 to 100")
    args.py_spy = find_py_spy() if args.profile else None
    if args.profile and args.py_spy is None:
        print("py-spy not found: `.venv/bin/pip install py-spy` (PyPI) to profile; going on without a profile")
        args.profile = None
    clip = make_clip()
    if args.video_only:
        clip = video_only(clip)
    estimate = sum(args.duration + args.warmup + 12 + 1.2 * n for n in counts)
    print(f"clip: {clip} ({clip.stat().st_size * 8 / CLIP_SECONDS / 1e6:.1f} Mbit/s with MPEG-TS overhead); {CPUS} cores;"
          f" steps N={counts}, {args.duration:g} s window each; about {estimate / 60:.0f} min", flush=True)
    rows = []
    interrupted = False
    begun = time.monotonic()
    try:
        for n in counts:
            print(f"\nN={n}", flush=True)
            r = run_step(clip, n, args)
            print(describe(r), flush=True)
            if "profile" in r:
                print(describe_profile(r["profile"], r, args.profile_rate, args.profile, r.get("profile_file")), flush=True)
            elif "profile_error" in r:
                print(f"    profile failed: {r['profile_error']}", flush=True)
            rows.append(r)
    except KeyboardInterrupt:
        print("\ninterrupted: every process started was stopped; partial results below", flush=True)
        interrupted = True

    print(f"\nsummary ({time.monotonic() - begun:.0f} s; srv %core/pub = server CPU per publisher as % of one core;"
          " loop/thr = server's event loop thread / other threads, % of one core; RSS MB/+pub = (loaded - idle) / N;"
          " else = machine busy time that was not server, publishers or this script, % of one core;"
          " lost/err/fail = video frames lost / server log errors / publishers failed)\n")
    print(table(rows))
    if len(rows) > 1:
        steps = [(r["n"], r["server_core_pct"]) for r in rows]
        marginal = [((cb - ca) / (b - a), a, b) for (a, ca), (b, cb) in itertools.pairwise(steps) if b != a]
        print("marginal server CPU per added publisher (% of a core): "
              + ", ".join(f"{a}->{b}: {m:.2f} (= {100 / m if m > 0 else 0:.0f} per core)" for m, a, b in marginal))
    print(f"\ntarget: >= {TARGET_PER_CORE} H.264 passthrough publishers per core"
          f" (<= {100 / TARGET_PER_CORE:.2f} % of a core per publisher); publishers' own CPU is not the server's")
    disturbed = [f"N={r['n']}" for r in rows if r["other_core_pct"] > 20]
    if disturbed:
        print(f"note: other processes used over 20 % of a core during {', '.join(disturbed)}"
              " (see 'anything else'): figures there are noisy; repeat on an idle machine")
    worst = max((r["machine_pct"] for r in rows), default=0)
    if worst > 90:
        print(f"note: the machine was {worst:.0f} % busy in some step (publishers share its {CPUS} cores):"
              " the server competed with its publishers; its CPU per publisher there is what it spent, not what"
              " it would need alone")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
