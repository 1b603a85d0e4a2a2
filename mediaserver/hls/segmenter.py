"""Executes a stream's HLS effects: MPEG-TS segments from our own packetiser, no re-encode.

One `HlsWriter` per stream name, owned by the runtime (a resource, not state):
it outlives a session restart, and a republish of the name continues its
playlist. Logic decides where segments start and end and with what
timestamps; this module only writes.

Everything the writer must remember is in `WriterState` (plain data with a
version): continuity counters per PID, playlist entries, the open segment's
name and size. So a hand-over to another process can carry a live writer,
and the continuity counters go on from segment to segment, across a
republish's EXT-X-DISCONTINUITY too (they start at 0 only in a new writer).

The data directory is trusted only for what the writer made: the stream
directory must be a real directory (never a symlink), and segment and
playlist files are opened with O_NOFOLLOW | O_NONBLOCK and checked to be
regular files, so a planted symlink or FIFO is refused, not followed or
waited on.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import stat
from pathlib import Path

import msgspec

from . import ts_resume, tspack
from .elementary import AdtsFraming, H264Framing
from .playlist import SegmentEntry, parse, render, target_duration, write_atomically

log = logging.getLogger("mediaserver.hls")

_AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)
_KEEP_BEHIND = 2
"""Segments kept on disk after they leave the playlist, for viewers that fetched
the playlist just before it moved on."""
_WRITE_BUFFER = 256 * 1024
"""A segment's bytes reach the kernel in writes of this size, not one per frame."""
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class UnsafeStreamPath(OSError):
    """The stream directory or one of its files is not what the writer made
    (a symlink, a FIFO, a device...): refused, never followed or opened."""


def aac_rate_and_channels(asc: bytes) -> tuple[int, int]:
    """Sample rate and channel count of an AudioSpecificConfig (defaults when odd)."""
    if len(asc) < 2:
        return 48000, 2
    index = ((asc[0] & 0x07) << 1) | (asc[1] >> 7)
    channels = (asc[1] >> 3) & 0x0F
    rate = _AAC_RATES[index] if index < len(_AAC_RATES) else 48000
    return rate, channels if 1 <= channels <= 8 else 2


class WriterState(msgspec.Struct, forbid_unknown_fields=True):
    """An HLS writer's whole memory, as data (for hand-over to another process)."""

    version: int = 1
    entries: list[SegmentEntry] = []
    discontinuity_sequence: int = 0
    next_sequence: int = 0
    ended: bool = False
    target: int = 0
    """EXT-X-TARGETDURATION never goes down (RFC 8216 wants it constant; it can
    only grow when a GOP is longer than every segment before it)."""
    segments_written: int = 0
    frames_out: dict[str, int] = msgspec.field(default_factory=lambda: {"video": 0, "audio": 0})
    bytes_out: int = 0
    codecs: dict[str, bytes] = {}
    ts: tspack.TsState = msgspec.field(default_factory=tspack.TsState)
    open_sequence: int = -1
    """-1 when no segment is open."""
    open_discontinuity: bool = False
    open_name: str = ""
    open_size: int = 0
    """Bytes of the open segment written so far (all on disk after `to_state`)."""
    open_first_dts: int | None = None
    open_last_dts: int = 0
    open_start_cc: dict[int, int] = {}
    """Continuity counters before the open segment: restored if it is abandoned,
    so the next segment follows the last one a player could have seen."""


def _check_directory(directory: Path) -> None:
    """Make the stream directory if needed; refuse it unless it is a real directory."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(directory)  # does not follow a symlink at the last component
    except FileExistsError:
        pass
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode):
        kind = "a symlink" if stat.S_ISLNK(info.st_mode) else f"not a directory (mode {info.st_mode:o})"
        raise UnsafeStreamPath(errno.ENOTDIR, f"stream directory is {kind}, refused", str(directory))


def _open_regular(path: Path, flags: int = _OPEN_FLAGS) -> int:
    """A file descriptor for `path`, which must be (or become) a regular file."""
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            raise UnsafeStreamPath(exc.errno, f"not a regular file ({exc.strerror}), refused", str(path)) from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise UnsafeStreamPath(errno.EINVAL, f"not a regular file (mode {info.st_mode:o}), refused", str(path))
    return fd


def _read_regular(path: Path) -> str | None:
    """The text of a regular file, or None when it is missing or not a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("playlist %s not read: %s", path, exc.strerror)
        return None
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            log.warning("playlist %s is not a regular file; not read", path)
            return None
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


class HlsWriter:
    def __init__(
        self,
        directory: Path,
        *,
        playlist_size: int,
        segment_target: float,
        state: WriterState | None = None,
    ) -> None:
        self.directory = directory
        self.playlist_size = playlist_size
        self.segment_target = segment_target
        self.playlist_path = directory / "index.m3u8"
        _check_directory(directory)
        self.state = WriterState() if state is None else state
        self._ts = tspack.Packetiser(self.state.ts)
        self._file: io.BufferedWriter | None = None
        self._video: H264Framing | None = None
        self._audio: AdtsFraming | None = None
        self._tracks: frozenset[str] = frozenset()
        """The tracks the open segment's PMT lists."""
        self._framing_from_codecs()
        if state is None:
            self._recover()
        elif state.open_sequence >= 0:
            self._reopen()

    # -- state, as the rest of the server reads it ---------------------------

    @property
    def entries(self) -> list[SegmentEntry]:
        return self.state.entries

    @property
    def next_sequence(self) -> int:
        return self.state.next_sequence

    @property
    def ended(self) -> bool:
        return self.state.ended

    @property
    def discontinuity_sequence(self) -> int:
        return self.state.discontinuity_sequence

    @property
    def target(self) -> int:
        return self.state.target

    @property
    def segments_written(self) -> int:
        return self.state.segments_written

    @property
    def frames_out(self) -> dict[str, int]:
        return self.state.frames_out

    @property
    def bytes_out(self) -> int:
        return self.state.bytes_out

    def to_state(self) -> WriterState:
        """The writer's state with every byte of the open segment on disk."""
        if self._file is not None:
            self._file.flush()
        return self.state

    def detach(self) -> WriterState:
        """Hand the writer to another process: the open segment stays as it is on
        disk, and this object writes nothing more."""
        state = self.to_state()
        if self._file is not None:
            self._file.close()
            self._file = None
        return state

    # -- recovery ------------------------------------------------------------

    def _recover(self) -> None:
        """Continue the playlist a previous server process left (media sequence
        never goes back), and end it if that process died while live."""
        text = _read_regular(self.playlist_path)
        if text is None:
            return
        try:
            previous = parse(text)
        except ValueError:
            return
        s = self.state
        s.entries = previous.entries[-self.playlist_size :]
        s.discontinuity_sequence = previous.discontinuity_sequence
        s.target = previous.target
        if previous.entries:
            s.next_sequence = previous.entries[-1].sequence + 1
            # Counters go on from the last listed segment, as within a process
            # (FFmpeg reports "Packet corrupt" at a restart, discontinuity or not).
            s.ts.cc.update(ts_resume.next_counters(self.directory, previous.entries[-1].uri))
        s.ended = True
        if not previous.ended:
            self._write_playlist()

    def _reopen(self) -> None:
        """Go on writing the open segment of a state from another process."""
        self._tracks = frozenset(self.state.codecs)
        path = self.directory / self.state.open_name
        fd = _open_regular(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        os.ftruncate(fd, self.state.open_size)
        os.lseek(fd, self.state.open_size, os.SEEK_SET)
        self._file = open(fd, "wb", buffering=_WRITE_BUFFER)

    # -- effects -------------------------------------------------------------

    def set_codec(self, track: str, config: bytes) -> None:
        self.state.codecs[track] = bytes(config)
        self._framing_from_codecs()

    def _framing_from_codecs(self) -> None:
        codecs = self.state.codecs
        self._video = H264Framing(codecs["video"]) if "video" in codecs else None
        self._audio = AdtsFraming(codecs["audio"]) if "audio" in codecs else None

    def start_segment(self, sequence: int, discontinuity: bool) -> None:
        s = self.state
        if self._file is not None:
            log.warning("segment %d opened while %d was open; closing it", sequence, s.open_sequence)
            self._abandon()
        if s.ended:
            # A republish of the name continues the playlist after a discontinuity.
            s.ended = False
            discontinuity = True if s.entries else discontinuity
        has_video, has_audio = self._video is not None, self._audio is not None
        if not (has_video or has_audio):
            raise RuntimeError(f"segment {sequence} started before any codec config")
        name = f"seg{sequence}.ts"
        self._file = open(_open_regular(self.directory / name), "wb", buffering=_WRITE_BUFFER)
        # The counters go on even at EXT-X-DISCONTINUITY (a republish): FFmpeg's
        # HLS demuxer keeps one MPEG-TS demuxer across segments and reports
        # "Packet corrupt" at a restart it could have been told about. They
        # start at 0 only in a new writer (a new server process).
        s.open_start_cc = dict(s.ts.cc)
        self._tracks = frozenset(t for t, on in (("video", has_video), ("audio", has_audio)) if on)
        s.open_sequence = sequence
        s.open_discontinuity = discontinuity
        s.open_name = name
        s.open_size = 0
        s.open_first_dts = None
        ts = self._ts
        psi = ts.psi(tspack.PID_PAT, tspack.pat_section()) + ts.psi(
            tspack.PID_PMT, tspack.pmt_section(has_video, has_audio)
        )
        self._file.write(psi)
        s.open_size += len(psi)

    def write(self, track: str, dts: int, pts: int, keyframe: bool, data: bytes | memoryview) -> None:
        s = self.state
        if self._file is None:
            raise RuntimeError(f"no open segment to write a {track} frame to")
        if track not in self._tracks:
            # A codec that arrived after the segment's PMT was written: its
            # frames would go to a PID no player looks at; they wait for the next.
            raise RuntimeError(f"no open segment has a {track} stream")
        if track == "video":
            framing = self._video
            if framing is None:
                raise RuntimeError("no open segment has a video stream")
            parts = self._ts.pes_parts(
                tspack.PID_VIDEO, tspack.SID_VIDEO, tspack.ticks(pts), tspack.ticks(dts),
                framing.annexb_parts(data, keyframe), pcr=tspack.pcr_for(dts), random_access=keyframe,
            )
        elif track == "audio":
            adts = self._audio
            if adts is None:
                raise RuntimeError("no open segment has an audio stream")
            t = tspack.ticks(pts)
            audio_only = self._video is None
            parts = self._ts.pes_parts(
                tspack.PID_AUDIO, tspack.SID_AUDIO, t, t, [adts.header(len(data)), data],
                pcr=tspack.pcr_for(dts) if audio_only else None, random_access=audio_only,
            )
        else:
            raise RuntimeError(f"unknown track {track!r}")
        file = self._file
        for part in parts:
            s.open_size += file.write(part)
        if s.open_first_dts is None:
            s.open_first_dts = dts
        s.open_last_dts = dts
        s.frames_out[track] += 1
        s.bytes_out += len(data)

    def end_segment(self, sequence: int, duration_ms: int) -> None:
        s = self.state
        if self._file is None or sequence != s.open_sequence:
            raise RuntimeError(f"segment {sequence} is not the open one ({s.open_sequence})")
        self._file.close()
        self._file = None
        s.entries.append(
            SegmentEntry(
                sequence=sequence,
                uri=s.open_name,
                duration=duration_ms / 1000.0,
                discontinuity=s.open_discontinuity,
            )
        )
        s.open_sequence = -1
        s.next_sequence = sequence + 1
        s.segments_written += 1
        self._slide_window()
        self._write_playlist()

    def end_stream(self) -> None:
        if self._file is not None:
            self._abandon()
        self.state.ended = True
        self._write_playlist()

    def salvage_open_segment(self) -> None:
        """Keep what the open segment holds when logic cannot close it (its session
        was stopped): its duration is measured from the frames written."""
        s = self.state
        if self._file is None:
            return
        if s.open_first_dts is None:
            self._abandon()
            return
        duration = max(s.open_last_dts - s.open_first_dts, 1)
        self.end_segment(s.open_sequence, duration)

    def close(self) -> None:
        """Release the open segment without touching the playlist."""
        if self._file is not None:
            self._abandon()

    # -- internals -----------------------------------------------------------

    def _abandon(self) -> None:
        assert self._file is not None
        s = self.state
        try:
            self._file.close()
        finally:
            self._file = None
            # Its packets are never published: the next segment's counters
            # must follow the last segment a player saw.
            s.open_sequence = -1
            s.ts.cc.clear()
            s.ts.cc.update(s.open_start_cc)
            if s.open_name:
                (self.directory / s.open_name).unlink(missing_ok=True)

    def _slide_window(self) -> None:
        s = self.state
        while len(s.entries) > self.playlist_size:
            gone = s.entries.pop(0)
            if gone.discontinuity:
                s.discontinuity_sequence += 1
            stale = gone.sequence - _KEEP_BEHIND
            try:
                os.unlink(self.directory / f"seg{stale}.ts")
            except FileNotFoundError:
                pass

    def _write_playlist(self) -> None:
        s = self.state
        s.target = max(s.target, target_duration(s.entries, self.segment_target))
        text = render(
            s.entries,
            target=s.target,
            discontinuity_sequence=s.discontinuity_sequence,
            ended=s.ended,
        )
        write_atomically(self.playlist_path, text)
