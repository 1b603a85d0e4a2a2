"""Read a TOML file into a msgspec struct, with errors that name the file and key."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import TypeVar

import msgspec

T = TypeVar("T")


def read_toml(path: str | Path, into: type[T], error: type[Exception]) -> T:
    """`path` decoded as `into`; any problem raises `error` with the reason.

    msgspec names the key, e.g. "Object contains unknown field `prot` - at `$.rtmp`".
    """
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path} is not valid TOML: {exc}") from None
    try:
        return msgspec.convert(raw, into)
    except msgspec.ValidationError as exc:
        raise error(f"{path}: {exc}") from None
