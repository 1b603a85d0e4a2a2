"""FLV tag bodies as RTMP carries them: AVC and AAC headers."""

import pytest

from mediaserver.proto import flv
from mediaserver.proto.errors import ProtocolError


def test_avc_nalu_with_negative_composition_time():
    tag = flv.parse_video(b"\x27\x01\xff\xff\xdf" + b"\x00\x00\x00\x01\x41")
    assert (tag.codec_id, tag.keyframe, tag.is_config, tag.is_end, tag.cts) == (7, False, False, False, -33)
    assert bytes(tag.data) == b"\x00\x00\x00\x01\x41"


def test_avc_sequence_header_and_end_of_sequence():
    record = b"\x01\x64\x00\x1f\xff\xe1\x00\x04\x67\x64\x00\x1f\x01\x00\x02\x68\xee"
    tag = flv.parse_video(b"\x17\x00\x00\x00\x00" + record)
    assert tag.is_config and tag.keyframe and bytes(tag.data) == record
    assert flv.parse_avc_config(tag.data) == (0x64, 0x1F, 4, [b"\x67\x64\x00\x1f"], [b"\x68\xee"])
    assert flv.parse_video(b"\x17\x02\x00\x00\x00").is_end


def test_aac_config_and_frame():
    config = flv.parse_audio(b"\xaf\x00\x11\x90")
    assert config.sound_format == 10 and config.is_config and config.channels == 2
    assert flv.parse_aac_config(config.data) == (2, 48000, 2)
    frame = flv.parse_audio(b"\xaf\x01\x21\x10")
    assert not frame.is_config and bytes(frame.data) == b"\x21\x10"


def test_other_codecs_parse_without_error():
    assert flv.parse_video(b"\x22\x00").codec_id == 2  # Sorenson H.263
    assert flv.parse_audio(b"\x2f\x00").sound_format == 2  # MP3


@pytest.mark.parametrize(
    "call, payload, reason",
    [
        (flv.parse_video, b"", "empty video message"),
        (flv.parse_video, b"\x17\x01\x00", "shorter than its 5-byte header"),
        (flv.parse_video, b"\x17\x07\x00\x00\x00", "AVC packet type 7"),
        (flv.parse_audio, b"", "empty audio message"),
        (flv.parse_audio, b"\xaf", "no packet type"),
        (flv.parse_audio, b"\xaf\x05", "AAC packet type 5"),
        (flv.parse_avc_config, b"\x00\x01", "malformed"),
        (flv.parse_aac_config, b"\x11", "too short"),
    ],
)
def test_malformed_tags_are_protocol_errors(call, payload, reason):
    with pytest.raises(ProtocolError, match=reason):
        call(payload)
