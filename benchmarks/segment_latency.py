"""How soon a segment is listed after the keyframe that closes it is sent.

Starts the server, publishes a clip in real time with the sans-I/O client
core over TCP, and polls the playlist file every 0.5 ms. For each segment,
latency = time the playlist first lists it - time the publisher sent the
keyframe that starts the next segment. Target: 50 ms.

    .venv/bin/python benchmarks/segment_latency.py [--seconds 20]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from synthetic import media  # noqa: E402

from mediaserver.proto import rtmp  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rtmp_port, http_port, admin_port = free_port(), free_port(), free_port()
        config = Path(tmp) / "c.toml"
        config.write_text(
            f'data_dir = "{tmp}/data"\nlog_level = "warning"\n'
            f'[rtmp]\nhost = "127.0.0.1"\nport = {rtmp_port}\n'
            f'[http]\nhost = "127.0.0.1"\nport = {http_port}\n'
            f'[admin]\nhost = "127.0.0.1"\nport = {admin_port}\n'
            f'[hls]\nsegment_target = 1.0\nplaylist_size = 1000\n'
        )
        server = subprocess.Popen([sys.executable, "-m", "mediaserver", "serve", "--config", str(config)])
        try:
            return run(Path(tmp) / "data" / "hls" / "lat" / "index.m3u8", rtmp_port, args.seconds)
        finally:
            server.terminate()
            server.wait(10)


def run(playlist: Path, port: int, seconds: float) -> int:
    deadline = time.monotonic() + 10
    while True:
        try:
            sock = socket.create_connection(("127.0.0.1", port))
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client = rtmp.ClientConnection()

    def exchange(until: type) -> None:
        while True:
            out = client.data_to_send()
            if out:
                sock.sendall(out)
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("server closed")
            for ev in client.feed(data):
                if isinstance(ev, until):
                    return

    exchange(rtmp.HandshakeDone)
    client.connect("live", f"rtmp://127.0.0.1:{port}/live")
    exchange(rtmp.ConnectResult)
    client.create_stream()
    exchange(rtmp.StreamCreated)
    client.publish("lat")
    exchange(rtmp.PublishStatus)

    seen: dict[str, float] = {}
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                text = playlist.read_text()
            except FileNotFoundError:
                text = ""
            now = time.monotonic()
            for line in text.splitlines():
                if line.endswith(".ts") and line not in seen:
                    seen[line] = now
            time.sleep(0.0005)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    vconf, aconf, packets = media(seconds=4.0, fps=25, gop=25)
    client.send_video(0, b"\x17\x00\x00\x00\x00" + vconf)
    client.send_audio(0, b"\xaf\x00" + aconf)
    span = packets[-1][1] + 40
    keyframe_sent: list[float] = []
    start = time.monotonic()
    loop = 0
    while time.monotonic() - start < seconds:
        for kind, dts, pts, key, data in packets:
            ts = dts + loop * span
            due = start + ts / 1000.0
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if kind == "video":
                head = bytes((0x17 if key else 0x27, 1)) + (pts - dts).to_bytes(3, "big", signed=True)
                client.send_video(ts, head + data)
            else:
                client.send_audio(ts, b"\xaf\x01" + data)
            sock.sendall(client.data_to_send())
            if kind == "video" and key:
                keyframe_sent.append(time.monotonic())
        loop += 1
    time.sleep(0.2)
    stop.set()
    poller.join()
    sock.close()
    # Segment N (1 s target, 1 s GOP) is closed by keyframe N+1.
    listed = sorted(seen.items(), key=lambda kv: int(kv[0][3:-3]))
    latencies = [
        (appeared - keyframe_sent[index + 1]) * 1000
        for index, (_, appeared) in enumerate(listed)
        if index + 1 < len(keyframe_sent)
    ]
    if not latencies:
        print("no segment was listed", file=sys.stderr)
        return 1
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    print(f"segments: {len(latencies)}; keyframe sent -> segment listed in the playlist:")
    print(f"  p50 {statistics.median(latencies):.2f} ms, p99 {p99:.2f} ms, max {latencies[-1]:.2f} ms "
          f"(target: within 50 ms; includes TCP and a 0.5 ms polling step)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
