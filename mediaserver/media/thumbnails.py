"""A keyframe -> a small JPEG, with PyAV: decode, scale, encode. No PIL needed."""

from __future__ import annotations

from fractions import Fraction

import av


def keyframe_to_jpeg(avcc_config: bytes, keyframe: bytes, width: int = 320) -> tuple[bytes, int, int]:
    """(JPEG bytes, width, height) of an H.264 keyframe given as AVCC NAL units."""
    decoder = av.CodecContext.create("h264", "r")
    decoder.extradata = avcc_config
    decoder.thread_count = 1
    # Deblocking is ~10 % of an intra frame's decode and invisible once the
    # picture is scaled down to a thumbnail. The rest (CABAC, ~20 ms for a
    # 200 KB 1080p IDR) cannot be skipped.
    decoder.options = {"skip_loop_filter": "all"}
    frames = decoder.decode(av.Packet(keyframe)) + decoder.decode(None)
    if not frames:
        raise ValueError("the keyframe decoded to no picture")
    frame = frames[0]
    height = max(2, round(frame.height * width / frame.width / 2) * 2)
    small = frame.reformat(width=width, height=height, format="yuvj420p", interpolation="FAST_BILINEAR")
    encoder = av.CodecContext.create("mjpeg", "w")
    encoder.width, encoder.height, encoder.pix_fmt = width, height, "yuvj420p"
    encoder.time_base = Fraction(1, 1)
    encoder.options = {"qmin": "2", "qmax": "8"}
    packets = encoder.encode(small) + encoder.encode(None)
    return b"".join(bytes(p) for p in packets), width, height
