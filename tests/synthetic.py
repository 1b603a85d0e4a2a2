"""Real H.264/AAC packets for in-process tests, encoded once with PyAV.

Tests that drive sessions without a socket still push genuine codec data,
so the HLS writer (FFmpeg's MPEG-TS muxer) gets what a publisher would send.
"""

from __future__ import annotations

import functools
import io
from fractions import Fraction

import av
import numpy as np


@functools.lru_cache(maxsize=None)
def media(seconds: float = 2.0, fps: int = 25, gop: int = 25) -> tuple[bytes, bytes, list[tuple[str, int, int, bool, bytes]]]:
    """(AVCDecoderConfigurationRecord, AudioSpecificConfig, packets in FLV order).

    Packets are (kind, dts_ms, pts_ms, keyframe, payload) with AVCC video and
    raw AAC frames, as they travel in RTMP messages.
    """
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="flv") as out:
        video = out.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        video.options = {"g": str(gop), "bf": "0", "preset": "ultrafast", "tune": "zerolatency"}
        audio = out.add_stream("aac", rate=48000)
        audio.layout = "stereo"
        frames = int(seconds * fps)
        samples = 1024
        t = 0
        for i in range(frames):
            image = np.full((48, 64, 3), (i * 7) % 255, dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            frame.time_base = Fraction(1, fps)
            for packet in video.encode(frame):
                out.mux(packet)
            while t * 1000 // 48000 <= i * 1000 // fps:
                tone = (0.1 * np.sin(np.arange(t, t + samples) * 0.05)).astype(np.float32)
                aframe = av.AudioFrame.from_ndarray(np.stack([tone, tone]).reshape(1, -1), format="flt", layout="stereo")
                aframe.sample_rate = 48000
                aframe.pts = t
                aframe.time_base = Fraction(1, 48000)
                for packet in audio.encode(aframe):
                    out.mux(packet)
                t += samples
        for stream in (video, audio):
            for packet in stream.encode(None):
                out.mux(packet)
    buffer.seek(0)
    with av.open(buffer, "r", format="flv") as src:
        vconf = bytes(src.streams.video[0].codec_context.extradata)
        aconf = bytes(src.streams.audio[0].codec_context.extradata)
        packets = [
            (p.stream.type, int(p.dts), int(p.pts), bool(p.is_keyframe), bytes(p))
            for p in src.demux()
            if p.size
        ]
    return vconf, aconf, packets
