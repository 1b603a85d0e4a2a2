"""The RTMP chunk stream: splitting messages into chunks and joining them back.

The reader never mutates a chunk stream's state until a whole chunk (header,
extended timestamp and payload) is in the buffer, so input split anywhere
gives the same messages. Set Chunk Size and Abort take effect inside the
reader, between two chunks, as the spec requires.
"""

from __future__ import annotations

import msgspec

from .errors import ProtocolError

MASK32 = 0xFFFFFFFF
EXTENDED = 0xFFFFFF
MAX_CHUNK_SIZE = 16 * 1024 * 1024
SET_CHUNK_SIZE, ABORT = 1, 2
_HEADER_SIZES = (11, 7, 3, 0)


class RawMessage(msgspec.Struct, gc=False):
    csid: int
    type_id: int
    stream_id: int
    timestamp: int
    payload: memoryview


class _InStream:
    __slots__ = ("timestamp", "field", "length", "type_id", "stream_id", "extended", "message", "filled")

    def __init__(self) -> None:
        self.timestamp = 0
        self.field = 0
        """The last header's timestamp field (absolute for type 0, else a delta)."""
        self.length = 0
        self.type_id = 0
        self.stream_id = 0
        self.extended = False
        self.message: bytearray | None = None
        self.filled = 0


def check_chunk_size(value: int) -> int:
    if not 1 <= value <= MAX_CHUNK_SIZE:
        raise ProtocolError(f"chunk size {value} out of range 1..{MAX_CHUNK_SIZE}")
    return value


class ChunkReader:
    def __init__(self, max_message_size: int) -> None:
        self.chunk_size = 128
        self.max_message_size = max_message_size
        self.streams: dict[int, _InStream] = {}
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes held: an unfinished chunk plus the parts of unfinished messages."""
        partial = sum(st.filled for st in self.streams.values() if st.message is not None)
        return len(self._buf) + partial

    def feed(self, data: bytes | memoryview) -> list[RawMessage]:
        buf = self._buf
        buf += data
        out: list[RawMessage] = []
        n = len(buf)
        pos = 0
        streams = self.streams
        view = memoryview(buf)
        try:
            while pos < n:
                b0 = buf[pos]
                fmt = b0 >> 6
                csid = b0 & 0x3F
                hpos = pos + 1
                if csid == 0:
                    if hpos + 1 > n:
                        break
                    csid = 64 + buf[hpos]
                    hpos += 1
                elif csid == 1:
                    if hpos + 2 > n:
                        break
                    csid = 64 + buf[hpos] + (buf[hpos + 1] << 8)
                    hpos += 2
                hsize = _HEADER_SIZES[fmt]
                if hpos + hsize > n:
                    break
                st = streams.get(csid)
                if st is None and fmt != 0:
                    raise ProtocolError(f"chunk type {fmt} on unknown chunk stream {csid}")
                if fmt == 0:
                    field = int.from_bytes(buf[hpos : hpos + 3], "big")
                    length = int.from_bytes(buf[hpos + 3 : hpos + 6], "big")
                    type_id = buf[hpos + 6]
                    stream_id = int.from_bytes(buf[hpos + 7 : hpos + 11], "little")
                elif fmt == 1:
                    field = int.from_bytes(buf[hpos : hpos + 3], "big")
                    length = int.from_bytes(buf[hpos + 3 : hpos + 6], "big")
                    type_id = buf[hpos + 6]
                    stream_id = st.stream_id  # type: ignore[union-attr]
                elif fmt == 2:
                    field = int.from_bytes(buf[hpos : hpos + 3], "big")
                    length, type_id, stream_id = st.length, st.type_id, st.stream_id  # type: ignore[union-attr]
                else:
                    field = st.field  # type: ignore[union-attr]
                    length, type_id, stream_id = st.length, st.type_id, st.stream_id  # type: ignore[union-attr]
                hpos += hsize
                continuing = fmt == 3 and st.message is not None  # type: ignore[union-attr]
                if fmt < 3:
                    extended = field == EXTENDED
                else:
                    extended = st.extended  # type: ignore[union-attr]
                if extended:
                    if hpos + 4 > n:
                        break
                    ext_value = int.from_bytes(buf[hpos : hpos + 4], "big")
                    if continuing and ext_value != st.field:  # type: ignore[union-attr]
                        # Some encoders omit the extended timestamp on continuation chunks.
                        pass
                    else:
                        field = ext_value
                        hpos += 4
                if continuing:
                    remaining = length - st.filled  # type: ignore[union-attr]
                else:
                    if length > self.max_message_size:
                        raise ProtocolError(
                            f"message length {length} on chunk stream {csid} exceeds the "
                            f"limit of {self.max_message_size} bytes"
                        )
                    remaining = length
                size = remaining if remaining < self.chunk_size else self.chunk_size
                if hpos + size > n:
                    break
                # The whole chunk is here: commit.
                if st is None:
                    st = streams[csid] = _InStream()
                if not continuing:
                    if fmt == 0:
                        st.timestamp = field
                    else:
                        st.timestamp = (st.timestamp + field) & MASK32
                    if fmt < 3 or extended:
                        st.field = field
                    if fmt < 3:
                        st.extended = extended
                    st.length, st.type_id, st.stream_id = length, type_id, stream_id
                    st.message = bytearray(length)
                    st.filled = 0
                message = st.message
                assert message is not None
                message[st.filled : st.filled + size] = view[hpos : hpos + size]
                st.filled += size
                pos = hpos + size
                if st.filled == length:
                    st.message = None
                    payload = memoryview(message)
                    if type_id == SET_CHUNK_SIZE and stream_id == 0 and length >= 4:
                        self.chunk_size = check_chunk_size(int.from_bytes(message[:4], "big") & 0x7FFFFFFF)
                    elif type_id == ABORT and length >= 4:
                        aborted = streams.get(int.from_bytes(message[:4], "big"))
                        if aborted is not None:
                            aborted.message = None
                    out.append(RawMessage(csid, type_id, stream_id, st.timestamp, payload))
        finally:
            view.release()
        if pos:
            del buf[:pos]
        return out


class ChunkWriter:
    """Splits messages into chunks, compressing headers the way real clients do."""

    def __init__(self, chunk_size: int = 128, compress: bool = False) -> None:
        self.chunk_size = chunk_size
        self.compress = compress
        self._last: dict[int, tuple[int, int, int, int, int]] = {}
        """csid -> (timestamp, field, length, type_id, stream_id) of its last message."""
        self.out = bytearray()

    @staticmethod
    def _basic(fmt: int, csid: int) -> bytes:
        if csid < 64:
            return bytes(((fmt << 6) | csid,))
        if csid < 320:
            return bytes((fmt << 6, csid - 64))
        return bytes(((fmt << 6) | 1, (csid - 64) & 0xFF, (csid - 64) >> 8))

    def write(self, csid: int, type_id: int, stream_id: int, timestamp: int, payload: bytes) -> None:
        timestamp &= MASK32
        length = len(payload)
        last = self._last.get(csid)
        fmt = 0
        field = timestamp
        if self.compress and last is not None and last[4] == stream_id:
            delta = (timestamp - last[0]) & MASK32
            if delta < 0x80000000:
                field = delta
                if last[2] == length and last[3] == type_id:
                    fmt = 3 if last[1] == delta else 2
                else:
                    fmt = 1
        wire_field = EXTENDED if field >= EXTENDED else field
        header = bytearray(self._basic(fmt, csid))
        if fmt == 0:
            header += wire_field.to_bytes(3, "big") + length.to_bytes(3, "big")
            header.append(type_id)
            header += stream_id.to_bytes(4, "little")
        elif fmt == 1:
            header += wire_field.to_bytes(3, "big") + length.to_bytes(3, "big")
            header.append(type_id)
        elif fmt == 2:
            header += wire_field.to_bytes(3, "big")
        ext = field.to_bytes(4, "big") if field >= EXTENDED else b""
        header += ext
        self._last[csid] = (timestamp, field, length, type_id, stream_id)
        out = self.out
        out += header
        view = memoryview(payload)
        step = self.chunk_size
        out += view[:step]
        continuation = self._basic(3, csid) + ext
        for start in range(step, length, step):
            out += continuation
            out += view[start : start + step]

    def take(self) -> bytes:
        data = bytes(self.out)
        self.out.clear()
        return data
