"""MPEG-TS checks written straight from ISO/IEC 13818-1, independent of the packetiser.

A reader for tests: every packet 188 bytes with sync 0x47, adaptation fields
decoded, continuity counters followed per PID, PSI sections with their CRC
checked (zlib-free bitwise CRC-32/MPEG-2, a different code path from the
server's table-driven one).
"""

from __future__ import annotations

from dataclasses import dataclass, field


def crc32_mpeg_bitwise(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) & 0xFFFFFFFF if crc & 0x80000000 else (crc << 1) & 0xFFFFFFFF
    return crc


@dataclass
class TsPacket:
    offset: int
    pid: int
    pusi: bool
    cc: int
    has_payload: bool
    af_length: int | None
    """adaptation_field_length, None when there is no adaptation field."""
    random_access: bool
    pcr: int | None
    """PCR base (90 kHz)."""
    payload: bytes


def parse_packets(data: bytes) -> list[TsPacket]:
    assert len(data) % 188 == 0, f"{len(data)} bytes is not a whole number of 188-byte packets"
    out = []
    for off in range(0, len(data), 188):
        p = data[off : off + 188]
        assert p[0] == 0x47, f"sync byte {p[0]:#x} at offset {off}"
        pid = ((p[1] & 0x1F) << 8) | p[2]
        afc = (p[3] >> 4) & 3
        assert afc != 0, f"reserved adaptation_field_control 0 at offset {off}"
        pos = 4
        af_length = None
        rai = False
        pcr = None
        if afc & 2:
            af_length = p[4]
            limit = 183 if afc == 3 else 184
            assert af_length <= limit, f"adaptation field of {af_length} bytes at offset {off} (max {limit})"
            if af_length:
                flags = p[5]
                rai = bool(flags & 0x40)
                if flags & 0x10:
                    b = p[6:12]
                    pcr = (b[0] << 25) | (b[1] << 17) | (b[2] << 9) | (b[3] << 1) | (b[4] >> 7)
                    ext = ((b[4] & 1) << 8) | b[5]
                    assert ext == 0 and (b[4] & 0x7E) == 0x7E, f"PCR reserved bits/extension at offset {off}"
                    stuffing = p[12 : 5 + af_length]
                else:
                    stuffing = p[6 : 5 + af_length]
                assert set(stuffing) <= {0xFF}, f"stuffing bytes not 0xFF at offset {off}"
            pos = 5 + af_length
        payload = p[pos:] if afc & 1 else b""
        if afc & 1:
            assert payload, f"payload flagged but empty at offset {off}"
        out.append(TsPacket(off, pid, bool(p[1] & 0x40), p[3] & 0x0F, bool(afc & 1), af_length, rai, pcr, payload))
    return out


@dataclass
class Psi:
    table_id: int
    body: bytes
    """Between the 8-byte long header and the CRC."""


def parse_psi(packet: TsPacket) -> Psi:
    assert packet.pusi, f"PSI packet at offset {packet.offset} without payload_unit_start"
    pointer = packet.payload[0]
    sec = packet.payload[1 + pointer :]
    table_id = sec[0]
    length = ((sec[1] & 0x0F) << 8) | sec[2]
    section = sec[: 3 + length]
    assert len(section) == 3 + length, "PSI section cut"
    crc = int.from_bytes(section[-4:], "big")
    assert crc == crc32_mpeg_bitwise(section[:-4]), f"bad CRC {crc:#010x} in table {table_id:#x}"
    return Psi(table_id, section[8:-4])


def pmt_streams(psi: Psi) -> tuple[int, dict[int, int]]:
    """(PCR PID, {elementary PID: stream_type}) of a PMT."""
    assert psi.table_id == 2
    body = psi.body
    pcr_pid = ((body[0] & 0x1F) << 8) | body[1]
    info = ((body[2] & 0x0F) << 8) | body[3]
    pos = 4 + info
    streams = {}
    while pos < len(body):
        kind = body[pos]
        pid = ((body[pos + 1] & 0x1F) << 8) | body[pos + 2]
        es_len = ((body[pos + 3] & 0x0F) << 8) | body[pos + 4]
        streams[pid] = kind
        pos += 5 + es_len
    return pcr_pid, streams


def pat_programs(psi: Psi) -> dict[int, int]:
    assert psi.table_id == 0
    body = psi.body
    return {
        int.from_bytes(body[i : i + 2], "big"): ((body[i + 2] & 0x1F) << 8) | body[i + 3]
        for i in range(0, len(body), 4)
    }


def _ts(b: bytes) -> int:
    return ((b[0] >> 1) & 7) << 30 | b[1] << 22 | (b[2] >> 1) << 15 | b[3] << 7 | b[4] >> 1


@dataclass
class Pes:
    pid: int
    stream_id: int
    pts: int | None
    dts: int | None
    declared_length: int
    data: bytes
    first: TsPacket
    packets: list[TsPacket] = field(default_factory=list)


def parse_pes(packets: list[TsPacket], pids: set[int]) -> list[Pes]:
    """The PES packets of `pids`, reassembled from their TS payloads."""
    open_: dict[int, Pes] = {}
    done: list[Pes] = []
    for p in packets:
        if p.pid not in pids or not p.has_payload:
            continue
        if p.pusi:
            if p.pid in open_:
                done.append(open_.pop(p.pid))
            pl = p.payload
            assert pl[:3] == b"\x00\x00\x01", f"no PES start code at offset {p.offset}"
            flags = pl[7]
            hlen = pl[8]
            pts = _ts(pl[9:14]) if flags & 0x80 else None
            dts = _ts(pl[14:19]) if flags & 0x40 else pts
            pes = Pes(p.pid, pl[3], pts, dts, int.from_bytes(pl[4:6], "big"), pl[9 + hlen :], p, [p])
            open_[p.pid] = pes
        else:
            assert p.pid in open_, f"PES continuation without a start at offset {p.offset}"
            open_[p.pid].data += p.payload
            open_[p.pid].packets.append(p)
    done.extend(open_.values())
    for pes in done:
        if pes.declared_length:
            assert pes.declared_length == 3 + pes.first.payload[8] + len(pes.data), (
                f"PES length {pes.declared_length} != {3 + pes.first.payload[8] + len(pes.data)} on PID {pes.pid:#x}"
            )
    return sorted(done, key=lambda x: x.first.offset)


def cc_breaks(segments: list[bytes], reset_before: set[int] = frozenset()) -> list[str]:
    """Every continuity counter break across `segments` in order, as text.

    A counter may start anywhere in segment i when i is in `reset_before`
    (the segment carries EXT-X-DISCONTINUITY)."""
    last: dict[int, int] = {}
    breaks = []
    for i, data in enumerate(segments):
        if i in reset_before:
            last = {}
        for p in parse_packets(data):
            if not p.has_payload:
                continue  # the counter does not advance without payload (2.4.3.3)
            prev = last.get(p.pid)
            if prev is not None and p.cc != (prev + 1) & 0x0F:
                breaks.append(f"segment {i} offset {p.offset} PID {p.pid:#x}: cc {p.cc} after {prev}")
            last[p.pid] = p.cc
    return breaks
