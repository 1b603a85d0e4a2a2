"""AMF0 encoding and decoding (Action Message Format 0), as RTMP commands use it."""

from __future__ import annotations

import struct
from typing import Any

from .errors import ProtocolError

NUMBER, BOOLEAN, STRING, OBJECT, NULL, UNDEFINED, REFERENCE, ECMA_ARRAY = 0, 1, 2, 3, 5, 6, 7, 8
OBJECT_END, STRICT_ARRAY, DATE, LONG_STRING = 9, 10, 11, 12
MAX_DEPTH = 64
MAX_VALUES = 10_000
"""Values one message may decode to (each key/value pair counts one): real
commands and onMetaData hold a few dozen; an 8 MiB message of one-byte
values would otherwise become millions of objects."""

_double = struct.Struct(">d")
_u16 = struct.Struct(">H")
_u32 = struct.Struct(">I")


class _UndefinedType:
    _instance: _UndefinedType | None = None

    def __new__(cls) -> _UndefinedType:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "Undefined"


Undefined = _UndefinedType()


class ECMAArray(dict):  # type: ignore[type-arg]
    """An AMF0 ECMA array: a dict that encodes with the ECMA array marker."""


def encode(*values: Any) -> bytes:
    out = bytearray()
    for value in values:
        _encode(out, value, 0)
    return bytes(out)


def _encode_key(out: bytearray, key: str) -> None:
    raw = key.encode("utf-8")
    if len(raw) > 0xFFFF:
        raise ValueError(f"AMF0 object key of {len(raw)} bytes is too long")
    out += _u16.pack(len(raw))
    out += raw


def _encode(out: bytearray, value: Any, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ValueError("AMF0 value nested too deeply")
    if value is None:
        out.append(NULL)
    elif value is Undefined:
        out.append(UNDEFINED)
    elif isinstance(value, bool):
        out += bytes((BOOLEAN, 1 if value else 0))
    elif isinstance(value, (int, float)):
        out.append(NUMBER)
        out += _double.pack(float(value))
    elif isinstance(value, str):
        raw = value.encode("utf-8")
        if len(raw) <= 0xFFFF:
            out.append(STRING)
            out += _u16.pack(len(raw))
        else:
            out.append(LONG_STRING)
            out += _u32.pack(len(raw))
        out += raw
    elif isinstance(value, dict):
        if isinstance(value, ECMAArray):
            out.append(ECMA_ARRAY)
            out += _u32.pack(len(value))
        else:
            out.append(OBJECT)
        for key, item in value.items():
            _encode_key(out, str(key))
            _encode(out, item, depth + 1)
        out += b"\x00\x00\x09"
    elif isinstance(value, (list, tuple)):
        out.append(STRICT_ARRAY)
        out += _u32.pack(len(value))
        for item in value:
            _encode(out, item, depth + 1)
    else:
        raise ValueError(f"cannot encode {type(value).__name__} as AMF0")


def decode(data: bytes | memoryview, max_values: int = MAX_VALUES) -> list[Any]:
    """Every value in `data`, in order. Raises ProtocolError on malformed input,
    and when `data` holds more than `max_values` values."""
    buf = bytes(data)
    values = []
    pos = 0
    budget = [max_values, max_values]
    while pos < len(buf):
        value, pos = _decode(buf, pos, 0, budget)
        values.append(value)
    return values


def _spend(budget: list[int]) -> None:
    """budget: [values left, the limit]."""
    budget[0] -= 1
    if budget[0] < 0:
        raise ProtocolError(f"AMF0 message holds more than {budget[1]} values")


def _need(buf: bytes, pos: int, size: int) -> None:
    if pos + size > len(buf):
        raise ProtocolError(f"AMF0 value truncated at byte {pos}: needs {size} more, has {len(buf) - pos}")


def _decode_str(buf: bytes, pos: int, long: bool) -> tuple[str, int]:
    size_len = 4 if long else 2
    _need(buf, pos, size_len)
    size = int.from_bytes(buf[pos : pos + size_len], "big")
    pos += size_len
    _need(buf, pos, size)
    try:
        text = buf[pos : pos + size].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"AMF0 string at byte {pos} is not UTF-8") from None
    return text, pos + size


def _decode_pairs(buf: bytes, pos: int, depth: int, into: dict[str, Any], budget: list[int]) -> int:
    while True:
        _need(buf, pos, 3)
        if buf[pos : pos + 3] == b"\x00\x00\x09":
            return pos + 3
        key, pos = _decode_str(buf, pos, False)
        value, pos = _decode(buf, pos, depth + 1, budget)
        into[key] = value


def _decode(buf: bytes, pos: int, depth: int, budget: list[int]) -> tuple[Any, int]:
    if depth > MAX_DEPTH:
        raise ProtocolError(f"AMF0 nesting deeper than {MAX_DEPTH}")
    _spend(budget)
    _need(buf, pos, 1)
    marker = buf[pos]
    pos += 1
    if marker == NUMBER:
        _need(buf, pos, 8)
        return _double.unpack_from(buf, pos)[0], pos + 8
    if marker == BOOLEAN:
        _need(buf, pos, 1)
        return buf[pos] != 0, pos + 1
    if marker == STRING:
        return _decode_str(buf, pos, False)
    if marker == LONG_STRING:
        return _decode_str(buf, pos, True)
    if marker == NULL:
        return None, pos
    if marker == UNDEFINED:
        return Undefined, pos
    if marker == OBJECT:
        obj: dict[str, Any] = {}
        return obj, _decode_pairs(buf, pos, depth, obj, budget)
    if marker == ECMA_ARRAY:
        _need(buf, pos, 4)
        array = ECMAArray()
        return array, _decode_pairs(buf, pos + 4, depth, array, budget)
    if marker == STRICT_ARRAY:
        _need(buf, pos, 4)
        count = _u32.unpack_from(buf, pos)[0]
        pos += 4
        if count > len(buf) - pos:  # every item takes at least one byte
            raise ProtocolError(f"AMF0 strict array claims {count} items in {len(buf) - pos} bytes")
        items = []
        for _ in range(count):
            item, pos = _decode(buf, pos, depth + 1, budget)
            items.append(item)
        return items, pos
    if marker == DATE:
        _need(buf, pos, 10)
        return _double.unpack_from(buf, pos)[0], pos + 10
    raise ProtocolError(f"unsupported AMF0 type marker 0x{marker:02x} at byte {pos - 1}")
