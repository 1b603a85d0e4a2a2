"""RTMP input whose cost does not follow what the peer sent is refused (issue 11).

Each case is one of the inputs found by attacking the public RTMP port: the
server core gets bytes only, and what it holds is measured with tracemalloc,
not taken from the reader's own counters alone.
"""

from __future__ import annotations

import time
import tracemalloc

import pytest

from mediaserver.proto import amf0, h264, rtmp
from mediaserver.proto.chunk import MAX_CHUNK_STREAMS, MAX_EMPTY_MESSAGES, ChunkReader, ChunkWriter
from mediaserver.proto.errors import ProtocolError

from test_proto_rtmp import connected_server, pump, raw_chunk


def handshaken_server(max_message_size: int = 8 * 1024 * 1024) -> rtmp.ServerConnection:
    client = rtmp.ClientConnection()
    server = rtmp.ServerConnection(max_message_size=max_message_size)
    pump(client, server)
    return server


def type0(length: int, type_id: int = 9, stream_id: int = 1, timestamp: int = 0) -> bytes:
    return timestamp.to_bytes(3, "big") + length.to_bytes(3, "big") + bytes([type_id]) + stream_id.to_bytes(4, "little")


def traced(feed) -> int:
    """Bytes newly allocated and still held after `feed()`."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        feed()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_before_connect_only_small_messages_are_accepted():
    server = handshaken_server()
    # 133 bytes that used to hold 8 MiB: a header announcing the configured maximum.
    with pytest.raises(ProtocolError, match="exceeds the limit of 8192 bytes"):
        server.feed(raw_chunk(0, 4, type0(8 * 1024 * 1024 - 1), b"x" * 100))


def test_a_connect_command_raises_the_limit_to_max_message_size():
    server = connected_server()  # max_message_size 1 MiB
    assert server._reader.max_message_size == 1 << 20  # noqa: SLF001


def test_memory_follows_received_bytes_not_announced_lengths():
    server = connected_server()
    # Many chunk streams, each announcing 1 MiB and sending one 4096-byte chunk of it.
    size = server._reader.chunk_size  # noqa: SLF001 - the client announced 4096
    data = b"".join(raw_chunk(0, csid, type0((1 << 20) - 1), b"x" * size) for csid in range(4, 4 + 20))
    held = traced(lambda: server.feed(data))
    assert server._reader.buffered == 20 * size  # noqa: SLF001
    assert held < 20 * size + 64 * 1024, held  # was 20 MiB


def test_chunk_streams_per_connection_are_capped():
    server = connected_server()
    chunks = []
    for csid in range(64, 64 + MAX_CHUNK_STREAMS + 1):
        chunks.append(bytes([0, csid - 64]) + type0(10, type_id=8) + b"x" * 10)
    with pytest.raises(ProtocolError, match=f"limit {MAX_CHUNK_STREAMS}"):
        server.feed(b"".join(chunks))


def test_bytes_held_in_unfinished_messages_are_capped():
    reader = ChunkReader(max_message_size=1000)
    reader.chunk_size = 500
    # Interleave unfinished messages on several streams: each alone is allowed.
    data = b"".join(raw_chunk(0, csid, type0(1000), b"x" * 500) for csid in range(3, 3 + 5))
    with pytest.raises(ProtocolError, match="held in unfinished messages exceed the limit of 2000"):
        reader.feed(data)


def test_zero_length_messages_are_dropped_and_bounded():
    server = connected_server()
    first = raw_chunk(0, 4, type0(0, type_id=8))
    # After one type-0 header, every single byte 0xC4 is a new zero-length message.
    events = server.feed(first + b"\xc4" * (MAX_EMPTY_MESSAGES - 1))
    assert events == []
    started = time.process_time()
    with pytest.raises(ProtocolError, match="zero-length messages"):
        server.feed(b"\xc4" * 262_144)
    assert time.process_time() - started < 0.05


def test_an_occasional_zero_length_message_is_tolerated_for_ever():
    """One empty audio message beside each real one, far past the cap: no error."""
    server = connected_server()
    writer = ChunkWriter(4096)
    for ts in range(10 * MAX_EMPTY_MESSAGES):
        writer.write(4, 8, 1, ts, b"")
        writer.write(6, 8, 1, ts, b"\xaf\x01" + b"a" * 20)
    events = server.feed(writer.take())
    assert len(events) == 10 * MAX_EMPTY_MESSAGES
    assert all(isinstance(e, rtmp.AudioMessage) and len(e.payload) == 22 for e in events)


def test_an_amf0_message_of_millions_of_values_is_refused_quickly():
    server = connected_server()
    writer = ChunkWriter(4096)
    body = amf0.encode("@setDataFrame", "onMetaData") + b"\x05" * 1_000_000  # a million NULLs
    writer.write(4, 18, 1, 0, body)
    data = writer.take()
    started = time.process_time()
    with pytest.raises(ProtocolError, match="more than 10000 values"):
        server.feed(data)
    assert time.process_time() - started < 0.2


def test_amf0_budget_counts_nested_values():
    nested = {f"k{i}": [1.0, 2.0, 3.0] for i in range(3000)}
    with pytest.raises(ProtocolError, match="more than 10000 values"):
        amf0.decode(amf0.encode(nested))
    assert amf0.decode(amf0.encode({"width": 1280.0, "height": 720.0})) == [{"width": 1280.0, "height": 720.0}]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0, 1.5, 2.0**40])
def test_delete_stream_with_a_stream_id_that_is_not_one(value):
    server = connected_server()
    writer = ChunkWriter(4096)
    writer.write(3, 20, 0, 0, amf0.encode("deleteStream", 0.0, None, value))
    with pytest.raises(ProtocolError, match="stream id .* is not a whole number"):
        server.feed(writer.take())


def test_a_failed_reader_stays_failed_and_consumed_what_it_committed():
    reader = ChunkReader(max_message_size=1 << 20)
    good = raw_chunk(0, 4, type0(3, type_id=8), b"abc")
    bad = raw_chunk(1, 9, b"\x00\x00\x00\x00\x00\x05\x14")  # type 1 on an unknown stream
    with pytest.raises(ProtocolError, match="unknown chunk stream 9"):
        reader.feed(good + bad)
    # The committed chunk is gone from the buffer: only the bad bytes remain.
    assert reader.buffered == len(bad)
    with pytest.raises(ProtocolError, match="already failed: chunk type 1 on unknown chunk stream 9"):
        reader.feed(good)


def test_an_oversized_sps_is_refused_without_breaking_the_stream():
    sps = b"\x67\x64\x00\x1f" + b"\x01" * 100
    pps = b"\x68\xee\x3c\x80"
    idr = b"\x65" + b"\x88" * 50
    start = b"\x00\x00\x00\x01"
    with pytest.raises(ProtocolError, match="does not fit a 16-bit length"):
        h264.avc_config(b"\x67\x64\x00\x1f" + b"\x00" * 70000, pps)
    units = h264.AccessUnits()
    first = units.push(start + sps + start + pps + start + idr)
    assert first is not None and first[0] is not None
    with pytest.raises(ProtocolError, match="parameter set of 70004 bytes"):
        units.push(start + b"\x67\x64\x00\x1f" + b"\x00" * 70000 + start + idr)
    # The sets in use are untouched: the next keyframe keeps the first config.
    again = units.push(start + idr)
    assert again is not None and again[0] is None and units.config == first[0]
