"""Executes a stream's HLS effects: MPEG-TS segments through PyAV, no re-encode.

One `HlsWriter` per stream name, owned by the runtime (a resource, not state):
it outlives a session restart, and a republish of the name continues its
playlist. Logic decides where segments start and end and with what
timestamps; this module only writes.
"""

from __future__ import annotations

import logging
import os
from fractions import Fraction
from pathlib import Path

import av

from .playlist import SegmentEntry, parse, render, target_duration, write_atomically

log = logging.getLogger("mediaserver.hls")

_MS = Fraction(1, 1000)
_AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)
_KEEP_BEHIND = 2
"""Segments kept on disk after they leave the playlist, for viewers that fetched
the playlist just before it moved on."""


def aac_rate_and_channels(asc: bytes) -> tuple[int, int]:
    """Sample rate and channel count of an AudioSpecificConfig (defaults when odd)."""
    if len(asc) < 2:
        return 48000, 2
    index = ((asc[0] & 0x07) << 1) | (asc[1] >> 7)
    channels = (asc[1] >> 3) & 0x0F
    rate = _AAC_RATES[index] if index < len(_AAC_RATES) else 48000
    return rate, channels if 1 <= channels <= 8 else 2


class HlsWriter:
    def __init__(self, directory: Path, *, playlist_size: int, segment_target: float) -> None:
        self.directory = directory
        self.playlist_size = playlist_size
        self.segment_target = segment_target
        self.playlist_path = directory / "index.m3u8"
        self.entries: list[SegmentEntry] = []
        self.discontinuity_sequence = 0
        self.next_sequence = 0
        self.ended = False
        self.segments_written = 0
        self.frames_out = {"video": 0, "audio": 0}
        self.bytes_out = 0
        self._codecs: dict[str, bytes] = {}
        self._container: av.container.OutputContainer | None = None
        self._streams: dict[str, av.stream.Stream] = {}
        self._open_sequence = -1
        self._open_discontinuity = False
        self._open_path: Path | None = None
        self._open_first_dts: int | None = None
        self._open_last_dts = 0
        self.target = 0
        """EXT-X-TARGETDURATION never goes down (RFC 8216 wants it constant; it can
        only grow when a GOP is longer than every segment before it)."""
        directory.mkdir(parents=True, exist_ok=True)
        self._recover()

    def _recover(self) -> None:
        """Continue the playlist a previous server process left (media sequence
        never goes back), and end it if that process died while live."""
        try:
            text = self.playlist_path.read_text(encoding="utf-8")
        except (FileNotFoundError, UnicodeDecodeError):
            return
        try:
            previous = parse(text)
        except ValueError:
            return
        self.entries = previous.entries[-self.playlist_size :]
        self.discontinuity_sequence = previous.discontinuity_sequence
        self.target = previous.target
        if previous.entries:
            self.next_sequence = previous.entries[-1].sequence + 1
        self.ended = True
        if not previous.ended:
            self._write_playlist()

    # -- effects -------------------------------------------------------------

    def set_codec(self, track: str, config: bytes) -> None:
        self._codecs[track] = bytes(config)

    def start_segment(self, sequence: int, discontinuity: bool) -> None:
        if self._container is not None:
            log.warning("segment %d opened while %d was open; closing it", sequence, self._open_sequence)
            self._abandon()
        if self.ended:
            # A republish of the name continues the playlist after a discontinuity.
            self.ended = False
            discontinuity = True if self.entries else discontinuity
        path = self.directory / f"seg{sequence}.ts"
        container = av.open(str(path), "w", format="mpegts")
        streams: dict[str, av.stream.Stream] = {}
        try:
            if "video" in self._codecs:
                video = container.add_stream("h264")
                video.codec_context.extradata = self._codecs["video"]
                video.time_base = _MS
                streams["video"] = video
            if "audio" in self._codecs:
                rate, channels = aac_rate_and_channels(self._codecs["audio"])
                audio = container.add_stream("aac", rate=rate)
                audio.codec_context.extradata = self._codecs["audio"]
                audio.layout = "mono" if channels == 1 else "stereo" if channels == 2 else channels
                streams["audio"] = audio
        except BaseException:
            container.close()
            raise
        self._container = container
        self._streams = streams
        self._open_sequence = sequence
        self._open_discontinuity = discontinuity
        self._open_path = path
        self._open_first_dts = None

    def write(self, track: str, dts: int, pts: int, keyframe: bool, data: bytes | memoryview) -> None:
        stream = self._streams.get(track)
        if stream is None:
            raise RuntimeError(f"no open segment has a {track} stream")
        if self._open_first_dts is None:
            self._open_first_dts = dts
        self._open_last_dts = dts
        packet = av.Packet(data)
        packet.dts = dts
        packet.pts = pts
        packet.time_base = _MS
        packet.is_keyframe = keyframe
        packet.stream = stream
        self._container.mux(packet)  # type: ignore[union-attr]
        self.frames_out[track] += 1
        self.bytes_out += len(data)

    def end_segment(self, sequence: int, duration_ms: int) -> None:
        if self._container is None or sequence != self._open_sequence:
            raise RuntimeError(f"segment {sequence} is not the open one ({self._open_sequence})")
        self._container.close()
        self._container = None
        self._streams = {}
        assert self._open_path is not None
        self.entries.append(
            SegmentEntry(
                sequence=sequence,
                uri=self._open_path.name,
                duration=duration_ms / 1000.0,
                discontinuity=self._open_discontinuity,
            )
        )
        self.next_sequence = sequence + 1
        self.segments_written += 1
        self._slide_window()
        self._write_playlist()

    def end_stream(self) -> None:
        if self._container is not None:
            self._abandon()
        self.ended = True
        self._write_playlist()

    def salvage_open_segment(self) -> None:
        """Keep what the open segment holds when logic cannot close it (its session
        was stopped): its duration is measured from the frames written."""
        if self._container is None:
            return
        if self._open_first_dts is None:
            self._abandon()
            return
        duration = max(self._open_last_dts - self._open_first_dts, 1)
        self.end_segment(self._open_sequence, duration)

    def close(self) -> None:
        """Release the open container without touching the playlist."""
        if self._container is not None:
            self._abandon()

    # -- internals -----------------------------------------------------------

    def _abandon(self) -> None:
        assert self._container is not None
        try:
            self._container.close()
        finally:
            self._container = None
            self._streams = {}
            if self._open_path is not None:
                self._open_path.unlink(missing_ok=True)

    def _slide_window(self) -> None:
        while len(self.entries) > self.playlist_size:
            gone = self.entries.pop(0)
            if gone.discontinuity:
                self.discontinuity_sequence += 1
            stale = gone.sequence - _KEEP_BEHIND
            try:
                os.unlink(self.directory / f"seg{stale}.ts")
            except FileNotFoundError:
                pass

    def _write_playlist(self) -> None:
        self.target = max(self.target, target_duration(self.entries, self.segment_target))
        text = render(
            self.entries,
            target=self.target,
            discontinuity_sequence=self.discontinuity_sequence,
            ended=self.ended,
        )
        write_atomically(self.playlist_path, text)
