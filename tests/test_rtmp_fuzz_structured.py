"""Structured fuzzing of the RTMP server core past the handshake.

Mutating real captures (test_proto_fuzz.py) rarely reaches odd chunk headers;
here hypothesis builds the chunks themselves: any format, chunk stream id,
announced length, type, timestamp, and payloads shorter or longer than
announced. Whatever arrives, the core gives events or a ProtocolError, the
bytes it reports holding are the bytes it holds, and those never exceed what
was sent nor its cap. Inputs that once broke a rule are kept in
tests/data/rtmp_corpus/ and replayed on every run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mediaserver.proto import amf0, rtmp
from mediaserver.proto.errors import ProtocolError

from test_proto_rtmp import connected_server

pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")  # large reprs
CORPUS = Path(__file__).resolve().parent / "data" / "rtmp_corpus"
LIMIT = 1 << 20  # connected_server()'s max_message_size


def basic_header(fmt: int, csid: int) -> bytes:
    if csid < 64:
        return bytes([(fmt << 6) | csid])
    if csid < 320:
        return bytes([fmt << 6, csid - 64])
    return bytes([(fmt << 6) | 1, (csid - 64) & 0xFF, (csid - 64) >> 8])


@st.composite
def chunk(draw) -> bytes:
    fmt = draw(st.integers(0, 3))
    csid = draw(st.one_of(st.integers(3, 6), st.integers(3, 6), st.integers(2, 65599)))
    out = bytearray(basic_header(fmt, csid))
    timestamp = draw(st.one_of(st.integers(0, 100), st.just(0xFFFFFF)))
    length = draw(st.one_of(st.integers(0, 300), st.integers(0, 0xFFFFFF)))
    type_id = draw(st.sampled_from([1, 2, 3, 4, 5, 6, 8, 9, 15, 17, 18, 20, 0, 255]))
    if fmt <= 2:
        out += timestamp.to_bytes(3, "big")
    if fmt <= 1:
        out += length.to_bytes(3, "big") + bytes([type_id])
    if fmt == 0:
        out += draw(st.integers(0, 3)).to_bytes(4, "little")
    if timestamp == 0xFFFFFF and draw(st.booleans()):
        out += draw(st.integers(0, 0xFFFFFFFF)).to_bytes(4, "big")
    body = draw(
        st.one_of(
            st.binary(max_size=300),
            st.just(amf0.encode("deleteStream", 0.0, None, float("nan"))),
            st.just(b"\x05" * 20000),
        )
    )
    out += body
    return bytes(out)


def held_for_real(server: rtmp.ServerConnection) -> int:
    reader = server._reader  # noqa: SLF001
    return sum(len(s.message) for s in reader.streams.values() if s.message is not None)


def feed_all(parts: list[bytes]) -> None:
    server = connected_server()
    sent = 0
    for part in parts:
        sent += len(part)
        try:
            server.feed(part)
        except ProtocolError:
            # A failed core stays failed, with a ProtocolError, not another exception.
            with pytest.raises(ProtocolError):
                server.feed(b"\x00")
            return
        reader = server._reader  # noqa: SLF001
        assert reader.held == held_for_real(server)
        assert reader.held <= min(sent, reader.max_held)
        assert len(reader.streams) <= 32


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(chunk(), min_size=1, max_size=40), st.integers(1, 4096))
def test_any_chunks_give_events_or_a_protocol_error(chunks, split):
    data = b"".join(chunks)
    feed_all([data[i : i + split] for i in range(0, len(data), split)])


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*.bin")), ids=lambda p: p.stem)
def test_corpus(path):
    feed_all([path.read_bytes()])
