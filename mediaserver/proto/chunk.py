"""The RTMP chunk stream: splitting messages into chunks and joining them back.

The reader never mutates a chunk stream's state until a whole chunk (header,
extended timestamp and payload) is in the buffer, so input split anywhere
gives the same messages. Set Chunk Size and Abort take effect inside the
reader, between two chunks, as the spec requires.

Memory follows what the peer sent, never what it announced: a message buffer
grows chunk by chunk (a header may claim 16 MiB and send 10 bytes), the chunk
streams of one connection are capped, and the bytes held in unfinished
messages are capped. After a ProtocolError the reader is failed: the bytes it
had committed are consumed and every later feed raises the same error.
"""

from __future__ import annotations

import msgspec

from .errors import ProtocolError

MASK32 = 0xFFFFFFFF
EXTENDED = 0xFFFFFF
MAX_CHUNK_SIZE = 16 * 1024 * 1024
SET_CHUNK_SIZE, ABORT = 1, 2
_HEADER_SIZES = (11, 7, 3, 0)
MAX_CHUNK_STREAMS = 32
"""Chunk streams one connection may open; encoders use fewer than ten."""
MAX_EMPTY_MESSAGES = 64
"""Zero-length messages carry nothing; a connection sending more of them than
messages with content, beyond this many, is hostile (each costs a parse step
for one input byte)."""


class RawMessage(msgspec.Struct, gc=False):
    csid: int
    type_id: int
    stream_id: int
    timestamp: int
    payload: memoryview


class _InStream:
    __slots__ = ("timestamp", "field", "length", "type_id", "stream_id", "extended", "message")

    def __init__(self) -> None:
        self.timestamp = 0
        self.field = 0
        """The last header's timestamp field (absolute for type 0, else a delta)."""
        self.length = 0
        self.type_id = 0
        self.stream_id = 0
        self.extended = False
        self.message: bytearray | None = None
        """The unfinished message, grown by each chunk that arrives."""


def check_chunk_size(value: int) -> int:
    if not 1 <= value <= MAX_CHUNK_SIZE:
        raise ProtocolError(f"chunk size {value} out of range 1..{MAX_CHUNK_SIZE}")
    return value


class ChunkReader:
    def __init__(self, max_message_size: int) -> None:
        self.chunk_size = 128
        self.max_message_size = max_message_size
        """The longest message accepted; the caller may change it between feeds."""
        self.streams: dict[int, _InStream] = {}
        self.held = 0
        """Bytes held in unfinished messages (what the peer sent of them)."""
        self.empty_messages = 0
        self.failed: ProtocolError | None = None
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes held: an unfinished chunk plus the parts of unfinished messages."""
        return len(self._buf) + self.held

    @property
    def max_held(self) -> int:
        """Cap on `held`: one message at the limit plus as much interleaved."""
        return 2 * self.max_message_size

    def feed(self, data: bytes | memoryview) -> list[RawMessage]:
        if self.failed is not None:
            raise ProtocolError(f"chunk stream already failed: {self.failed}")
        try:
            return self._feed(data)
        except ProtocolError as exc:
            self.failed = exc
            raise

    def _feed(self, data: bytes | memoryview) -> list[RawMessage]:
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
                    remaining = length - len(st.message)  # type: ignore[union-attr, arg-type]
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
                    if len(streams) >= MAX_CHUNK_STREAMS:
                        raise ProtocolError(
                            f"chunk stream {csid} would be number {len(streams) + 1} on this "
                            f"connection (limit {MAX_CHUNK_STREAMS})"
                        )
                    st = streams[csid] = _InStream()
                if not continuing:
                    if st.message is not None:
                        # A new header on a stream mid-message drops the unfinished one.
                        self.held -= len(st.message)
                        st.message = None
                    if fmt == 0:
                        st.timestamp = field
                    else:
                        st.timestamp = (st.timestamp + field) & MASK32
                    if fmt < 3 or extended:
                        st.field = field
                    if fmt < 3:
                        st.extended = extended
                    st.length, st.type_id, st.stream_id = length, type_id, stream_id
                    if length == 0:
                        pos = hpos
                        self.empty_messages += 1
                        if self.empty_messages > MAX_EMPTY_MESSAGES:
                            raise ProtocolError(
                                f"more than {MAX_EMPTY_MESSAGES} zero-length messages on this connection"
                            )
                        continue
                    if size == length:
                        # A message in one chunk: no buffer to grow.
                        pos = hpos + size
                        message = bytearray(view[hpos:pos])
                        self._complete(message, csid, type_id, stream_id, st.timestamp, out)
                        continue
                    st.message = bytearray()
                message = st.message
                assert message is not None
                message += view[hpos : hpos + size]
                pos = hpos + size
                if len(message) == length:
                    st.message = None
                    self.held -= length - size
                    self._complete(message, csid, type_id, stream_id, st.timestamp, out)
                else:
                    self.held += size
                    if self.held > self.max_held:
                        raise ProtocolError(
                            f"{self.held} bytes held in unfinished messages exceed the "
                            f"limit of {self.max_held}"
                        )
        finally:
            view.release()
            if pos:
                # Committed chunks are consumed even when a later one fails.
                del buf[:pos]
        return out

    def _complete(
        self, message: bytearray, csid: int, type_id: int, stream_id: int, timestamp: int,
        out: list[RawMessage],
    ) -> None:
        if self.empty_messages:
            # Each message with content earns back one empty one: a client that
            # sends an empty message now and then (SRS ignores them too) lasts for
            # days, and empty ones never outnumber the others by more than the cap.
            self.empty_messages -= 1
        payload = memoryview(message)
        if type_id == SET_CHUNK_SIZE and stream_id == 0 and len(message) >= 4:
            self.chunk_size = check_chunk_size(int.from_bytes(message[:4], "big") & 0x7FFFFFFF)
        elif type_id == ABORT and len(message) >= 4:
            aborted = self.streams.get(int.from_bytes(message[:4], "big"))
            if aborted is not None and aborted.message is not None:
                self.held -= len(aborted.message)
                aborted.message = None
        out.append(RawMessage(csid, type_id, stream_id, timestamp, payload))


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
