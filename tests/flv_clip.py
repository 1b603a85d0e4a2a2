"""A short H.264 + AAC FLV clip made with the ffmpeg CLI, read back as the
(configs, packets) the HLS writer is fed with, for writer-level tests."""

from __future__ import annotations

import subprocess
from pathlib import Path

import av


def flv_clip(path: Path, size: str) -> tuple[bytes, bytes, list[tuple[str, int, int, bool, bytes]]]:
    """3 s at 30 fps, a keyframe a second: (video config, audio config, packets)."""
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", f"testsrc2=size={size}:rate=30",
         "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000", "-t", "3",
         "-c:v", "libx264", "-g", "30", "-preset", "ultrafast", "-c:a", "aac", "-f", "flv", str(path)],
        check=True,
    )
    with av.open(str(path)) as src:
        video = src.streams.video[0].codec_context.extradata
        audio = src.streams.audio[0].codec_context.extradata
        packets = [(p.stream.type, p.dts, p.pts, p.is_keyframe, bytes(p)) for p in src.demux() if p.size]
    return video, audio, packets
