"""Media helpers for the end-to-end tests.

- make test clips with the ffmpeg CLI (`make_clip`) and read their packets with
  PyAV (`read_clip`);
- publish them (`ffmpeg_publish`, `flv_tag_bodies` for hand-made publishers);
- read the HLS output as a viewer does (`read_hls`, `HlsPoller`), demux every
  segment with PyAV and check it with ffprobe;
- compare input and output frame by frame (`assert_exact`);
- a few raw RTMP byte builders for the bad-input tests.

Timestamps: FLV/RTMP carry milliseconds, MPEG-TS 90 kHz ticks that wrap at
2**33. Input timestamps are converted with `ms * 90` (exact) and every output
comparison is done modulo 2**33.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import re
import shutil
import socket
import struct
import subprocess
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Sequence

import av
import m3u8

FFMPEG = shutil.which("ffmpeg") or "ffmpeg"
FFPROBE = shutil.which("ffprobe") or "ffprobe"

TS_WRAP = 1 << 33
"""MPEG-TS PTS/DTS are 33-bit counters at 90 kHz."""
TS_WRAP_SECONDS = TS_WRAP / 90000  # ~95443.7 s
RTMP_WRAP_MS = 1 << 32
FFMPEG_RTMP_WRAP_MS = 1 << 31
"""ffmpeg's FLV muxer masks the extended timestamp byte with 0x7F."""

AAC_FRAME_SAMPLES = 1024

# NAL unit types that the FLV -> Annex B path may add, drop or move
# (SEI, SPS, PPS, access unit delimiter); every other NAL is compared byte for byte.
IGNORED_NAL_TYPES = frozenset({6, 7, 8, 9})


# --------------------------------------------------------------------------
# clips


@dataclass(frozen=True)
class ClipSpec:
    kind: str = "av"
    """"av" (H.264 + AAC), "video" (H.264 only) or "audio" (AAC only)."""
    duration: float = 8.0
    width: int = 320
    height: int = 180
    fps: int = 30
    gop: int = 30
    """Frames between keyframes (fixed: no scene-cut keyframes)."""
    bframes: int = 0
    audio_rate: int = 48000
    channels: int = 2
    tone: int = 440
    """Sine frequency; different tones give clips with different audio bytes."""
    pattern: str = "testsrc2"

    @property
    def has_video(self) -> bool:
        return self.kind in ("av", "video")

    @property
    def has_audio(self) -> bool:
        return self.kind in ("av", "audio")

    @property
    def gop_seconds(self) -> float:
        return self.gop / self.fps

    def key(self) -> str:
        text = repr(self)
        return f"{self.kind}-{self.duration:g}s-bf{self.bframes}-" + hashlib.sha1(
            text.encode()
        ).hexdigest()[:10]


def make_clip(spec: ClipSpec, path: Path) -> Path:
    """Encode `spec` with the ffmpeg CLI into an FLV file at `path` (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    args = [FFMPEG, "-hide_banner", "-nostdin", "-v", "error", "-y"]
    if spec.has_video:
        args += [
            "-f", "lavfi", "-i",
            f"{spec.pattern}=size={spec.width}x{spec.height}:rate={spec.fps}:duration={spec.duration}",
        ]
    if spec.has_audio:
        args += [
            "-f", "lavfi", "-i",
            f"sine=frequency={spec.tone}:sample_rate={spec.audio_rate}:duration={spec.duration}",
        ]
    if spec.has_video:
        args += ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-preset", "ultrafast"]
        if spec.bframes:
            # No -tune zerolatency here: it forbids B-frames. b-adapt=0 keeps the
            # B-frame count fixed so cts != 0 on most frames.
            args += ["-x264-params", f"bframes={spec.bframes}:b-adapt=0:scenecut=0"]
        else:
            args += ["-tune", "zerolatency", "-x264-params", "scenecut=0"]
        args += ["-g", str(spec.gop), "-keyint_min", str(spec.gop), "-sc_threshold", "0"]
    if spec.has_audio:
        args += ["-c:a", "aac", "-ac", str(spec.channels), "-b:a", "96k"]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    args += ["-f", "flv", str(tmp)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"ffmpeg failed to make clip {spec}: {proc.stderr}")
    os.replace(tmp, path)
    return path


@dataclass
class Packet:
    """One input packet (FLV), timestamps in milliseconds."""

    kind: str  # "video" | "audio"
    pts: int
    dts: int
    duration: int
    keyframe: bool
    data: bytes

    @property
    def cts(self) -> int:
        return self.pts - self.dts


@dataclass
class Clip:
    path: Path
    spec: ClipSpec | None
    packets: list[Packet]
    """Every packet in file (interleaved, decode) order."""
    video_extradata: bytes | None
    audio_extradata: bytes | None
    params: dict[str, tuple] = field(default_factory=dict)
    """"video": (width, height), "audio": (sample_rate, channels)."""

    @property
    def video(self) -> list[Packet]:
        return [p for p in self.packets if p.kind == "video"]

    @property
    def audio(self) -> list[Packet]:
        return [p for p in self.packets if p.kind == "audio"]

    @property
    def duration_ms(self) -> int:
        return max(p.pts + p.duration for p in self.packets) - min(p.dts for p in self.packets)

    @property
    def avc_length_size(self) -> int:
        assert self.video_extradata, "clip has no avcC extradata"
        return (self.video_extradata[4] & 3) + 1

    def gop_seconds(self) -> float:
        """Longest distance between two keyframes (or to the end), in seconds."""
        keys = [p.pts for p in self.video if p.keyframe]
        if not keys:
            return 0.0
        end = max(p.pts + p.duration for p in self.video)
        marks = keys + [end]
        return max(b - a for a, b in zip(marks, marks[1:])) / 1000


def read_clip(path: Path, spec: ClipSpec | None = None) -> Clip:
    packets: list[Packet] = []
    vextra = aextra = None
    params: dict[str, tuple] = {}
    with av.open(str(path)) as container:
        for stream in container.streams:
            if stream.type == "video":
                vextra = bytes(stream.codec_context.extradata or b"")
                params["video"] = (stream.codec_context.name, stream.codec_context.width, stream.codec_context.height)
            elif stream.type == "audio":
                aextra = bytes(stream.codec_context.extradata or b"")
                params["audio"] = (stream.codec_context.name, stream.codec_context.sample_rate, stream.codec_context.channels)
        for pkt in container.demux():
            if pkt.size == 0 or pkt.stream.type not in ("video", "audio"):
                continue
            tb = pkt.stream.time_base
            assert tb == Fraction(1, 1000), f"FLV time base should be 1/1000, is {tb}"
            packets.append(
                Packet(
                    kind=pkt.stream.type,
                    pts=int(pkt.pts if pkt.pts is not None else pkt.dts),
                    dts=int(pkt.dts if pkt.dts is not None else pkt.pts),
                    duration=int(pkt.duration or 0),
                    keyframe=bool(pkt.is_keyframe),
                    data=bytes(pkt),
                )
            )
    return Clip(Path(path), spec, packets, vextra or None, aextra or None, params)


def flv_tag_bodies(clip: Clip, ts_base: int = 0) -> list[tuple[str, int, bytes]]:
    """The clip as RTMP message bodies: (kind, timestamp ms, FLV tag body).

    Sequence headers (AVCDecoderConfigurationRecord / AudioSpecificConfig) come
    first at the first timestamp; timestamps are `ts_base + dts` and are NOT
    wrapped here (the caller decides how to put them in 32 bits).
    """
    first = min(p.dts for p in clip.packets)
    out: list[tuple[str, int, bytes]] = []
    if clip.video_extradata:
        out.append(("video", ts_base + first, bytes([0x17, 0, 0, 0, 0]) + clip.video_extradata))
    if clip.audio_extradata:
        out.append(("audio", ts_base + first, bytes([0xAF, 0]) + clip.audio_extradata))
    for p in clip.packets:
        if p.kind == "video":
            cts = p.cts & 0xFFFFFF
            head = bytes([(1 if p.keyframe else 2) << 4 | 7, 1]) + cts.to_bytes(3, "big")
            out.append(("video", ts_base + p.dts, head + p.data))
        else:
            out.append(("audio", ts_base + p.dts, bytes([0xAF, 1]) + p.data))
    return out


# --------------------------------------------------------------------------
# publishing with the ffmpeg CLI


def ffmpeg_publish(
    clip_path: Path,
    url: str,
    *,
    realtime: bool = True,
    extra_output_args: Sequence[str] = (),
    log_path: Path | None = None,
) -> subprocess.Popen:
    """Start `ffmpeg [-re] -i clip -c copy -f flv URL`; stderr goes to `log_path`."""
    args = [FFMPEG, "-hide_banner", "-nostdin", "-v", "warning"]
    if realtime:
        args.append("-re")
    args += ["-i", str(clip_path), "-c", "copy", *extra_output_args, "-f", "flv", url]
    stderr = open(log_path, "wb") if log_path else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
    finally:
        if log_path:
            stderr.close()
    proc.log_path = log_path  # type: ignore[attr-defined]
    return proc


def ffmpeg_log(proc: subprocess.Popen) -> str:
    path = getattr(proc, "log_path", None)
    if path and Path(path).exists():
        return Path(path).read_text(errors="replace")
    return ""


def wait_proc(proc: subprocess.Popen, timeout: float, what: str = "ffmpeg") -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"{what} did not finish within {timeout}s; its log:\n{ffmpeg_log(proc)}")


# --------------------------------------------------------------------------
# HTTP


@dataclass
class HttpResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


def http_get(url: str, timeout: float = 5.0, raw_path: str | None = None) -> HttpResponse:
    """GET without any client-side path normalisation (raw_path is sent as is)."""
    parts = urllib.parse.urlsplit(url)
    path = raw_path if raw_path is not None else (parts.path or "/") + (
        "?" + parts.query if parts.query else ""
    )
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.endheaders()
        resp = conn.getresponse()
        body = resp.read()
        headers = {k.lower(): v for k, v in resp.getheaders()}
        return HttpResponse(resp.status, headers, body)
    finally:
        conn.close()


# --------------------------------------------------------------------------
# reading the HLS output


@dataclass
class OutFrame:
    """One output frame from an MPEG-TS segment, timestamps in 90 kHz ticks."""

    kind: str
    pts: int
    dts: int
    payload: tuple[bytes, ...]
    """Video: the compared NAL units. Audio: one raw AAC frame (ADTS header stripped)."""
    keyframe: bool
    carried: bool = True
    """Audio: False when the timestamp was interpolated by the demuxer (the frame
    was not the first one of its PES packet, so no PTS of its own was written)."""
    segment: int = -1
    uri: str = ""


@dataclass
class Segment:
    seq: int
    uri: str
    duration: float
    discontinuity: bool
    data: bytes
    _frames: tuple[list[OutFrame], list[OutFrame]] | None = field(default=None, repr=False)
    params: dict[str, tuple] = field(default_factory=dict, repr=False)
    """Codec parameters as the demuxer sees them (like `Clip.params`)."""

    def frames(self) -> tuple[list[OutFrame], list[OutFrame]]:
        if self._frames is None:
            self._frames = demux_segment(self.data, seq=self.seq, uri=self.uri, params=self.params)
        return self._frames

    @property
    def video(self) -> list[OutFrame]:
        return self.frames()[0]

    @property
    def audio(self) -> list[OutFrame]:
        return self.frames()[1]


def split_annexb(data: bytes) -> list[bytes]:
    """NAL units of an Annex B byte stream (start codes removed)."""
    nals = []
    for piece in data.split(b"\x00\x00\x01"):
        piece = piece.rstrip(b"\x00")  # 4-byte start codes and trailing_zero_8bits
        if piece:
            nals.append(piece)
    return nals


def split_avcc(data: bytes, length_size: int = 4) -> list[bytes]:
    nals = []
    pos, n = 0, len(data)
    while pos + length_size <= n:
        size = int.from_bytes(data[pos : pos + length_size], "big")
        pos += length_size
        if size == 0 or pos + size > n:
            raise ValueError(f"bad AVCC NAL length {size} at offset {pos - length_size} of {n}")
        nals.append(data[pos : pos + size].rstrip(b"\x00"))
        pos += size
    if pos != n:
        raise ValueError(f"{n - pos} trailing bytes after AVCC NAL units")
    return nals


def compared_nals(nals: Iterable[bytes]) -> tuple[bytes, ...]:
    return tuple(n for n in nals if n and (n[0] & 0x1F) not in IGNORED_NAL_TYPES)


def nal_types(payload: Iterable[bytes]) -> list[int]:
    return [n[0] & 0x1F for n in payload]


def is_idr(payload: Iterable[bytes]) -> bool:
    return any((n[0] & 0x1F) == 5 for n in payload)


def split_adts(data: bytes) -> list[bytes]:
    """Raw AAC frames of a run of ADTS frames (headers stripped)."""
    frames = []
    pos, n = 0, len(data)
    while pos < n:
        if n - pos < 7 or data[pos] != 0xFF or (data[pos + 1] & 0xF6) != 0xF0:
            raise ValueError(f"no ADTS sync word at offset {pos} of {n}: {data[pos:pos + 8].hex()}")
        protection_absent = data[pos + 1] & 1
        header = 7 if protection_absent else 9
        length = ((data[pos + 3] & 3) << 11) | (data[pos + 4] << 3) | (data[pos + 5] >> 5)
        if length < header or pos + length > n:
            raise ValueError(f"bad ADTS frame length {length} at offset {pos} of {n}")
        frames.append(data[pos + header : pos + length])
        pos += length
    return frames


def pes_timestamps(data: bytes) -> dict[int, list[int]]:
    """PTS of every PES packet start, per PID, scanned straight from the TS packets."""
    out: dict[int, list[int]] = {}
    for off in range(0, len(data) - 187, 188):
        if data[off] != 0x47:
            raise ValueError(f"MPEG-TS sync byte missing at offset {off}")
        pusi = data[off + 1] & 0x40
        if not pusi:
            continue
        pid = ((data[off + 1] & 0x1F) << 8) | data[off + 2]
        afc = (data[off + 3] >> 4) & 3
        pos = off + 4
        if afc & 2:
            pos += 1 + data[pos]
        if not afc & 1 or pos + 14 > off + 188:
            continue
        if data[pos : pos + 3] != b"\x00\x00\x01":
            continue  # a PSI section (PAT/PMT), not a PES
        flags = data[pos + 7]
        if flags & 0x80:
            b = data[pos + 9 : pos + 14]
            pts = ((b[0] >> 1) & 7) << 30 | b[1] << 22 | (b[2] >> 1) << 15 | b[3] << 7 | b[4] >> 1
            out.setdefault(pid, []).append(pts)
    return out


def demux_segment(
    data: bytes, seq: int = -1, uri: str = "", params: dict[str, tuple] | None = None
) -> tuple[list[OutFrame], list[OutFrame]]:
    """Demux one MPEG-TS segment with PyAV into normalised video and audio frames."""
    video: list[OutFrame] = []
    audio: list[OutFrame] = []
    pes = pes_timestamps(data)
    with av.open(io.BytesIO(data), format="mpegts") as container:
        audio_pids = {s.id for s in container.streams if s.type == "audio"}
        if params is not None:
            for st in container.streams:
                cc = st.codec_context
                if st.type == "video":
                    params["video"] = (cc.name, cc.width, cc.height)
                elif st.type == "audio":
                    params["audio"] = (cc.name, cc.sample_rate, cc.channels)
        carried = {pts for pid in audio_pids for pts in pes.get(pid, ())}
        for pkt in container.demux():
            if pkt.size == 0:
                continue
            tb = pkt.stream.time_base
            assert tb == Fraction(1, 90000), f"{uri}: MPEG-TS time base should be 1/90000, is {tb}"
            pts = int(pkt.pts) if pkt.pts is not None else None
            dts = int(pkt.dts) if pkt.dts is not None else pts
            if pts is None:
                pts = dts
            assert pts is not None, f"{uri}: packet without any timestamp"
            raw = bytes(pkt)
            if pkt.stream.type == "video":
                payload = compared_nals(split_annexb(raw))
                video.append(OutFrame("video", pts, dts, payload, is_idr(payload), True, seq, uri))
            elif pkt.stream.type == "audio":
                frames = split_adts(raw)
                for i, frame in enumerate(frames):
                    # PyAV's parser normally yields one ADTS frame per packet; if it
                    # ever gives several, the later ones have implied timestamps.
                    step = i * 1920  # 1024 samples at 48 kHz in 90 kHz ticks
                    t = (pts + step) % TS_WRAP
                    audio.append(
                        OutFrame("audio", t, t, (frame,), True, i == 0 and pts in carried, seq, uri)
                    )
    return video, audio


def ffprobe_check(data: bytes, label: str) -> None:
    """Decode the segment with ffprobe; any message on stderr is a failure."""
    proc = subprocess.run(
        [FFPROBE, "-v", "error", "-f", "mpegts", "-show_frames", "-of", "compact", "-i", "pipe:0"],
        input=data,
        capture_output=True,
        timeout=60,
    )
    err = proc.stderr.decode(errors="replace").strip()
    assert proc.returncode == 0 and not err, (
        f"ffprobe reports problems in {label} (rc={proc.returncode}):\n{err[:3000]}"
    )


@dataclass
class HlsOutput:
    url: str
    text: str
    playlist: m3u8.M3U8
    segments: list[Segment]

    @property
    def endlist(self) -> bool:
        return bool(self.playlist.is_endlist)


def read_hls(playlist_url: str, *, probe: bool = True, timeout: float = 5.0) -> HlsOutput:
    """Fetch the playlist and every segment it lists, in order (as a player would)."""
    resp = http_get(playlist_url, timeout=timeout)
    assert resp.status == 200, f"GET {playlist_url} -> {resp.status}: {resp.body[:300]!r}"
    text = resp.body.decode("utf-8")
    playlist = m3u8.loads(text, uri=playlist_url)
    segments = []
    seq0 = playlist.media_sequence or 0
    for i, s in enumerate(playlist.segments):
        url = urllib.parse.urljoin(playlist_url, s.uri)
        r = http_get(url, timeout=timeout)
        assert r.status == 200, f"GET {url} (listed in the playlist) -> {r.status}\nplaylist:\n{text}"
        seg = Segment(seq0 + i, s.uri, float(s.duration), bool(s.discontinuity), r.body)
        if probe:
            ffprobe_check(seg.data, f"segment #{seg.seq} {seg.uri}")
        segments.append(seg)
    return HlsOutput(playlist_url, text, playlist, segments)


def read_hls_dir(directory: Path, *, probe: bool = True) -> HlsOutput:
    """The HLS output straight from disk (for when the server is down)."""
    directory = Path(directory)
    text = (directory / "index.m3u8").read_text()
    playlist = m3u8.loads(text)
    seq0 = playlist.media_sequence or 0
    segments = []
    for i, s in enumerate(playlist.segments):
        path = directory / s.uri
        assert path.exists(), f"{path} listed in the playlist but missing:\n{text}"
        seg = Segment(seq0 + i, s.uri, float(s.duration), bool(s.discontinuity), path.read_bytes())
        if probe:
            ffprobe_check(seg.data, f"segment #{seg.seq} {seg.uri}")
        segments.append(seg)
    return HlsOutput(str(directory / "index.m3u8"), text, playlist, segments)


def check_playlist_text(text: str, label: str = "playlist") -> m3u8.M3U8:
    """Structural checks every live playlist must pass; returns the parsed playlist."""
    lines = text.splitlines()
    assert lines and lines[0] == "#EXTM3U", f"{label}: does not start with #EXTM3U:\n{text}"
    assert "#EXT-X-VERSION:3" in lines, f"{label}: no #EXT-X-VERSION:3:\n{text}"
    assert any(l.startswith("#EXT-X-TARGETDURATION:") for l in lines), f"{label}: no TARGETDURATION"
    assert any(l.startswith("#EXT-X-MEDIA-SEQUENCE:") for l in lines), f"{label}: no MEDIA-SEQUENCE"
    playlist = m3u8.loads(text)
    target = playlist.target_duration
    assert target is not None and float(target) == int(target), f"{label}: bad target {target}"
    for s in playlist.segments:
        assert s.duration is not None and s.duration > 0, f"{label}: bad EXTINF for {s.uri}"
        assert round(s.duration) <= int(target), (
            f"{label}: EXTINF {s.duration} of {s.uri} rounds above TARGETDURATION {target}:\n{text}"
        )
        parsed = urllib.parse.urlsplit(s.uri)
        assert not parsed.scheme and not s.uri.startswith("/") and ".." not in s.uri.split("/"), (
            f"{label}: segment URI {s.uri!r} is not a plain relative URI"
        )
    return playlist


class HlsPoller(threading.Thread):
    """A viewer: polls the playlist, downloads every new segment once, and
    records every violation of the live-playlist rules in `errors`."""

    def __init__(self, playlist_url: str, interval: float = 0.1, max_segments: int | None = None):
        super().__init__(daemon=True)
        self.url = playlist_url
        self.max_segments = max_segments
        self.interval = interval
        self.segments: dict[int, Segment] = {}
        self.errors: list[str] = []
        self.polls = 0
        self.texts: list[str] = []
        self.last_text = ""
        self.endlist_seen_at: float | None = None
        self.first_seen_at: float | None = None
        self._stop_event = threading.Event()
        self._last_seq: int | None = None
        self._target: int | None = None

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self._poll()
            except Exception as exc:  # noqa: BLE001 - recorded, the test fails on it
                self.errors.append(f"poll {self.polls}: {type(exc).__name__}: {exc}")
            self._stop_event.wait(self.interval)

    def _poll(self) -> None:
        self.polls += 1
        resp = http_get(self.url, timeout=5)
        if resp.status == 404 and self.first_seen_at is None:
            return  # not published yet
        if resp.status != 200:
            self.errors.append(f"poll {self.polls}: playlist -> HTTP {resp.status}")
            return
        text = resp.body.decode("utf-8")
        if self.first_seen_at is None:
            self.first_seen_at = time.monotonic()
        if text != self.last_text:
            self.texts.append(text)
            self.last_text = text
        try:
            playlist = check_playlist_text(text, f"poll {self.polls}")
        except AssertionError as exc:
            self.errors.append(str(exc))
            return
        seq0 = playlist.media_sequence or 0
        if self._last_seq is not None and seq0 < self._last_seq:
            self.errors.append(
                f"poll {self.polls}: EXT-X-MEDIA-SEQUENCE went back from {self._last_seq} to {seq0}:\n{text}"
            )
        self._last_seq = seq0 if self._last_seq is None else max(self._last_seq, seq0)
        target = int(playlist.target_duration)
        if self._target is not None and target != self._target:
            self.errors.append(
                f"poll {self.polls}: EXT-X-TARGETDURATION changed from {self._target} to {target} "
                "(RFC 8216 4.3.3.1: it MUST NOT change)"
            )
        self._target = target
        if self.max_segments is not None and len(playlist.segments) > self.max_segments:
            self.errors.append(
                f"poll {self.polls}: {len(playlist.segments)} segments listed, "
                f"playlist_size is {self.max_segments}:\n{text}"
            )
        for i, s in enumerate(playlist.segments):
            seq = seq0 + i
            known = self.segments.get(seq)
            if known is not None:
                if known.uri != s.uri:
                    self.errors.append(
                        f"poll {self.polls}: media sequence {seq} was {known.uri}, now {s.uri}"
                    )
                continue
            url = urllib.parse.urljoin(self.url, s.uri)
            r = http_get(url, timeout=5)
            if r.status != 200:
                self.errors.append(f"poll {self.polls}: GET {s.uri} (seq {seq}) -> {r.status}")
                continue
            self.segments[seq] = Segment(seq, s.uri, float(s.duration), bool(s.discontinuity), r.body)
        if playlist.is_endlist and self.endlist_seen_at is None:
            self.endlist_seen_at = time.monotonic()
        if not playlist.is_endlist:
            self.endlist_seen_at = None

    def wait_endlist(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.endlist_seen_at is not None:
                return True
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)

    def ordered(self) -> list[Segment]:
        return [self.segments[k] for k in sorted(self.segments)]

    def assert_clean(self) -> None:
        assert not self.errors, "the playlist poller saw problems:\n" + "\n".join(self.errors[:20])
        seqs = sorted(self.segments)
        missing = sorted(set(range(seqs[0], seqs[-1] + 1)) - set(seqs)) if seqs else []
        assert not missing, f"the poller never saw media sequence numbers {missing}"


def wait_for_playlist(url: str, timeout: float, predicate=lambda text: True) -> str:
    """Poll until the playlist exists and predicate(text) holds; return its text."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            r = http_get(url, timeout=2)
            last = (r.status, r.body[:2000])
            if r.status == 200 and predicate(r.body.decode()):
                return r.body.decode()
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise AssertionError(f"playlist {url} not ready within {timeout}s; last answer: {last!r}")


def wait_for_endlist(url: str, timeout: float) -> str:
    return wait_for_playlist(url, timeout, lambda t: "#EXT-X-ENDLIST" in t)


def split_at_discontinuities(segments: Sequence[Segment]) -> list[list[Segment]]:
    groups: list[list[Segment]] = []
    for seg in segments:
        if not groups or seg.discontinuity:
            groups.append([])
        groups[-1].append(seg)
    return groups


# --------------------------------------------------------------------------
# comparison


def _mod(x: int) -> int:
    return x % TS_WRAP


def _signed(x: int) -> int:
    """A difference modulo 2**33 as the nearest signed value."""
    x %= TS_WRAP
    return x - TS_WRAP if x >= TS_WRAP // 2 else x


def _describe_in(p: Packet, i: int) -> str:
    what = f"{p.kind} frame {i} (input dts={p.dts}ms pts={p.pts}ms"
    if p.kind == "video":
        what += f", key={p.keyframe}"
    return what + f", {len(p.data)} bytes)"


def _describe_out(f: OutFrame) -> str:
    return f"output dts={f.dts} pts={f.pts} in segment #{f.segment} {f.uri}"


def _expected_payload(p: Packet, length_size: int) -> tuple[bytes, ...]:
    if p.kind == "video":
        return compared_nals(split_avcc(p.data, length_size))
    return (p.data,)


def _check_sequence(kind: str, inp: list[Packet], out: list[OutFrame], length_size: int, label: str) -> None:
    __tracebackhide__ = True
    expected = [_expected_payload(p, length_size) for p in inp]
    got = [f.payload for f in out]
    for i in range(min(len(expected), len(got))):
        if expected[i] != got[i]:
            # Explain the first mismatch: lost, duplicated or altered?
            try:
                where = got.index(expected[i], max(0, i - 50))
            except ValueError:
                where = -1
            dup = i > 0 and got[i] == expected[i - 1]
            if dup:
                reason = f"output frame {i} repeats input frame {i - 1} (duplicate)"
            elif where > i:
                reason = f"input frames {i}..{where - 1} missing from the output ({where - i} lost)"
            elif where == -1 and i + 1 < len(expected) and got[i] == expected[i + 1]:
                reason = f"input frame {i} missing from the output"
            else:
                reason = "payload differs"
            detail = ""
            if kind == "video":
                detail = (
                    f"\n  expected NAL types {nal_types(expected[i])} sizes {[len(n) for n in expected[i]]}"
                    f"\n  got      NAL types {nal_types(got[i])} sizes {[len(n) for n in got[i]]}"
                )
            else:
                detail = f"\n  expected {len(expected[i][0])} bytes, got {len(got[i][0])} bytes"
            raise AssertionError(
                f"{label}: {_describe_in(inp[i], i)} vs {_describe_out(out[i])}: {reason}{detail}"
            )
    if len(expected) != len(got):
        if len(got) < len(expected):
            tail = inp[len(got)]
            raise AssertionError(
                f"{label}: {kind}: output has {len(got)} frames, input {len(expected)}; "
                f"first missing: {_describe_in(tail, len(got))}, "
                f"last frame out: {_describe_out(out[-1]) if out else 'none'}"
            )
        raise AssertionError(
            f"{label}: {kind}: output has {len(got)} frames, input only {len(expected)}; "
            f"first extra: {_describe_out(out[len(expected)])}"
        )


def _check_timestamps(
    kind: str, inp: list[Packet], out: list[OutFrame], label: str, tolerance: int = 0
) -> int | None:
    """Every carried timestamp equals input*90 + one constant (mod 2**33), within
    `tolerance` ticks. Returns that constant."""
    offset = None
    ref = None
    for i, (p, f) in enumerate(zip(inp, out)):
        if not f.carried:
            continue
        od = _mod(f.dts - p.dts * 90)
        op = _mod(f.pts - p.pts * 90)
        if offset is None:
            offset, ref = od, i
        if abs(_signed(od - offset)) > tolerance or abs(_signed(op - offset)) > tolerance:
            base = inp[ref]
            raise AssertionError(
                f"{label}: {kind} timestamps not continuous at {_describe_in(p, i)}: "
                f"{_describe_out(f)}; expected dts={_mod(p.dts * 90 + offset)} "
                f"pts={_mod(p.pts * 90 + offset)} (offset {offset} ticks fixed by frame {ref} "
                f"dts={base.dts}ms); dts off by {_signed(od - offset)} ticks, "
                f"pts off by {_signed(op - offset)} ticks"
            )
    if offset is None:
        return None
    # Frames whose timestamp the demuxer interpolated (several AAC frames in one
    # PES): exact sample timing, the input is ms-rounded -> within 1 ms + 1 tick.
    for i, (p, f) in enumerate(zip(inp, out)):
        if f.carried:
            continue
        d = _signed(f.dts - p.dts * 90 - offset)
        if abs(d) > 91 + tolerance:
            raise AssertionError(
                f"{label}: {kind} {_describe_in(p, i)}: implied timestamp {f.dts} "
                f"is {d} ticks away from input*90+offset ({_describe_out(f)})"
            )
    return offset


def _aligned(inp: list[Packet], out: list[OutFrame], length_size: int) -> tuple[list[Packet], list[OutFrame]]:
    """The input and output frames that match by payload, paired in order."""
    import difflib

    expected = [hash(_expected_payload(p, length_size)) for p in inp]
    got = [hash(f.payload) for f in out]
    matcher = difflib.SequenceMatcher(None, expected, got, autojunk=False)
    pairs_in, pairs_out = [], []
    for block in matcher.get_matching_blocks():
        pairs_in += inp[block.a : block.a + block.size]
        pairs_out += out[block.b : block.b + block.size]
    return pairs_in, pairs_out


@dataclass
class Report:
    video_frames: int = 0
    audio_frames: int = 0
    segments: int = 0
    video_offset: int | None = None
    audio_offset: int | None = None
    longest_segment: float = 0.0
    output_wrapped: bool = False


def assert_exact(
    clip: Clip | Sequence[Clip],
    segments: Sequence[Segment],
    *,
    segment_target: float,
    label: str = "",
    probe: bool = False,
    av_sync_ticks: int = 90,
    audio_ts_tolerance: int = 0,
    prefix: bool = False,
    max_gap_without_discontinuity: float = 1.0,
) -> Report:
    """Assert that `segments` hold exactly `clip`: every frame once, in order,
    payload-identical, timestamps = input + one constant per track (mod 2**33),
    audio and video offsets equal, segments start on a keyframe and are no
    longer than target + 1 GOP, no EXT-X-DISCONTINUITY inside.

    `clip` may be a list of parts sent one after the other in ONE publish whose
    clock jumps between parts: each part then has its own offset, and at a part
    boundary the output either has an EXT-X-DISCONTINUITY on the segment that
    starts with the part's first frame, or stays continuous (a step of at most
    `max_gap_without_discontinuity` seconds on each track).

    `audio_ts_tolerance` (ticks) exists only for references made by the ffmpeg
    CLI, which re-times copied audio to sample precision when the output time
    base is finer than the input's; the server must keep it 0.
    `prefix`: the publish was cut short; the output must be exactly a prefix of
    the clip (every frame up to some point, then nothing).
    """
    __tracebackhide__ = True
    parts = [clip] if isinstance(clip, Clip) else list(clip)
    label = label or parts[0].path.name
    assert segments, f"{label}: no segments at all"
    problems: list[str] = []

    def check(fn, *args):
        try:
            return fn(*args)
        except AssertionError as exc:
            problems.append(str(exc))
            return None

    def require(ok: bool, text: str) -> None:
        if not ok:
            problems.append(f"{label}: {text}")

    report = Report(segments=len(segments))
    out_video = [f for s in segments for f in s.video]
    out_audio = [f for s in segments for f in s.audio]
    in_video = [p for c in parts for p in c.video]
    in_audio = [p for c in parts for p in c.audio]
    # Where each part starts in the concatenated input, per track.
    vstarts, astarts = [0], [0]
    for c in parts:
        vstarts.append(vstarts[-1] + len(c.video))
        astarts.append(astarts[-1] + len(c.audio))
    if prefix:
        in_video, in_audio = in_video[: len(out_video)], in_audio[: len(out_audio)]
    has_video = bool(in_video) or any(c.video for c in parts)
    ls = parts[0].avc_length_size if has_video else 4
    report.video_frames, report.audio_frames = len(out_video), len(out_audio)

    # Payloads, each track on its own: a problem in one does not hide the other's.
    n = len(problems)
    check(_check_sequence, "video", in_video, out_video, ls, label)
    video_ok = len(problems) == n
    n = len(problems)
    check(_check_sequence, "audio", in_audio, out_audio, ls, label)
    audio_ok = len(problems) == n

    # Timestamps, per part. When frames are missing or extra (single part
    # only), on the frames that do match, so a lost frame does not hide a
    # timing problem.
    def part_slices(inp, out, starts, ok):
        if ok:
            return [(inp[a:b], out[a:b]) for a, b in zip(starts, starts[1:])]
        if len(parts) == 1:
            return [_aligned(inp, out, ls)]
        return []

    for k, ((iv, ov), (ia, oa)) in enumerate(
        zip(part_slices(in_video, out_video, vstarts, video_ok) or [([], [])] * len(parts),
            part_slices(in_audio, out_audio, astarts, audio_ok) or [([], [])] * len(parts))
    ):
        plabel = label if len(parts) == 1 else f"{label} (part {k})"
        voff = check(_check_timestamps, "video", iv, ov, plabel) if iv else None
        aoff = check(_check_timestamps, "audio", ia, oa, plabel, audio_ts_tolerance) if ia else None
        if k == 0:
            report.video_offset, report.audio_offset = voff, aoff
        if voff is not None and aoff is not None:
            skew = _signed(aoff - voff)
            require(abs(skew) <= av_sync_ticks,
                    f"{'' if len(parts) == 1 else f'part {k}: '}audio is shifted by {skew} ticks "
                    f"({skew / 90:.1f} ms) relative to video (input A/V sync not kept)")
    for frames in (out_video, out_audio):
        for x, y in zip(frames, frames[1:]):
            if _mod(y.dts) < _mod(x.dts) and _mod(x.dts) - _mod(y.dts) > TS_WRAP // 2:
                report.output_wrapped = True

    # Discontinuities: only on a segment that starts a new part.
    part_first = set()
    if video_ok and audio_ok:
        for i in vstarts[1:-1]:
            if i < len(out_video):
                part_first.add(id(out_video[i]))
        for i in astarts[1:-1]:
            if i < len(out_audio):
                part_first.add(id(out_audio[i]))
    track_first = lambda seg: (seg.video or seg.audio or [None])[0]  # noqa: E731
    for k, seg in enumerate(segments):
        if probe:
            check(ffprobe_check, seg.data, f"{label} segment #{seg.seq} {seg.uri}")
        if k and seg.discontinuity:
            first = track_first(seg)
            require(first is not None and id(first) in part_first,
                    f"unexpected EXT-X-DISCONTINUITY before segment #{seg.seq} {seg.uri} "
                    "(the publisher's clock did not jump there)")
    # At each part boundary: either a discontinuity segment that holds the new
    # part's first frames (and none of the old part's), or continuity.
    if video_ok and audio_ok:
        disc_segments = {id(track_first(seg)): seg for k, seg in enumerate(segments) if k and seg.discontinuity}
        for p in range(1, len(parts)):
            tracks = [("video", out_video, vstarts[p]), ("audio", out_audio, astarts[p])]
            tracks = [(kind, frames, i) for kind, frames, i in tracks if 0 < i < len(frames)]
            cover = None
            for kind, frames, i in tracks:
                cover = cover or disc_segments.get(id(frames[i]))
            for kind, frames, i in tracks:
                if cover is not None:
                    require(frames[i - 1].segment < cover.seq <= frames[i].segment,
                            f"{kind} frames of part {p - 1} and {p} are not separated by the "
                            f"EXT-X-DISCONTINUITY before segment #{cover.seq}: last of part {p - 1} in "
                            f"#{frames[i - 1].segment}, first of part {p} in #{frames[i].segment}")
                else:
                    step = _signed(frames[i].dts - frames[i - 1].dts) / 90000
                    require(0 < step <= max_gap_without_discontinuity,
                            f"{kind} output jumps by {step:.3f}s between input frames {i - 1} and {i} "
                            f"({_describe_out(frames[i])}) without an EXT-X-DISCONTINUITY")

    # Codec parameters as a player sees them (a wrong ADTS sampling index or a
    # lost SPS decodes without errors but plays wrong).
    for seg in segments:
        seg.frames()
        require(set(seg.params) == set(parts[0].params),
                f"segment #{seg.seq} {seg.uri} has tracks {sorted(seg.params)}, the input "
                f"{sorted(parts[0].params)}")
        for kind, value in parts[0].params.items():
            got = seg.params.get(kind)
            if not (seg.video if kind == "video" else seg.audio):
                continue  # no frames of that track here: nothing to describe it
            require(got is None or got == value,
                    f"segment #{seg.seq} {seg.uri}: {kind} is {got}, the input {value}")

    # Segment structure.
    gop = max((c.gop_seconds() for c in parts), default=0.0) if has_video else 0.0
    slack = gop if has_video else 0.1  # audio-only: cut on any frame
    limit = segment_target + slack + 0.05
    for k, seg in enumerate(segments):
        frames = seg.video if has_video else seg.audio
        if not frames:
            require(False, f"segment #{seg.seq} {seg.uri} holds no {'video' if has_video else 'audio'}")
            continue
        if has_video:
            first = frames[0]
            require(first.keyframe,
                    f"segment #{seg.seq} {seg.uri} starts with a non-keyframe "
                    f"(NAL types {nal_types(first.payload)}, dts={first.dts})")
        start = frames[0].dts
        nxt_seg = segments[k + 1] if k + 1 < len(segments) else None
        nxt = (nxt_seg.video if has_video else nxt_seg.audio) if nxt_seg else None
        ends_timeline = nxt_seg is None or nxt_seg.discontinuity or not nxt
        if not ends_timeline:
            end = nxt[0].dts
        else:
            step = 3000 if has_video else 1920
            end = frames[-1].dts + step
        measured = _mod(end - start) / 90000
        report.longest_segment = max(report.longest_segment, measured, seg.duration)
        require(seg.duration <= limit,
                f"segment #{seg.seq} {seg.uri} EXTINF {seg.duration:.3f}s > target "
                f"{segment_target} + GOP {slack:.3f}s")
        require(measured <= limit,
                f"segment #{seg.seq} {seg.uri} holds {measured:.3f}s of media > target "
                f"{segment_target} + GOP {slack:.3f}s")
        require(abs(measured - seg.duration) <= 0.1 or ends_timeline,
                f"segment #{seg.seq} {seg.uri} EXTINF {seg.duration:.3f}s but holds "
                f"{measured:.3f}s of media")
    if problems:
        shown = problems[:12]
        more = f"\n... and {len(problems) - 12} more" if len(problems) > 12 else ""
        raise AssertionError(f"{len(problems)} problem(s):\n" + "\n".join(shown) + more)
    return report


_REASON = re.compile(r'reason=("(?:[^"\\]|\\.)*"|\S+)')


def log_reason(line: str) -> str:
    """The `reason=` field of a server log line (the whole line if it has none)."""
    m = _REASON.search(line)
    if not m:
        return line
    value = m.group(1)
    return value[1:-1] if value.startswith('"') else value


# --------------------------------------------------------------------------
# raw RTMP bytes (for tests that must send what no well-behaved client sends)


def amf0(*values) -> bytes:
    out = bytearray()
    for v in values:
        out += _amf0_value(v)
    return bytes(out)


def _amf0_value(v) -> bytes:
    if v is None:
        return b"\x05"
    if isinstance(v, bool):
        return b"\x01" + (b"\x01" if v else b"\x00")
    if isinstance(v, (int, float)):
        return b"\x00" + struct.pack(">d", float(v))
    if isinstance(v, str):
        b = v.encode()
        return b"\x02" + struct.pack(">H", len(b)) + b
    if isinstance(v, dict):
        out = bytearray(b"\x03")
        for k, x in v.items():
            kb = k.encode()
            out += struct.pack(">H", len(kb)) + kb + _amf0_value(x)
        out += b"\x00\x00\x09"
        return bytes(out)
    raise TypeError(type(v))


def rtmp_chunks(
    csid: int, timestamp: int, type_id: int, stream_id: int, payload: bytes, chunk_size: int = 128
) -> bytes:
    """One RTMP message as a type-0 chunk plus type-3 continuation chunks."""
    assert 2 <= csid <= 63
    ts = min(timestamp, 0xFFFFFF)
    header = bytes([csid]) + ts.to_bytes(3, "big") + len(payload).to_bytes(3, "big")
    header += bytes([type_id]) + stream_id.to_bytes(4, "little")
    if ts == 0xFFFFFF:
        header += timestamp.to_bytes(4, "big")
    out = bytearray(header)
    for i in range(0, max(len(payload), 1), chunk_size):
        if i:
            out.append(0xC0 | csid)
            if ts == 0xFFFFFF:
                out += timestamp.to_bytes(4, "big")
        out += payload[i : i + chunk_size]
    return bytes(out)


def rtmp_command(name: str, txn: float, *args, stream_id: int = 0, csid: int = 3) -> bytes:
    return rtmp_chunks(csid, 0, 20, stream_id, amf0(name, txn, *args))


def connect_command(app: str, tc_url: str) -> bytes:
    return rtmp_command(
        "connect", 1, {"app": app, "type": "nonprivate", "flashVer": "FMLE/3.0", "tcUrl": tc_url}
    )


def rtmp_handshake(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Plain (unsigned) RTMP handshake as a client; returns S1."""
    sock.settimeout(timeout)
    c1 = struct.pack(">II", 0, 0) + os.urandom(1528)
    sock.sendall(b"\x03" + c1)
    s0s1s2 = recv_exactly(sock, 1 + 1536 + 1536)
    assert s0s1s2[0] == 3, f"server answered RTMP version {s0s1s2[0]}"
    s1 = s0s1s2[1:1537]
    sock.sendall(s1)  # C2 echoes S1
    return s1


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"peer closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def wait_closed(sock: socket.socket, timeout: float) -> tuple[bool, float]:
    """Read (and discard) until the peer closes; returns (closed, seconds waited)."""
    start = time.monotonic()
    deadline = start + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False, time.monotonic() - start
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except socket.timeout:
            return False, time.monotonic() - start
        except (ConnectionResetError, BrokenPipeError):
            return True, time.monotonic() - start
        if not data:
            return True, time.monotonic() - start


# --------------------------------------------------------------------------
# the clips the suite uses (small and short: the suite runs on 2 cores)

AV = ClipSpec()
"""8 s, 320x180, 30 fps, 1 s GOP, H.264 (no B-frames) + AAC 48 kHz stereo."""
BFRAMES = ClipSpec(bframes=2)
"""Same with 2 B-frames between references: cts != 0."""
LONG_GOP = ClipSpec(gop=90, duration=9.0)
"""3 s GOP, longer than the 2 s segment target: segments are cut at 3 s."""
AUDIO_ONLY = ClipSpec(kind="audio")
VIDEO_ONLY = ClipSpec(kind="video")
SMALL = ClipSpec(duration=6.0, width=160, height=90)
"""For the many-publisher tests."""


# --------------------------------------------------------------------------
# publishing with PyAV's own RTMP (FLV) muxer


def pyav_publish(clip: Clip, url: str, *, paced: bool = True, speed: float = 1.0) -> int:
    """Mux the clip's packets (copied, timestamps untouched) to `url` with PyAV.

    `paced`: send each packet no earlier than its dts on the wall clock
    (divided by `speed`); otherwise as fast as the socket takes them.
    Returns the number of packets sent.
    """
    sent = 0
    with av.open(str(clip.path)) as inp, av.open(url, "w", format="flv") as out:
        streams = {
            s.index: out.add_stream_from_template(s)
            for s in inp.streams
            if s.type in ("video", "audio")
        }
        start = time.monotonic()
        first = None
        for pkt in inp.demux():
            if pkt.size == 0 or pkt.stream.index not in streams:
                continue
            if paced and pkt.dts is not None:
                if first is None:
                    first = pkt.dts
                due = start + (pkt.dts - first) / 1000 / speed
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            pkt.stream = streams[pkt.stream.index]
            out.mux(pkt)
            sent += 1
    return sent


# --------------------------------------------------------------------------
# a publisher built on the project's sans-I/O RTMP client core


class CorePublisher:
    """Publishes over a blocking socket with `mediaserver.proto.rtmp.ClientConnection`.

    Events are matched by class name so this file does not depend on where the
    core defines them.
    """

    def __init__(self, host: str, port: int, name: str, app: str = "live", timeout: float = 10.0):
        from mediaserver.proto import rtmp

        self.name = name
        self.app = app
        self.tc_url = f"rtmp://{host}:{port}/{app}"
        self.conn = rtmp.ClientConnection(out_chunk_size=4096)
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.timeout = timeout
        self.events: list = []
        self.stream_id: int | None = None

    @property
    def local_port(self) -> int:
        return self.sock.getsockname()[1]

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def _read(self, timeout: float) -> bool:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except (socket.timeout, BlockingIOError):
            return True
        if not data:
            return False
        self.events += self.conn.feed(data)
        self.flush()
        return True

    def drain(self) -> None:
        """Read whatever the server sent (acks, pings) without blocking."""
        import select

        while select.select([self.sock], [], [], 0)[0]:
            if not self._read(0.5):
                raise ConnectionError("server closed the connection")

    def wait_event(self, kind: str, timeout: float | None = None):
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            for i, ev in enumerate(self.events):
                if type(ev).__name__ == kind:
                    return self.events.pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"no {kind} within {timeout or self.timeout}s; events so far: {self.events}"
                )
            self.flush()
            if not self._read(min(left, 0.5)):
                raise ConnectionError(f"server closed the connection while waiting for {kind}; events: {self.events}")

    def open(self) -> None:
        """Handshake, connect, createStream, publish; asserts NetStream.Publish.Start."""
        self.handshake()
        self.connect_app()
        self.start_publish()

    def handshake(self) -> None:
        self.flush()  # C0+C1
        self.wait_event("HandshakeDone")  # C2 is queued by the core; nothing may precede it

    def connect_app(self) -> None:
        self.conn.connect(self.app, self.tc_url)
        self.flush()
        self.wait_event("ConnectResult")

    def start_publish(self) -> None:
        """createStream, publish; asserts NetStream.Publish.Start."""
        self.conn.create_stream()
        self.flush()
        created = self.wait_event("StreamCreated")
        self.stream_id = getattr(created, "stream_id", None)
        self.conn.publish(self.name)
        self.flush()
        status = self.wait_event("PublishStatus")
        code = getattr(status, "code", "")
        assert code == "NetStream.Publish.Start", f"publish refused: {status}"

    def send(self, kind: str, timestamp: int, body: bytes) -> None:
        ts = timestamp & 0xFFFFFFFF
        if kind == "video":
            self.conn.send_video(ts, body)
        else:
            self.conn.send_audio(ts, body)
        self.flush()

    def send_metadata(self, meta: dict) -> None:
        self.conn.send_metadata(meta)
        self.flush()

    def finish(self) -> None:
        """deleteStream, then a graceful close: our FIN, then read until the server's.
        (Closing with the server's acknowledgements unread would reset the connection,
        and the server would lose what it had not read yet.)"""
        self.conn.delete_stream()
        self.flush()
        try:
            self.sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + self.timeout
            self.sock.settimeout(1.0)
            while time.monotonic() < deadline:
                try:
                    if not self.sock.recv(65536):
                        break
                except socket.timeout:
                    continue
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def is_sequence_header(body: bytes) -> bool:
    """An AVC or AAC sequence header FLV tag body (AVCPacketType / AACPacketType 0)."""
    return len(body) > 1 and body[1] == 0 and (body[0] & 0x0F in (7,) or body[0] >> 4 == 10)


def core_publish(
    clip: Clip,
    host: str,
    port: int,
    name: str,
    *,
    ts_base: int = 0,
    paced: bool = True,
    speed: float = 1.0,
    then: Sequence[tuple[Clip, int]] = (),
) -> CorePublisher:
    """Publish the whole clip with `CorePublisher`; RTMP timestamps are
    `(ts_base + dts) mod 2**32`. `then`: more (clip, ts_base) parts sent on the
    same stream right after (without new sequence headers), e.g. to make the
    publisher's clock jump."""
    pub = CorePublisher(host, port, name)
    pub.open()
    core_send_clip(pub, clip, ts_base=ts_base, paced=paced, speed=speed, then=then)
    return pub


def core_send_clip(
    pub: CorePublisher,
    clip: Clip,
    *,
    ts_base: int = 0,
    paced: bool = True,
    speed: float = 1.0,
    then: Sequence[tuple[Clip, int]] = (),
) -> None:
    """Metadata, the clip's tags (and `then`'s), deleteStream, close: on an open publish."""
    meta = {"duration": 0.0, "encoder": "mediaserver-tests"}
    if clip.video:
        meta.update(videocodecid=7.0, width=float(clip.spec.width if clip.spec else 0),
                    framerate=float(clip.spec.fps if clip.spec else 0))
    if clip.audio:
        meta.update(audiocodecid=10.0, audiosamplerate=48000.0, stereo=True)
    pub.send_metadata(meta)
    start = time.monotonic()
    elapsed = 0.0
    sent = 0
    for n, (part, base) in enumerate([(clip, ts_base), *then]):
        bodies = flv_tag_bodies(part, base)
        if n:
            bodies = [b for b in bodies if not is_sequence_header(b[2])]
        first = bodies[0][1]
        part_start = start + elapsed / speed
        for kind, ts, body in bodies:
            if paced:
                delay = part_start + (ts - first) / 1000 / speed - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            pub.send(kind, ts, body)
            sent += 1
            if sent % 32 == 0:
                pub.drain()
        elapsed += part.duration_ms / 1000
    pub.finish()
