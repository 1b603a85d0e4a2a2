"""AMF0: round trips of arbitrary nested values; malformed input is a ProtocolError."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mediaserver.proto import amf0
from mediaserver.proto.errors import ProtocolError

keys = st.text(max_size=20)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=False),
    st.text(max_size=50),
    st.just(amf0.Undefined),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(keys, children, max_size=5),
        st.dictionaries(keys, children, max_size=5).map(amf0.ECMAArray),
    ),
    max_leaves=30,
)


@given(st.lists(values, max_size=5))
def test_round_trip(items):
    decoded = amf0.decode(amf0.encode(*items))
    assert decoded == items
    for before, after in zip(items, decoded):
        assert type(after) is type(before) or isinstance(before, (int, float))


def test_long_strings_use_the_long_string_marker():
    text = "x" * 70000
    data = amf0.encode(text)
    assert data[0] == amf0.LONG_STRING
    assert amf0.decode(data) == [text]


def test_numbers_decode_as_floats():
    assert amf0.decode(amf0.encode(3, -1.5)) == [3.0, -1.5]
    assert math.isinf(amf0.decode(amf0.encode(float("inf")))[0])


@given(st.lists(values, min_size=1, max_size=3), st.data())
@settings(max_examples=200)
def test_truncated_input_is_a_protocol_error(items, data):
    encoded = amf0.encode(*items)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    try:
        amf0.decode(encoded[:cut])
    except ProtocolError:
        pass


@given(st.binary(max_size=200))
@settings(max_examples=300)
def test_garbage_gives_values_or_a_protocol_error(blob):
    try:
        amf0.decode(blob)
    except ProtocolError:
        pass


def test_specific_errors_name_the_problem():
    with pytest.raises(ProtocolError, match="unsupported AMF0 type marker 0x42"):
        amf0.decode(b"\x42")
    with pytest.raises(ProtocolError, match="truncated"):
        amf0.decode(b"\x02\x00\x10abc")
    with pytest.raises(ProtocolError, match="strict array claims"):
        amf0.decode(b"\x0a\xff\xff\xff\xff")


def test_nesting_depth_is_limited():
    deep = b"\x0a\x00\x00\x00\x01" * (amf0.MAX_DEPTH + 5) + b"\x05"
    with pytest.raises(ProtocolError, match="nesting deeper"):
        amf0.decode(deep)
