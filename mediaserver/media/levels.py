"""Audio levels: peak and RMS in dBFS per channel, from AAC frames, with numpy."""

from __future__ import annotations

import math

import av
import numpy as np

SILENCE_DB = -120.0


def _db(value: float) -> float:
    return max(20.0 * math.log10(value), SILENCE_DB) if value > 0 else SILENCE_DB


def aac_levels(asc: bytes, frames: list[bytes]) -> list[dict[str, float]]:
    """[{"peak_db", "rms_db"} per channel] over `frames` (the first only primes the decoder)."""
    decoder = av.CodecContext.create("aac", "r")
    decoder.extradata = asc
    blocks = []
    for index, data in enumerate(frames):
        for frame in decoder.decode(av.Packet(data)):
            if index == 0:
                continue  # AAC's first frame overlaps a window that was never sent
            samples = frame.to_ndarray()
            if not frame.format.is_planar:
                samples = samples.reshape(-1, len(frame.layout.channels)).T
            blocks.append(samples.astype(np.float64, copy=False))
    if not blocks:
        return []
    samples = np.concatenate(blocks, axis=1)
    peaks = np.max(np.abs(samples), axis=1)
    rms = np.sqrt(np.mean(np.square(samples), axis=1))
    return [{"peak_db": round(_db(p), 2), "rms_db": round(_db(r), 2)} for p, r in zip(peaks, rms)]
