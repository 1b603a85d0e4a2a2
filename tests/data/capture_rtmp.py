"""Records what real RTMP publishers send, for the replay and fuzz tests.

Runs a one-connection server on 127.0.0.1 driven by our ServerConnection
(accepting connect and publish), stores every byte the client sent, and
writes it to tests/data/<name>.bin. Regenerate with:

    .venv/bin/python tests/data/capture_rtmp.py

Clips are tiny (160x90, 2 s, low bitrate) so the files stay small.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import multiprocessing
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from mediaserver.proto import rtmp

HERE = Path(__file__).resolve().parent


def serve_once(sock: socket.socket, path: Path) -> None:
    received = bytearray()
    conn, _ = sock.accept()
    core = rtmp.ServerConnection()
    conn.settimeout(10)
    try:
        while True:
            data = conn.recv(65536)
            if not data:
                break
            received += data
            for ev in core.feed(data):
                if isinstance(ev, rtmp.ConnectRequest):
                    core.accept_connect()
                elif isinstance(ev, rtmp.PublishRequest):
                    core.accept_publish(ev.stream_id)
            out = core.data_to_send()
            if out:
                conn.sendall(out)
    except (OSError, socket.timeout):
        pass
    finally:
        conn.close()
        path.write_bytes(bytes(received))


def capture(name: str, publish) -> None:
    """The server runs in its own process: PyAV holds the GIL while it connects."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    port = sock.getsockname()[1]
    path = HERE / f"{name}.bin"
    server = multiprocessing.get_context("fork").Process(target=serve_once, args=(sock, path))
    server.start()
    publish(f"rtmp://127.0.0.1:{port}/live/capture")
    server.join(30)
    sock.close()
    print(f"{name}.bin: {path.stat().st_size} bytes")


def ffmpeg(url: str) -> None:
    subprocess.run(
        ["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=160x90:rate=15", "-f", "lavfi",
         "-i", "sine=frequency=440:sample_rate=44100", "-t", "2", "-c:v", "libx264", "-preset", "ultrafast",
         "-g", "15", "-b:v", "100k", "-c:a", "aac", "-b:a", "32k", "-f", "flv", url],
        check=True, timeout=60,
    )


def pyav(url: str) -> None:
    with av.open(url, "w", format="flv") as out:
        video = out.add_stream("libx264", rate=15)
        video.width, video.height, video.pix_fmt = 160, 90, "yuv420p"
        video.options = {"g": "15", "preset": "ultrafast", "bf": "0"}
        audio = out.add_stream("aac", rate=44100)
        audio.layout = "mono"
        for i in range(30):
            frame = av.VideoFrame.from_ndarray(np.full((90, 160, 3), i * 8, np.uint8), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, 15)
            for packet in video.encode(frame):
                out.mux(packet)
            samples = (0.2 * np.sin(np.arange(i * 2940, (i + 1) * 2940) * 0.06)).astype(np.float32)
            aframe = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="flt", layout="mono")
            aframe.sample_rate, aframe.pts, aframe.time_base = 44100, i * 2940, Fraction(1, 44100)
            for packet in audio.encode(aframe):
                out.mux(packet)
        for stream in (video, audio):
            for packet in stream.encode(None):
                out.mux(packet)


if __name__ == "__main__":
    capture("ffmpeg_publish", ffmpeg)
    capture("pyav_publish", pyav)
    sys.exit(0)
