"""Replays of real publishers' bytes (tests/data/*.bin), then mutations of them.

The captures are what the ffmpeg CLI and PyAV's RTMP muxer sent to our server
core (tests/data/capture_rtmp.py). Mutated, they must give events or a clean
ProtocolError: never another exception, never unbounded buffering.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mediaserver.proto import flv, rtmp
from mediaserver.proto.errors import ProtocolError

DATA = Path(__file__).resolve().parent / "data"
CAPTURES = sorted(DATA.glob("*_publish.bin"))
LIMIT = 1 << 20


def replay(data: bytes, step: int = 4096) -> list:
    server = rtmp.ServerConnection(max_message_size=LIMIT)
    events = []
    for start in range(0, len(data), step):
        new = server.feed(data[start : start + step])
        events += new
        for ev in new:
            if isinstance(ev, rtmp.ConnectRequest):
                server.accept_connect()
            elif isinstance(ev, rtmp.PublishRequest):
                server.accept_publish(ev.stream_id)
            elif isinstance(ev, rtmp.VideoMessage):
                flv.parse_video(ev.payload)
            elif isinstance(ev, rtmp.AudioMessage):
                flv.parse_audio(ev.payload)
        server.data_to_send()
        assert server._reader.buffered <= LIMIT + 65536  # noqa: SLF001
    return events


def test_captures_exist():
    assert {p.name for p in CAPTURES} >= {"ffmpeg_publish.bin", "pyav_publish.bin"}


@pytest.mark.parametrize("capture", CAPTURES, ids=lambda p: p.stem)
def test_real_publish_replays_to_the_expected_events(capture):
    events = replay(capture.read_bytes())
    kinds = [type(e).__name__ for e in events]
    assert kinds[:3] == ["HandshakeDone", "ConnectRequest", "PublishRequest"]
    assert "Metadata" in kinds
    video = [e for e in events if isinstance(e, rtmp.VideoMessage)]
    audio = [e for e in events if isinstance(e, rtmp.AudioMessage)]
    assert flv.parse_video(video[0].payload).is_config
    assert flv.parse_audio(audio[0].payload).is_config
    assert len(video) > 20 and len(audio) > 20
    assert [v.timestamp for v in video] == sorted(v.timestamp for v in video)
    assert kinds[-1] == "Unpublish"


mutation = st.tuples(st.sampled_from(["flip", "insert", "delete", "truncate"]), st.integers(0), st.binary(min_size=1, max_size=8))


@pytest.mark.parametrize("capture", CAPTURES, ids=lambda p: p.stem)
@given(mutations=st.lists(mutation, min_size=1, max_size=4))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_mutated_publish_gives_events_or_a_protocol_error(capture, mutations):
    data = bytearray(capture.read_bytes())
    for kind, position, blob in mutations:
        position %= len(data)
        if kind == "flip":
            data[position] ^= blob[0] or 1
        elif kind == "insert":
            data[position:position] = blob
        elif kind == "delete":
            del data[position : position + len(blob)]
        else:
            del data[position:]
        if not data:
            return
    try:
        replay(bytes(data))
    except ProtocolError:
        pass
