"""MPEG-TS packetiser (ISO/IEC 13818-1), sans-I/O: PSI and PES in, 188-byte packets out.

Our own instead of PyAV's muxer because its whole state is the continuity
counter of each PID, which must go on from one segment file to the next
(players report "Packet corrupt" / "section discontinuity" when it restarts)
and must be plain data that a hand-over to another process can carry.

Layout follows FFmpeg so that tools see what they are used to: PMT on PID
0x1000, video on 0x100, audio on 0x101, PCR on the video PID (on the audio
PID when there is no video). Timestamps come in as milliseconds and go out as
90 kHz ticks modulo 2**33, so a stream days long wraps where MPEG-TS wraps.

Big PES packets are cut into 184-byte payloads with numpy (one reshape, the
4-byte headers built as arrays), never with a Python loop per TS packet.
"""

from __future__ import annotations

import msgspec
import numpy as np

TS_SIZE = 188
TS_PAYLOAD = 184
TS_WRAP = 1 << 33
PID_PAT = 0x0000
PID_PMT = 0x1000
PID_VIDEO = 0x100
PID_AUDIO = 0x101
STREAM_TYPE_H264 = 0x1B
STREAM_TYPE_AAC_ADTS = 0x0F
SID_VIDEO = 0xE0
SID_AUDIO = 0xC0
_PCR_LEAD_MS = 100
"""PCR runs 100 ms behind the DTS of the PES that carries it, so a decoder's
clock never reaches a frame's decode time before the frame has arrived."""
_NUMPY_FROM = 6
"""Full packets in one PES from which numpy beats a bytes.join of slices
(its array set-up costs about as much as six slices)."""
_HEAD_ROWS = 1024
"""Rows of a PID's header table at first (a 180 KB PES); it grows for bigger ones."""


class TsState(msgspec.Struct, forbid_unknown_fields=True):
    """What the packetiser remembers between packets: plain data (serialisable)."""

    version: int = 1
    cc: dict[int, int] = {}
    """Next continuity counter per PID (0..15); a PID not in it starts at 0."""


def _crc32_table() -> list[int]:
    table = []
    for i in range(256):
        c = i << 24
        for _ in range(8):
            c = ((c << 1) ^ 0x04C11DB7) if c & 0x80000000 else c << 1
        table.append(c & 0xFFFFFFFF)
    return table


_CRC_TABLE = _crc32_table()


def crc32_mpeg(data: bytes) -> int:
    """CRC-32/MPEG-2 of a PSI section (sections of a few dozen bytes, built once
    per segment, never per frame)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ _CRC_TABLE[(crc >> 24) ^ byte]
    return crc


def _section(table_id: int, table_id_ext: int, body: bytes) -> bytes:
    length = 5 + len(body) + 4  # the rest of the header, the body, the CRC
    head = bytes((table_id, 0xB0 | (length >> 8), length & 0xFF, table_id_ext >> 8, table_id_ext & 0xFF, 0xC1, 0, 0))
    section = head + body
    return section + crc32_mpeg(section).to_bytes(4, "big")


def pat_section() -> bytes:
    """PAT: program 1 on PID 0x1000 (with its CRC)."""
    return _section(0x00, 1, bytes((0, 1, 0xE0 | (PID_PMT >> 8), PID_PMT & 0xFF)))


def pmt_section(video: bool, audio: bool) -> bytes:
    """PMT of program 1 (with its CRC)."""
    if not (video or audio):
        raise ValueError("a program needs a video or an audio stream, got neither")
    pcr_pid = PID_VIDEO if video else PID_AUDIO
    body = bytearray((0xE0 | (pcr_pid >> 8), pcr_pid & 0xFF, 0xF0, 0))
    for present, kind, pid in ((video, STREAM_TYPE_H264, PID_VIDEO), (audio, STREAM_TYPE_AAC_ADTS, PID_AUDIO)):
        if present:
            body += bytes((kind, 0xE0 | (pid >> 8), pid & 0xFF, 0xF0, 0))
    return _section(0x02, 1, bytes(body))


def _pts_field(prefix: int, ticks: int) -> bytes:
    return bytes(
        (
            (prefix << 4) | ((ticks >> 29) & 0x0E) | 1,
            (ticks >> 22) & 0xFF,
            ((ticks >> 14) & 0xFE) | 1,
            (ticks >> 7) & 0xFF,
            ((ticks << 1) & 0xFE) | 1,
        )
    )


def pes_header(stream_id: int, pts: int, dts: int, payload_len: int) -> bytes:
    """PES header with PTS (and DTS when it differs); 90 kHz ticks, already wrapped."""
    if pts == dts:
        fields = _pts_field(0x2, pts)
        flags = 0x80
    else:
        fields = _pts_field(0x3, pts) + _pts_field(0x1, dts)
        flags = 0xC0
    length = 3 + len(fields) + payload_len
    if length > 0xFFFF or stream_id == SID_VIDEO:
        length = 0  # unbounded: allowed for video in TS (2.4.3.7), FFmpeg does the same
    return bytes((0, 0, 1, stream_id, length >> 8, length & 0xFF, 0x80, flags, len(fields))) + fields


def _pcr_field(pcr_base: int) -> bytes:
    return bytes(
        (
            (pcr_base >> 25) & 0xFF,
            (pcr_base >> 17) & 0xFF,
            (pcr_base >> 9) & 0xFF,
            (pcr_base >> 1) & 0xFF,
            ((pcr_base & 1) << 7) | 0x7E,
            0,
        )
    )


def ticks(ms: int) -> int:
    """Milliseconds to 90 kHz ticks on the 33-bit MPEG-TS clock."""
    return (ms * 90) % TS_WRAP


def pcr_for(dts_ms: int) -> int:
    """PCR base for a PES whose DTS is `dts_ms`: a little behind it, never below 0."""
    return ticks(max(dts_ms - _PCR_LEAD_MS, 0))


class Packetiser:
    """Turns PSI sections and PES packets into TS packets, advancing each PID's
    continuity counter. `state` is its only memory: a new Packetiser given the
    same state (or its builtins converted back) continues where this one stopped.
    """

    def __init__(self, state: TsState | None = None) -> None:
        self.state = state if state is not None else TsState()
        self._heads: dict[int, list[bytes]] = {}
        self._head_tables: dict[int, np.ndarray] = {}

    def _take_cc(self, pid: int, count: int) -> int:
        cc = self.state.cc
        first = cc.get(pid, 0)
        cc[pid] = (first + count) & 0x0F
        return first

    def _continuation_heads(self, pid: int) -> list[bytes]:
        heads = self._heads.get(pid)
        if heads is None:
            hi, lo = pid >> 8, pid & 0xFF
            heads = self._heads[pid] = [bytes((0x47, hi, lo, 0x10 | c)) for c in range(16)]
        return heads

    def psi(self, pid: int, section: bytes) -> bytes:
        """One TS packet holding a whole PSI section (PAT and PMT fit in one)."""
        if len(section) > TS_PAYLOAD - 1:
            raise ValueError(f"PSI section of {len(section)} bytes does not fit in one TS packet")
        cc = self._take_cc(pid, 1)
        head = bytes((0x47, 0x40 | (pid >> 8), pid & 0xFF, 0x10 | cc, 0))
        return head + section + b"\xff" * (TS_PAYLOAD - 1 - len(section))

    def pes(
        self,
        pid: int,
        stream_id: int,
        pts: int,
        dts: int,
        payload: bytes,
        *,
        pcr: int | None = None,
        random_access: bool = False,
    ) -> bytes:
        """TS packets of one PES. `pts`, `dts`, `pcr` are 90 kHz ticks < 2**33."""
        return b"".join(self.pes_parts(pid, stream_id, pts, dts, [payload], pcr=pcr, random_access=random_access))

    def pes_parts(
        self,
        pid: int,
        stream_id: int,
        pts: int,
        dts: int,
        payload: list[bytes | memoryview],
        *,
        pcr: int | None = None,
        random_access: bool = False,
    ) -> list[bytes | memoryview]:
        """Like `pes`, from the payload in pieces and as pieces (each a run of
        whole TS packets) for a buffered file to take without another join."""
        size = 0
        for piece in payload:
            size += len(piece)
        data = b"".join([pes_header(stream_id, pts, dts, size), *payload])
        total = len(data)
        af_body = b""
        if pcr is not None or random_access:
            flags = (0x40 if random_access else 0) | (0x10 if pcr is not None else 0)
            af_body = bytes((flags,)) + (_pcr_field(pcr) if pcr is not None else b"")
        first_room = TS_PAYLOAD - (1 + len(af_body) if af_body else 0)
        if total <= first_room:
            return [self._packet(pid, True, self._take_cc(pid, 1), af_body, data)]
        full, tail = divmod(total - first_room, TS_PAYLOAD)
        cc = self._take_cc(pid, 1 + full + (1 if tail else 0))
        parts: list[bytes | memoryview] = [self._packet(pid, True, cc, af_body, data[:first_room])]
        if full >= _NUMPY_FROM:
            parts.append(self._full_packets(pid, (cc + 1) & 0x0F, data, first_room, full))
        elif full:
            heads = self._continuation_heads(pid)
            view = memoryview(data)
            parts.extend(
                heads[(cc + 1 + i) & 0x0F] + view[first_room + i * TS_PAYLOAD : first_room + (i + 1) * TS_PAYLOAD]
                for i in range(full)
            )
        if tail:
            parts.append(self._packet(pid, False, (cc + 1 + full) & 0x0F, b"", data[total - tail :]))
        return parts

    def _full_packets(self, pid: int, first_cc: int, data: bytes, start: int, count: int) -> memoryview:
        out = np.empty((count, TS_SIZE), dtype=np.uint8)
        table = self._head_rows(pid, first_cc + count)
        out[:, :4] = table[first_cc : first_cc + count]
        out[:, 4:] = np.frombuffer(data, dtype=np.uint8, count=count * TS_PAYLOAD, offset=start).reshape(
            count, TS_PAYLOAD
        )
        return memoryview(out).cast("B")  # the array's own buffer: no copy to bytes

    def _head_rows(self, pid: int, rows: int) -> np.ndarray:
        """4-byte continuation headers of `pid`, row i with counter i mod 16:
        one slice of it heads a whole PES (measured: a third of the numpy cost
        of building the columns per PES)."""
        table = self._head_tables.get(pid)
        if table is None or len(table) < rows:
            size = max(_HEAD_ROWS, 1 << (rows - 1).bit_length())
            cc = np.arange(size, dtype=np.uint32) & 0x0F
            table = np.empty((size, 4), dtype=np.uint8)
            table[:, 0] = 0x47
            table[:, 1] = pid >> 8
            table[:, 2] = pid & 0xFF
            table[:, 3] = 0x10 | cc
            self._head_tables[pid] = table
        return table

    @staticmethod
    def _packet(pid: int, start: bool, cc: int, af_body: bytes, payload: bytes) -> bytes:
        """One packet; its adaptation field carries `af_body` and the stuffing
        that fills the packet when the payload is short (2.4.3.5)."""
        room = TS_PAYLOAD - len(payload)
        hi = (0x40 if start else 0) | (pid >> 8)
        if room == 0 and not af_body:
            return bytes((0x47, hi, pid & 0xFF, 0x10 | cc)) + payload
        if room == 1 and not af_body:
            af = b"\x00"  # adaptation_field_length 0: the length byte is the stuffing
        else:
            body = af_body or b"\x00"
            stuffing = room - 1 - len(body)
            if stuffing < 0:
                raise ValueError(
                    f"{len(payload)} payload bytes and a {len(body)}-byte adaptation field overflow a TS packet"
                )
            af = bytes((room - 1,)) + body + b"\xff" * stuffing
        return bytes((0x47, hi, pid & 0xFF, 0x30 | cc)) + af + payload
