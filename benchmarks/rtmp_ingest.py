"""RTMP -> HLS ingest cost: mediaserver against nginx-rtmp, same clip, same run.

Pushes N copies of a 1080p30 ~5 Mbit/s H.264 + AAC clip with the ffmpeg CLI
(`-re -stream_loop -1 -c copy`, one stream name each) to the server, and over
a steady window (after a warm-up) measures:

- the server's CPU: utime + stime of the server's processes from
  /proc/PID/stat (mediaserver: its one process; nginx: master + worker),
  reaped children excluded, per second of media the publishers sent
  (= % of one core per stream);
- its RSS (VmRSS) idle before the publishers and loaded at the end of the
  window, and (loaded - idle) / N per added stream;
- the machine's total CPU (/proc/stat) and the publishers' own CPU, since the
  N ffmpeg processes run on the same 2 cores;
- frames lost, independently of the server's own counters: every segment a
  playlist lists is hard-linked aside before the server's window deletes it;
  after the publishers stop, the video frames in those segments (PyAV demux)
  are compared with the frames each publisher says it sent (`-progress`
  frame=, final block). Also: every stream has a playlist, each stream kept
  producing segments during the window, and the server log has no errors.

Then the same with nginx + libnginx-mod-rtmp (`hls on`, 1 worker), and a
table of both. See benchmarks/README.md for what each figure means.

    .venv/bin/python benchmarks/rtmp_ingest.py [--streams 1,10,50,100] [--duration 20]
        [--previews] [--skip-nginx] [--skip-mediaserver] [--server-cmd CMD]

`--previews` also runs mediaserver with thumbnails and audio levels on, with
and without a viewer fetching every thumbnail every 5 s, and prints the
extra CPU they cost.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _ingest_lib import (  # noqa: E402
    TICK,
    Publishers,
    SegmentKeeper,
    count_video_frames,
    cpu_ticks,
    free_port,
    machine_ticks,
    rss_kb,
    serve_mediaserver,
    spawn,
    stop,
    tree,
    wait_port,
)

CACHE = Path(tempfile.gettempdir()) / "mediaserver-bench"
CPUS = os.cpu_count() or 1


def make_clip() -> Path:
    """20 s of testsrc2 + temporal noise (so x264 really spends ~5 Mbit/s), 2 s GOP, AAC 128k, FLV."""
    CACHE.mkdir(exist_ok=True)
    clip = CACHE / "1080p30-5mbps.flv"
    if not clip.exists():
        print("encoding the 1080p30 test clip (once, ~1 min)...", flush=True)
        subprocess.run(
            ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc2=size=1920x1080:rate=30",
             "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000", "-t", "20",
             "-vf", "noise=alls=12:allf=t", "-c:v", "libx264", "-preset", "veryfast", "-b:v", "5M",
             "-maxrate", "5M", "-bufsize", "5M", "-g", "60", "-keyint_min", "60", "-sc_threshold", "0",
             "-c:a", "aac", "-b:a", "128k", "-f", "flv", str(clip) + ".tmp"],
            check=True,
        )
        os.replace(str(clip) + ".tmp", clip)
    return clip


# ------------------------------------------------------------------ one measured run


def measure(server, server_pids, urls, playlists, clip, work: Path, args, *, want_endlist: bool, viewer=None) -> dict:
    """Publish to `urls`, measure the server over the window, stop the publishers,
    collect the segments `playlists` listed. Frames are counted later (count_frames)."""
    n = len(urls)
    time.sleep(1.0)
    idle_rss = rss_kb(server_pids())
    publishers = Publishers(clip, urls, work)
    keeper = SegmentKeeper(playlists, work / "keep")
    keeper.start()
    stop_viewer = threading.Event()
    if viewer is not None:
        threading.Thread(target=viewer, args=(stop_viewer,), daemon=True).start()
    result: dict = {"n": n}
    try:
        warmup = args.warmup if args.warmup is not None else max(4.0, 2.0 + 0.05 * n)
        started = time.monotonic()
        while time.monotonic() - started < warmup + 10 and not publishers.all_sending():
            time.sleep(0.25)
        result["late_start"] = not publishers.all_sending()
        time.sleep(max(warmup - (time.monotonic() - started), 0))

        pids = server_pids()
        c0, (b0, t0), p0 = cpu_ticks(pids), machine_ticks(), cpu_ticks(publishers.pids)
        own0 = cpu_ticks([os.getpid()])
        m0, s0, w0 = publishers.media_seconds(), keeper.counts(), time.monotonic()
        time.sleep(args.duration)
        pids = server_pids()
        c1, (b1, t1), p1 = cpu_ticks(pids), machine_ticks(), cpu_ticks(publishers.pids)
        own1 = cpu_ticks([os.getpid()])
        m1, s1, w1 = publishers.media_seconds(), keeper.counts(), time.monotonic()
        loaded_rss = rss_kb(pids)
        result["server_exit"] = server.poll()
        result["publishers_died"] = publishers.died()
    finally:
        stop_viewer.set()
        publishers.stop()
        try:
            keeper.wait_settled(timeout=15.0, want_endlist=want_endlist)
        finally:
            keeper.stop()
    wall = w1 - w0
    media = sum(max(b - a, 0.0) for a, b in zip(m0, m1))
    cpu_s = (c1 - c0) / TICK
    new_segments = [b - a for a, b in zip(s0, s1)]
    result.update(
        wall=wall,
        cpu_s=cpu_s,
        cpu_ticks=c1 - c0,
        server_core_pct=100 * cpu_s / wall,
        media_s=media,
        realtime=media / (n * wall),
        # % of one core per stream = CPU seconds per second of media, x100
        cpu_pct_per_stream=100 * cpu_s / media if media > 0 else float("nan"),
        idle_rss_mb=idle_rss / 1024,
        loaded_rss_mb=loaded_rss / 1024,
        rss_per_stream_mb=(loaded_rss - idle_rss) / 1024 / n,
        machine_pct=100 * (b1 - b0) / max(t1 - t0, 1),
        publishers_core_pct=100 * (p1 - p0) / TICK / wall,
        bench_core_pct=100 * (own1 - own0) / TICK / wall,
        # busy time of the whole machine not explained by the server, publishers or this script
        other_core_pct=max(100 * (b1 - b0) / max(t1 - t0, 1) * CPUS - 100 * (c1 - c0 + p1 - p0 + own1 - own0) / TICK / wall, 0),
        segments_min=min(new_segments),
        segments_max=max(new_segments),
        no_playlist=sum(1 for k, m in zip(keeper.kept, keeper.missed) if not k and not m),
        missed_segments=sum(len(m) for m in keeper.missed),
        sent=publishers.final_frames(),
        publisher_errors=publishers.errors(),
        publishers_signalled=publishers.signalled,
    )
    return result


def count_frames(result: dict, work: Path) -> None:
    started = time.monotonic()
    written = count_video_frames(work / "keep", result["n"])
    sent = result["sent"]
    lost = [s - w for s, w in zip(sent, written) if s is not None]
    result.update(
        written=sum(written),
        sent_total=sum(s for s in sent if s is not None),
        unclean_publishers=sum(1 for s in sent if s is None),
        lost=sum(x for x in lost if x > 0),
        extra=sum(-x for x in lost if x < 0),
        streams_losing=sum(1 for x in lost if x > 0),
        count_seconds=time.monotonic() - started,
    )


# ------------------------------------------------------------------ mediaserver


def thumbnail_viewer(http_port: int, n: int, interval: float = 5.0):
    """Fetches every stream's thumbnail every `interval` s, as an open status page does."""

    def view(stop_event: threading.Event) -> None:
        while not stop_event.wait(interval):
            for i in range(n):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{http_port}/live/s{i}/thumbnail.jpg", timeout=5).read()
                except OSError:
                    pass

    return view


def mediaserver_config(work: Path, ports: list[int], n: int, previews: bool | None) -> str:
    text = (
        f'data_dir = "{work}/data"\nlog_level = "warning"\n'
        f'[rtmp]\nhost = "127.0.0.1"\nport = {ports[0]}\n'
        f'[http]\nhost = "127.0.0.1"\nport = {ports[1]}\n'
        f'[admin]\nhost = "127.0.0.1"\nport = {ports[2]}\n'
        f"[hls]\nsegment_target = 2.0\nplaylist_size = 6\n"
    )
    if previews is not None:  # sections a build may not know: left out on a retry
        text += f"[limits]\nmax_connections_per_client = {n + 10}\nmax_connections = {n + 10}\nmax_streams = {n + 10}\n"
        text += (
            "[previews]\nthumbnail_interval = 5.0\nlevels_interval = 2.0\n"
            if previews else "[previews]\nthumbnail_interval = 0\nlevels_interval = 0\n"
        )
    return text


def start_mediaserver(command: list[str], work: Path, ports: list[int], n: int, previews: bool):
    for attempt in (previews, None):
        server, log = serve_mediaserver(command, work, mediaserver_config(work, ports, n, attempt), ports[1])
        if server is not None:
            return server, attempt is None
        if attempt is None or "unknown field" not in log:
            raise RuntimeError(f"mediaserver did not start:\n{log}")
    raise AssertionError


def server_metrics(http_port: int) -> str:
    """The server's own counters (frames received vs written), as a cross-check."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5).read().decode()
    except OSError as exc:
        return f"/metrics unavailable ({exc})"
    counts: dict[str, float] = {"in": 0.0, "out": 0.0}
    for line in text.splitlines():
        for kind in ("in", "out"):
            if line.startswith(f'mediaserver_stream_frames_{kind}_total{{') and 'track="video"' in line:
                counts[kind] += float(line.rsplit(" ", 1)[1])
    return f"own counters: {int(counts['in'])} video frames in, {int(counts['out'])} out"


def run_mediaserver(clip, n, args, previews: bool = False, viewer: bool = False) -> dict:
    work = Path(tempfile.mkdtemp(prefix="ms-bench-"))
    ports = [free_port() for _ in range(3)]
    server = None
    try:
        server, minimal = start_mediaserver(shlex.split(args.server_cmd), work, ports, n, previews)
        urls = [f"rtmp://127.0.0.1:{ports[0]}/live/s{i}" for i in range(n)]
        playlists = [work / "data" / "hls" / f"s{i}" / "index.m3u8" for i in range(n)]
        pid = server.pid
        result = measure(
            server, lambda: tree(pid), urls, playlists, clip, work, args, want_endlist=True,
            viewer=thumbnail_viewer(ports[1], n) if viewer else None,
        )
        result["own_counters"] = server_metrics(ports[1])
        result["note"] = "minimal config (build rejected [limits]/[previews])" if minimal else ""
        stop(server, signal.SIGTERM, 20)
        lines = (work / "log").read_text(errors="replace").splitlines()
        result["errors"] = [l for l in lines if re.search(r" (ERROR|CRITICAL) |^Traceback", l)]
        if result["server_exit"] is not None:
            result["errors"].insert(0, f"mediaserver exited during the window (status {result['server_exit']})")
        result["warnings"] = [l for l in lines if " WARNING " in l]
        count_frames(result, work)
        return result
    finally:
        if server is not None:
            stop(server, signal.SIGKILL)
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------ nginx


def ensure_nginx() -> Path | None:
    """nginx + libnginx-mod-rtmp, apt-get installed when missing (as root)."""
    module = Path("/usr/lib/nginx/modules/ngx_rtmp_module.so")
    if shutil.which("nginx") and module.exists():
        return module
    if os.geteuid() != 0:
        print("nginx with libnginx-mod-rtmp is not installed (root is needed to apt-get it): skipping nginx")
        return None
    print("installing nginx and libnginx-mod-rtmp with apt-get...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=False, env=env, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-qq", "nginx", "libnginx-mod-rtmp"], check=False, env=env,
                   stdout=subprocess.DEVNULL, timeout=900)
    if shutil.which("nginx") and module.exists():
        return module
    print("nginx / libnginx-mod-rtmp could not be installed: skipping nginx")
    return None


NGINX_CONF = """\
{user}
load_module {module};
worker_processes 1;
daemon off;
master_process on;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 4096; }}
rtmp {{
    server {{
        listen 127.0.0.1:{port};
        chunk_size 4096;
        application live {{
            live on;
            hls on;
            hls_path {work}/hls;
            hls_fragment 2s;
            hls_playlist_length 12s;
        }}
    }}
}}
"""


def run_nginx(clip, n, args, module: Path) -> dict:
    work = Path(tempfile.mkdtemp(prefix="nginx-bench-"))
    port = free_port()
    (work / "hls").mkdir()
    conf = work / "nginx.conf"
    # the worker runs as this same user (root here: the default `nobody` could not write the 0700 temp dir)
    user = "user root;" if os.geteuid() == 0 else ""
    conf.write_text(NGINX_CONF.format(user=user, module=module, work=work, port=port))
    master = spawn(["nginx", "-c", str(conf), "-p", str(work)],
                   stdout=subprocess.DEVNULL, stderr=open(work / "stderr", "wb"))
    try:
        if not wait_port(port, master, 15):
            raise RuntimeError(f"nginx did not start: {(work / 'stderr').read_text()} {(work / 'error.log').read_text()}")
        urls = [f"rtmp://127.0.0.1:{port}/live/s{i}" for i in range(n)]
        playlists = [work / "hls" / f"s{i}.m3u8" for i in range(n)]
        pid = master.pid
        result = measure(master, lambda: tree(pid), urls, playlists, clip, work, args, want_endlist=False)
        stop(master, signal.SIGQUIT, 10)
        lines = (work / "error.log").read_text(errors="replace").splitlines()
        result["errors"] = [l for l in lines if re.search(r"\[(error|crit|alert|emerg)\]", l)]
        if result["server_exit"] is not None:
            result["errors"].insert(0, f"nginx exited during the window (status {result['server_exit']})")
        result["warnings"] = [l for l in lines if "[warn]" in l]
        result["own_counters"] = ""
        result["note"] = ""
        count_frames(result, work)
        return result
    finally:
        stop(master, signal.SIGKILL)
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------ report


def describe(name: str, r: dict) -> str:
    frames = (
        f"{r['sent_total']} video frames sent, {r['written']} in listed segments: "
        f"{r['lost']} lost ({r['streams_losing']} streams)"
        + (f", {r['extra']} extra" if r["extra"] else "")
        + (f", {r['unclean_publishers']} publishers did not end cleanly (not counted)" if r["unclean_publishers"] else "")
    )
    lines = [
        f"  {name}: CPU {r['cpu_s']:.2f} s in {r['wall']:.1f} s = {r['server_core_pct']:.1f} % of a core"
        f" -> {r['cpu_pct_per_stream']:.3f} % of a core per stream ({r['cpu_pct_per_stream'] / 100:.5f} CPU-s per stream-s);"
        + (f" [+-{100 / max(r['cpu_ticks'], 1):.0f} %: {r['cpu_ticks']} clock ticks]" if r["cpu_ticks"] < 200 else "")
        + f" RSS {r['idle_rss_mb']:.1f} -> {r['loaded_rss_mb']:.1f} MB ({r['rss_per_stream_mb']:+.2f} MB per added stream)",
        f"    machine {r['machine_pct']:.0f} % of {CPUS} cores busy = server {r['server_core_pct']:.0f} + publishers"
        f" {r['publishers_core_pct']:.0f} + this script {r['bench_core_pct']:.0f} + anything else {r['other_core_pct']:.0f}"
        f" (% of one core);"
        f" media sent at {r['realtime']:.3f}x real time"
        + (" (publishers fell behind: machine saturated?)" if r["realtime"] < 0.97 else ""),
        f"    segments per stream in the window: {r['segments_min']}..{r['segments_max']}"
        f" (expect ~{r['wall'] / 2:.0f}); streams without a playlist: {r['no_playlist']};"
        f" listed segments gone before kept: {r['missed_segments']}",
        f"    frames: {frames}; counted in {r['count_seconds']:.1f} s"
        + (f"; {r['own_counters']}" if r["own_counters"] else ""),
        f"    log: {len(r['errors'])} errors, {len(r['warnings'])} warnings;"
        f" publishers died during window: {r['publishers_died']}; publisher error lines: {len(r['publisher_errors'])}"
        + (" (started late)" if r["late_start"] else "")
        + (f"; {r['publishers_signalled']} ignored q and were stopped by SIGINT" if r["publishers_signalled"] else "")
        + (f"; {r['note']}" if r["note"] else ""),
    ]
    for line in (r["errors"] + r["warnings"])[:3] + r["publisher_errors"][:2]:
        lines.append(f"      | {line[:200]}")
    return "\n".join(lines)


def mark(ok: bool) -> str:
    return "ok" if ok else "MISS"


def table(rows: list[dict]) -> str:
    head = (
        f"{'N':>4} | {'ms %core/str':>12} | {'nginx %core/str':>15} | {'ratio':>11} | {'ms RSS MB/+str':>14} |"
        f" {'nginx RSS MB/+str':>17} | {'ms lost/err':>11} | {'nginx lost/err':>14} | {'machine busy ms/ngx':>19}"
    )
    out = [head, "-" * len(head)]
    fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
    for row in rows:
        ms, ng = row.get("ms"), row.get("nginx")
        ratio = "-"
        if ms and ng and ng["cpu_pct_per_stream"] > 0:
            x = ms["cpu_pct_per_stream"] / ng["cpu_pct_per_stream"]
            ratio = f"{x:.2f}x {mark(x <= 2.0)}"
        ms_rss = f"{ms['rss_per_stream_mb']:.2f} {mark(ms['rss_per_stream_mb'] <= 8)}" if ms else "-"
        lost = lambda r: f"{r['lost']}/{len(r['errors'])}" + ("" if r["unclean_publishers"] == 0 else "?") if r else "-"  # noqa: E731
        ms_lost = lost(ms) + (f" {mark(ms['lost'] == 0 and not ms['errors'] and ms['no_playlist'] == 0)}" if ms else "")
        busy = " / ".join(f"{r['machine_pct']:.0f}%" if r else "-" for r in (ms, ng))
        out.append(
            f"{row['n']:>4} | {fmt(ms and ms['cpu_pct_per_stream'], '.3f'):>12} | {fmt(ng and ng['cpu_pct_per_stream'], '.3f'):>15} |"
            f" {ratio:>11} | {ms_rss:>14} | {fmt(ng and ng['rss_per_stream_mb'], '.2f'):>17} | {ms_lost:>11} |"
            f" {lost(ng):>14} | {busy:>19}"
        )
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", default="1,10,50,100", help="comma-separated stream counts (default 1,10,50,100)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds measured per step (default 20)")
    parser.add_argument("--warmup", type=float, default=None, help="seconds before the window (default max(4, 2 + N/20))")
    parser.add_argument("--previews", action="store_true", help="also measure mediaserver with thumbnails and levels on")
    parser.add_argument("--skip-nginx", action="store_true")
    parser.add_argument("--skip-mediaserver", action="store_true")
    parser.add_argument("--server-cmd", default=f"{sys.executable} -m mediaserver",
                        help="command that runs mediaserver; `serve --config FILE` is appended (to benchmark another build)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))

    counts = [int(x) for x in args.streams.split(",") if x.strip()]
    clip = make_clip()
    module = None if args.skip_nginx else ensure_nginx()
    servers = (0 if args.skip_mediaserver else 1 + 2 * args.previews) + (module is not None)
    estimate = sum(servers * (args.duration + max(4.0, 2 + 0.05 * n) + 9 + 0.2 * n) for n in counts)
    print(f"clip: {clip} ({clip.stat().st_size * 8 / 20 / 1e6:.1f} Mbit/s); {CPUS} cores; "
          f"steps N={counts}, {args.duration:g} s window each; about {estimate / 60:.0f} min", flush=True)
    rows = []
    interrupted = False
    begun = time.monotonic()
    try:
        for n in counts:
            row: dict = {"n": n}
            print(f"\nN={n}", flush=True)
            if not args.skip_mediaserver:
                row["ms"] = run_mediaserver(clip, n, args)
                print(describe("mediaserver", row["ms"]), flush=True)
                if args.previews:
                    row["ms_previews"] = run_mediaserver(clip, n, args, previews=True)
                    print(describe("mediaserver, previews on, nobody viewing", row["ms_previews"]), flush=True)
                    row["ms_viewed"] = run_mediaserver(clip, n, args, previews=True, viewer=True)
                    print(describe("mediaserver, previews on, every thumbnail fetched every 5 s", row["ms_viewed"]),
                          flush=True)
            if module is not None:
                row["nginx"] = run_nginx(clip, n, args, module)
                print(describe("nginx-rtmp", row["nginx"]), flush=True)
            rows.append(row)
    except KeyboardInterrupt:
        print("\ninterrupted: every process started was stopped; partial results below", flush=True)
        interrupted = True

    print(f"\nsummary ({time.monotonic() - begun:.0f} s; %core/str = server CPU per stream as % of one core;"
          f" RSS MB/+str = (loaded - idle RSS) / N; lost/err = video frames lost / server log errors)\n")
    print(table(rows))
    for key, label in (("ms", "mediaserver"), ("nginx", "nginx-rtmp")):
        steps = [(r["n"], r[key]["server_core_pct"]) for r in rows if key in r]
        if len(steps) > 1:
            print(f"{label}: marginal % of a core per added stream: " + ", ".join(
                f"{a}->{b}: {(cb - ca) / (b - a):.3f}" for (a, ca), (b, cb) in zip(steps, steps[1:]) if b != a))
    for row in rows:
        if "ms_previews" in row and "ms" in row:
            base = row["ms"]["cpu_pct_per_stream"]
            for key, label in (("ms_previews", "previews on, nobody viewing"),
                               ("ms_viewed", "previews on, every thumbnail fetched every 5 s")):
                if key in row:
                    v = row[key]["cpu_pct_per_stream"]
                    print(f"N={row['n']}: mediaserver {label}: {v:.3f} %core/stream, {100 * (v / base - 1):+.1f} % over"
                          " previews off" + ("   (target: under +20 %)" if key == "ms_viewed" else ""))
    print("\ntargets: CPU per stream <= 2x nginx-rtmp; <= 8 MB RSS per added stream; 100 streams without a lost frame")
    disturbed = [f"N={r['n']} {k}" for r in rows for k in ("ms", "nginx") if k in r and r[k]["other_core_pct"] > 20]
    if disturbed:
        print(f"note: other processes used over 20 % of a core during {', '.join(disturbed)}"
              " (see 'anything else' in each step): repeat those steps on an idle machine")
    worst = max((r.get(k, {}).get("machine_pct", 0) for r in rows for k in ("ms", "nginx")), default=0)
    if worst > 90:
        print(f"note: the machine was {worst:.0f} % busy in some step (publishers share its {CPUS} cores):"
              " figures from saturated steps understate what the server would need alone")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
