"""RTMP -> HLS ingest cost: mediaserver against nginx-rtmp, same clip, same run.

Pushes N copies of a 1080p30 ~5 Mbit/s H.264 + AAC clip with the ffmpeg CLI
(`-re -stream_loop -1 -c copy`), measures the server's CPU seconds per
stream-second (utime + stime of the server processes from /proc) over a
steady window, and its RSS per added stream; then does the same with nginx
+ libnginx-mod-rtmp (`hls on`, 1 worker). Prints both and their ratio, the
machine's total CPU use (the publishers run here too), and for mediaserver
whether every frame the publishers sent reached the HLS segments.

    .venv/bin/python benchmarks/rtmp_ingest.py [--streams 1,10,50,100] [--duration 20]
        [--previews] [--skip-nginx] [--skip-mediaserver]

`--previews` also runs mediaserver with thumbnails (every 5 s) and audio
levels on, and prints the extra CPU they cost.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CACHE = Path(tempfile.gettempdir()) / "mediaserver-bench"
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_clip() -> Path:
    CACHE.mkdir(exist_ok=True)
    clip = CACHE / "1080p30-5mbps.flv"
    if not clip.exists():
        print("encoding the 1080p30 test clip (once)...", flush=True)
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


def cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def rss_kb(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def machine_busy() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(x) for x in out]


def publish(clip: Path, url: str) -> subprocess.Popen:
    return subprocess.Popen(
        ["ffmpeg", "-v", "error", "-re", "-stream_loop", "-1", "-i", str(clip), "-c", "copy", "-f", "flv", url],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def measure(server_pids, urls, clip, duration, warmup=4.0, viewer=None):
    """Start publishers, wait, measure CPU and RSS of the server over `duration`.

    `viewer(stop_event)`, when given, runs in a thread meanwhile (e.g. fetching thumbnails).
    """
    import threading

    idle_rss = rss_kb(server_pids())
    publishers = [publish(clip, url) for url in urls]
    stop = threading.Event()
    if viewer is not None:
        threading.Thread(target=viewer, args=(stop,), daemon=True).start()
    try:
        time.sleep(warmup)
        pids = server_pids()
        c0, (b0, t0), w0 = cpu_ticks(pids), machine_busy(), time.monotonic()
        time.sleep(duration)
        pids = server_pids()
        c1, (b1, t1), w1 = cpu_ticks(pids), machine_busy(), time.monotonic()
        loaded_rss = rss_kb(pids)
        died = sum(1 for p in publishers if p.poll() is not None)
    finally:
        stop.set()
        for p in publishers:
            p.send_signal(signal.SIGINT)
        for p in publishers:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
    cpu_s = (c1 - c0) / TICK
    stream_seconds = len(urls) * (w1 - w0)
    return {
        "cpu_pct_per_stream": 100 * cpu_s / stream_seconds,
        "rss_per_stream_mb": (loaded_rss - idle_rss) / 1024 / len(urls),
        "machine_pct": 100 * (b1 - b0) / max(t1 - t0, 1) * os.cpu_count(),
        "publishers_died": died,
    }


# ---------------------------------------------------------------- mediaserver


def thumbnail_viewer(http_port: int, n: int, interval: float = 5.0):
    """Fetches every stream's thumbnail every `interval` s, as an open status page does."""

    def view(stop) -> None:
        while not stop.wait(interval):
            for i in range(n):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{http_port}/live/s{i}/thumbnail.jpg", timeout=5).read()
                except OSError:
                    pass

    return view


def run_mediaserver(clip, n, duration, previews: bool, command, viewer: bool = False):
    work = Path(tempfile.mkdtemp(prefix="ms-bench-"))
    ports = [free_port() for _ in range(3)]
    config = work / "config.toml"
    preview_lines = (
        "[previews]\nthumbnail_interval = 5.0\nlevels_interval = 2.0\n"
        if previews else "[previews]\nthumbnail_interval = 0\nlevels_interval = 0\n"
    )
    config.write_text(
        f'data_dir = "{work}/data"\nlog_level = "warning"\n'
        f'[rtmp]\nhost = "127.0.0.1"\nport = {ports[0]}\n'
        f'[http]\nhost = "127.0.0.1"\nport = {ports[1]}\n'
        f'[admin]\nhost = "127.0.0.1"\nport = {ports[2]}\n'
        f"[limits]\nmax_connections_per_client = {n + 10}\nmax_connections = {n + 10}\n" + preview_lines
    )
    server = subprocess.Popen([*command, "serve", "--config", str(config)], stderr=open(work / "log", "wb"))
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{ports[1]}/healthz", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("mediaserver did not start")
                time.sleep(0.1)
        urls = [f"rtmp://127.0.0.1:{ports[0]}/live/s{i}" for i in range(n)]
        result = measure(
            lambda: [server.pid], urls, clip, duration,
            viewer=thumbnail_viewer(ports[1], n) if viewer else None,
        )
        time.sleep(1.5)
        result["frames"] = frames_check(ports[1], n)
        errors = [l for l in (work / "log").read_text(errors="replace").splitlines() if " ERROR " in l]
        result["errors"] = len(errors)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(work, ignore_errors=True)
    return result


def frames_check(http_port: int, n: int) -> str:
    """Frames received vs written to segments, per stream, from /metrics (publishers stopped)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5).read().decode()
    counts: dict[str, dict[str, float]] = {"in": {}, "out": {}}
    for line in text.splitlines():
        for kind in ("in", "out"):
            prefix = f"mediaserver_stream_frames_{kind}_total{{"
            if line.startswith(prefix):
                labels, value = line[len(prefix):].rsplit("} ", 1)
                counts[kind][labels] = float(value)
    lost = sum(value - counts["out"].get(labels, 0) for labels, value in counts["in"].items())
    return f"{int(sum(counts['in'].values()))} frames in, {int(lost)} not written"


# ---------------------------------------------------------------- nginx


def ensure_nginx() -> Path | None:
    module = Path("/usr/lib/nginx/modules/ngx_rtmp_module.so")
    if shutil.which("nginx") and module.exists():
        return module
    if os.geteuid() != 0:
        print("nginx with libnginx-mod-rtmp is not installed (need root to apt-get it)")
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "nginx", "libnginx-mod-rtmp"], check=False, env=env,
                   stdout=subprocess.DEVNULL)
    return module if module.exists() else None


def run_nginx(clip, n, duration, module: Path):
    work = Path(tempfile.mkdtemp(prefix="nginx-bench-"))
    port, http_port = free_port(), free_port()
    (work / "hls").mkdir()
    conf = work / "nginx.conf"
    user = "user root;" if os.geteuid() == 0 else ""
    conf.write_text(f"""
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
http {{
    access_log off;
    client_body_temp_path {work}/tmp;
    proxy_temp_path {work}/tmp; fastcgi_temp_path {work}/tmp; uwsgi_temp_path {work}/tmp; scgi_temp_path {work}/tmp;
    server {{ listen 127.0.0.1:{http_port}; location / {{ root {work}; }} }}
}}
""")
    master = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(work)], stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        if master.poll() is not None:
            raise RuntimeError(f"nginx failed: {(work / 'error.log').read_text()}")
        urls = [f"rtmp://127.0.0.1:{port}/live/s{i}" for i in range(n)]
        result = measure(lambda: [master.pid, *children(master.pid)], urls, clip, duration)
        result["frames"] = "(not checked)"
        result["errors"] = 0
    finally:
        master.send_signal(signal.SIGQUIT)
        try:
            master.wait(10)
        except subprocess.TimeoutExpired:
            master.kill()
        shutil.rmtree(work, ignore_errors=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", default="1,10,50", help="comma-separated stream counts")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds measured per step")
    parser.add_argument("--previews", action="store_true", help="also measure with thumbnails and levels on")
    parser.add_argument("--skip-nginx", action="store_true")
    parser.add_argument("--skip-mediaserver", action="store_true")
    parser.add_argument("--server-cmd", default=f"{sys.executable} -m mediaserver",
                        help="command that runs mediaserver (to benchmark another build)")
    args = parser.parse_args()
    clip = make_clip()
    module = None if args.skip_nginx else ensure_nginx()
    counts = [int(x) for x in args.streams.split(",")]
    rows = []
    for n in counts:
        row: dict = {"n": n}
        if not args.skip_mediaserver:
            row["ms"] = run_mediaserver(clip, n, args.duration, False, args.server_cmd.split())
            if args.previews:
                row["ms_previews"] = run_mediaserver(clip, n, args.duration, True, args.server_cmd.split())
                row["ms_viewed"] = run_mediaserver(clip, n, args.duration, True, args.server_cmd.split(), viewer=True)
        if module is not None:
            row["nginx"] = run_nginx(clip, n, args.duration, module)
        rows.append(row)
        print(f"N={n}: " + "; ".join(f"{k}: {v}" for k, v in row.items() if k != "n"), flush=True)

    print("\n streams | mediaserver CPU %/stream | nginx-rtmp CPU %/stream | ratio | ms RSS MB/stream "
          "| nginx RSS MB/stream | machine CPU % (ms run) | frames (mediaserver)")
    for row in rows:
        ms, ng = row.get("ms"), row.get("nginx")
        ratio = f"{ms['cpu_pct_per_stream'] / ng['cpu_pct_per_stream']:.2f}x" if ms and ng else "-"
        print(
            f" {row['n']:7d} | {ms['cpu_pct_per_stream'] if ms else float('nan'):24.3f} "
            f"| {ng['cpu_pct_per_stream'] if ng else float('nan'):23.3f} | {ratio:>5} "
            f"| {ms['rss_per_stream_mb'] if ms else float('nan'):16.2f} "
            f"| {ng['rss_per_stream_mb'] if ng else float('nan'):19.2f} "
            f"| {ms['machine_pct'] if ms else float('nan'):22.0f} | {ms['frames'] if ms else '-'}"
            + (f", errors {ms['errors']}, publishers died {ms['publishers_died']}" if ms else "")
        )
        if "ms_previews" in row:
            extra = row["ms_previews"]["cpu_pct_per_stream"] / ms["cpu_pct_per_stream"] - 1
            print(f"         previews on (levels every 2 s, thumbnails on demand), no viewer: "
                  f"{row['ms_previews']['cpu_pct_per_stream']:.3f} %/stream, {100 * extra:+.1f} % over without")
            viewed = row["ms_viewed"]["cpu_pct_per_stream"] / ms["cpu_pct_per_stream"] - 1
            print(f"         same, every thumbnail fetched every 5 s (one decode per stream per 5 s): "
                  f"{row['ms_viewed']['cpu_pct_per_stream']:.3f} %/stream, {100 * viewed:+.1f} %   (target: under +20 %)")
    print("\ntargets: CPU per stream <= 2x nginx-rtmp; <= 8 MB RSS per added stream; 100 streams without a lost frame")
    return 0


if __name__ == "__main__":
    sys.exit(main())
