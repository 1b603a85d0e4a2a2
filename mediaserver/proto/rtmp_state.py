"""A `ServerConnection`'s whole memory as data, and back (hand-over to another process).

Taken between two `feed()` calls, the state holds everything the next bytes
need: the handshake bytes so far, every chunk stream's header-compression
context and unfinished message, the unfinished chunk, the negotiated sizes,
the acknowledgement counters, the streams created and published, and output
not yet sent. A core rebuilt from it answers the rest of the byte stream
exactly as the original would have.
"""

from __future__ import annotations

import msgspec

from .chunk import MAX_CHUNK_STREAMS, ChunkReader, ChunkWriter, _InStream, check_chunk_size
from .rtmp import ServerConnection

STATE_VERSION = 1


class InStreamState(msgspec.Struct, forbid_unknown_fields=True, array_like=True):
    csid: int
    timestamp: int
    field: int
    length: int
    type_id: int
    stream_id: int
    extended: bool
    message: bytes | None


class WriterLast(msgspec.Struct, forbid_unknown_fields=True, array_like=True):
    csid: int
    timestamp: int
    field: int
    length: int
    type_id: int
    stream_id: int


class ServerConnectionState(msgspec.Struct, forbid_unknown_fields=True):
    version: int
    # handshake
    hs: bytes
    hs_stage: int
    # chunk reader
    in_chunk_size: int
    reader_max_message_size: int
    in_streams: list[InStreamState]
    unfinished_chunk: bytes
    empty_messages: int
    # chunk writer
    out_chunk_size_now: int
    out_last: list[WriterLast]
    pending: bytes
    # session
    out_chunk_size: int
    max_message_size: int
    window_ack_size: int
    own_window: int
    bytes_received: int
    acked: int
    handshake_complete: bool
    connected: bool
    connect_requested: bool
    next_stream_id: int
    streams: list[int]
    publishing: list[int]
    connect_txid: float
    object_encoding: float


def export_state(core: ServerConnection) -> ServerConnectionState:
    """The state of `core` between two feeds; a failed core has none worth moving."""
    if core.failed is not None or core._reader.failed is not None:
        raise ValueError(f"the connection failed ({core.failed or core._reader.failed}): nothing to move")
    reader, writer = core._reader, core._writer
    pending = bytes(core._pending) + bytes(writer.out)
    return ServerConnectionState(
        version=STATE_VERSION,
        hs=bytes(core._hs),
        hs_stage=core._hs_stage,
        in_chunk_size=reader.chunk_size,
        reader_max_message_size=reader.max_message_size,
        in_streams=[
            InStreamState(
                csid, st.timestamp, st.field, st.length, st.type_id, st.stream_id, st.extended,
                None if st.message is None else bytes(st.message),
            )
            for csid, st in reader.streams.items()
        ],
        unfinished_chunk=bytes(reader._buf),
        empty_messages=reader.empty_messages,
        out_chunk_size_now=writer.chunk_size,
        out_last=[WriterLast(csid, *last) for csid, last in writer._last.items()],
        pending=pending,
        out_chunk_size=core._out_chunk_size,
        max_message_size=core._max_message_size,
        window_ack_size=core.window_ack_size,
        own_window=core._own_window,
        bytes_received=core.bytes_received,
        acked=core._acked,
        handshake_complete=core.handshake_complete,
        connected=core.connected,
        connect_requested=core._connect_requested,
        next_stream_id=core._next_stream_id,
        streams=sorted(core._streams),
        publishing=sorted(core._publishing),
        connect_txid=core._connect_txid,
        object_encoding=core._object_encoding,
    )


def import_state(state: ServerConnectionState) -> ServerConnection:
    """A core that goes on where the exported one stopped; ValueError for a state that cannot be right."""
    if state.version != STATE_VERSION:
        raise ValueError(f"RTMP connection state version {state.version} is not {STATE_VERSION}")
    if state.hs_stage not in (0, 1, 2):
        raise ValueError(f"handshake stage {state.hs_stage} is not 0, 1 or 2")
    if len(state.in_streams) > MAX_CHUNK_STREAMS:
        raise ValueError(f"{len(state.in_streams)} chunk streams (limit {MAX_CHUNK_STREAMS})")
    check_chunk_size(state.in_chunk_size)
    check_chunk_size(state.out_chunk_size_now)
    core = ServerConnection(
        max_message_size=state.max_message_size,
        out_chunk_size=state.out_chunk_size,
        window_ack_size=state.own_window,
    )
    core._hs = bytearray(state.hs)
    core._hs_stage = state.hs_stage
    reader = ChunkReader(state.reader_max_message_size)
    reader.chunk_size = state.in_chunk_size
    reader.empty_messages = state.empty_messages
    reader._buf = bytearray(state.unfinished_chunk)
    held = 0
    for item in state.in_streams:
        st = _InStream()
        st.timestamp, st.field, st.length = item.timestamp, item.field, item.length
        st.type_id, st.stream_id, st.extended = item.type_id, item.stream_id, item.extended
        if item.message is not None:
            if not 0 < len(item.message) < item.length:
                raise ValueError(
                    f"chunk stream {item.csid}: unfinished message of {len(item.message)} bytes "
                    f"for a length of {item.length}"
                )
            st.message = bytearray(item.message)
            held += len(item.message)
        reader.streams[item.csid] = st
    reader.held = held
    if held > reader.max_held:
        raise ValueError(f"{held} bytes in unfinished messages exceed the limit of {reader.max_held}")
    core._reader = reader
    writer = ChunkWriter(state.out_chunk_size_now, compress=False)
    writer._last = {
        w.csid: (w.timestamp, w.field, w.length, w.type_id, w.stream_id) for w in state.out_last
    }
    core._writer = writer
    core._pending = bytearray(state.pending)
    core.window_ack_size = state.window_ack_size
    core.bytes_received = state.bytes_received
    core._acked = state.acked
    core.handshake_complete = state.handshake_complete
    core.connected = state.connected
    core._connect_requested = state.connect_requested
    core._next_stream_id = state.next_stream_id
    core._streams = set(state.streams)
    core._publishing = set(state.publishing)
    core._connect_txid = state.connect_txid
    core._object_encoding = state.object_encoding
    return core
