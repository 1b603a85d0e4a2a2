"""VP8 (a WebRTC publisher that offers no H.264) transcoded to H.264, with PyAV.

Runs in a worker thread. The CPU it may take is bounded: frames above the
configured size are scaled down, frames closer together than 1/max_fps are
dropped, and x264 runs with a fast preset and zerolatency (no B-frames, no
lookahead, so every input frame comes out at once with its own timestamp).
A keyframe is forced every `keyframe_interval` seconds so that segments can
be cut at the HLS target.
"""

from __future__ import annotations

import fractions

import av

VIDEO_CLOCK = 90000
TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK)


class Vp8ToH264:
    def __init__(
        self,
        max_width: int = 1280,
        max_height: int = 720,
        max_fps: float = 30.0,
        preset: str = "veryfast",
        bitrate: int = 2_500_000,
        keyframe_interval: float = 2.0,
    ) -> None:
        self.decoder = av.CodecContext.create("libvpx", "r")
        self.max_width = max_width
        self.max_height = max_height
        self.min_step = round(VIDEO_CLOCK / max_fps) if max_fps > 0 else 0
        self.preset = preset
        self.bitrate = bitrate
        self.keyframe_interval = round(keyframe_interval * VIDEO_CLOCK)
        self.encoder: av.VideoCodecContext | None = None
        self.size: tuple[int, int] | None = None
        self.last_kept: int | None = None
        self.last_keyframe: int | None = None
        self.frames_dropped = 0
        self.decode_errors = 0

    def push(self, rtp: int, payload: bytes) -> list[tuple[int, bytes]]:
        """One VP8 frame at RTP time `rtp` (90 kHz); returns H.264 access units (rtp, Annex B)."""
        packet = av.Packet(payload)
        packet.pts = rtp
        packet.time_base = TIME_BASE
        try:
            frames = self.decoder.decode(packet)
        except av.FFmpegError:
            self.decode_errors += 1
            return []
        out: list[tuple[int, bytes]] = []
        for frame in frames:
            if self.last_kept is not None and rtp - self.last_kept < self.min_step - self.min_step // 10:
                self.frames_dropped += 1
                continue
            self.last_kept = rtp
            self._encode(frame, rtp, out)
        return out

    def _target_size(self, width: int, height: int) -> tuple[int, int]:
        scale = min(1.0, self.max_width / width, self.max_height / height)
        # x264 with 4:2:0 needs even dimensions.
        return max(2, int(width * scale) // 2 * 2), max(2, int(height * scale) // 2 * 2)

    def _encode(self, frame: av.VideoFrame, rtp: int, out: list[tuple[int, bytes]]) -> None:
        size = self._target_size(frame.width, frame.height)
        if size != self.size:
            # A new size (the publisher adapted its resolution): a new encoder,
            # whose first frame is a keyframe with the new parameter sets.
            self.size = size
            encoder = av.CodecContext.create("libx264", "w")
            encoder.width, encoder.height = size
            encoder.pix_fmt = "yuv420p"
            encoder.time_base = TIME_BASE
            encoder.bit_rate = self.bitrate
            encoder.options = {"preset": self.preset, "tune": "zerolatency", "repeat-headers": "1"}
            encoder.gop_size = 10**6  # keyframes are forced below, by time
            encoder.open()
            self.encoder = encoder
            self.last_keyframe = None
        if (frame.width, frame.height) != size or frame.format.name != "yuv420p":
            frame = frame.reformat(width=size[0], height=size[1], format="yuv420p")
        frame.pts = rtp
        frame.time_base = TIME_BASE
        if self.last_keyframe is None or rtp - self.last_keyframe >= self.keyframe_interval:
            frame.pict_type = av.video.frame.PictureType.I
            self.last_keyframe = rtp
        else:
            frame.pict_type = av.video.frame.PictureType.NONE
        assert self.encoder is not None
        for packet in self.encoder.encode(frame):
            out.append((packet.pts, bytes(packet)))
