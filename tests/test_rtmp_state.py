"""A server RTMP core exported as data between two feeds and rebuilt (mediaserver.proto.rtmp_state).

The hand-over to a new worker moves a connection at whatever point its bytes
stopped: inside the handshake, between two chunks of one message, mid chunk
header. Whatever the point, the rebuilt core must answer the rest of the byte
stream exactly as the original would have: same events, same bytes out.
"""

from __future__ import annotations

import random

import msgspec
import pytest

from mediaserver.proto import rtmp
from mediaserver.proto.rtmp_state import ServerConnectionState, export_state, import_state
from test_proto_rtmp import publish_session, summary


def _stream() -> bytes:
    """A publish with a chunk size change, extended timestamps and messages split over many chunks."""
    data, _, _, _ = publish_session(
        out_chunk_size=1000, timestamps=(0, 40, 0xFFFFF0, 0x1000010, 0x1000050), payload_size=5000
    )
    return data


def _run(data: bytes, cuts: list[int], handovers: set[int], via: str = "msgpack"):
    """Feed `data` cut at `cuts`; at each cut in `handovers`, move the core through its state."""
    core = rtmp.ServerConnection(max_message_size=1 << 20)
    core.window_ack_size = 5000  # as if the peer asked: acknowledgements go out during the stream
    events: list = []
    out = bytearray()
    bounds = [0, *cuts, len(data)]
    for start, end in zip(bounds, bounds[1:]):
        if start in handovers:
            state = export_state(core)
            if via == "msgpack":
                state = msgspec.msgpack.decode(msgspec.msgpack.encode(state), type=ServerConnectionState)
            else:
                state = msgspec.convert(msgspec.to_builtins(state), ServerConnectionState)
            core = import_state(state)
        for ev in core.feed(data[start:end]):
            events.append(ev)
            if isinstance(ev, rtmp.ConnectRequest):
                core.accept_connect()
            elif isinstance(ev, rtmp.PublishRequest):
                core.accept_publish(ev.stream_id)
        out += core.data_to_send()
    # S0+S1+S2 hold random bytes of each run; everything after them must match.
    return summary(events), bytes(out[1 + 2 * 1536 :]), core


def test_the_stream_is_what_a_hand_over_meets():
    data = _stream()
    events, out, core = _run(data, [], set())
    kinds = [e[0] if isinstance(e, tuple) else type(e).__name__ for e in events]
    assert kinds.count("VideoMessage") == 6 and kinds.count("AudioMessage") == 5
    assert any(isinstance(e, tuple) and e[0] == "VideoMessage" and e[2] > 0xFFFFFF for e in events)
    assert core.bytes_received > 5000 * 4, "acknowledgements must be part of what is compared"


@pytest.mark.parametrize("via", ["msgpack", "builtins"])
def test_one_hand_over_at_every_byte_of_the_first_4_kb_and_at_random_points(via):
    data = _stream()
    rng = random.Random(13)
    points = list(range(1, 4096)) + rng.sample(range(4096, len(data) - 1), 300)
    for cut in points:
        cuts = [cut]
        expected = _run(data, cuts, set())[:2]
        assert _run(data, cuts, {cut}, via)[:2] == expected, f"hand-over after {cut} bytes"


def test_several_hand_overs_in_a_row():
    data = _stream()
    rng = random.Random(7)
    for _ in range(60):
        cuts = sorted(rng.sample(range(1, len(data)), 12))
        expected = _run(data, cuts, set())[:2]
        assert _run(data, cuts, set(cuts))[:2] == expected, cuts


def test_a_state_that_cannot_be_right_is_refused():
    data = _stream()
    core = rtmp.ServerConnection()
    core.feed(data[:3500])
    good = msgspec.to_builtins(export_state(core))

    def refused(change, match):
        broken = msgspec.convert(good, ServerConnectionState)
        change(broken)
        with pytest.raises(ValueError, match=match):
            import_state(broken)

    def bad_version(s):
        s.version = 2

    def bad_chunk_size(s):
        s.in_chunk_size = 0

    def bad_stage(s):
        s.hs_stage = 5

    def overlong_message(s):
        s.in_streams.append(msgspec.convert([9, 0, 0, 4, 9, 1, False, b"12345"], type(s.in_streams[0]) if s.in_streams else None))

    refused(bad_version, "version 2")
    refused(bad_chunk_size, "chunk size 0")
    refused(bad_stage, "stage 5")
    if good["in_streams"]:
        refused(overlong_message, "unfinished message of 5 bytes for a length of 4")
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({**good, "surprise": 1}, ServerConnectionState)


def test_a_failed_core_has_no_state_to_move():
    core = rtmp.ServerConnection()
    with pytest.raises(Exception):
        core.feed(b"\x06" + bytes(1536))
    with pytest.raises(ValueError, match="failed"):
        export_state(core)
