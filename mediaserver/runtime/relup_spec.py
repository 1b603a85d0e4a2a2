"""`relups/<to-version>/relup.toml`: one upgrade, as data.

    from = "1.0.0"
    to = "1.1.0"
    description = "per-stream bitrate and fps window"

    [[instructions]]
    type = "load_logic"            # load ./logic as the new generation (first)

    [[instructions]]
    type = "update_sessions"       # migrate every live session of a kind
    kind = "stream"
    up = "up"                      # functions in ./migrations.py, on builtins
    down = "down"

The package also holds `logic/` (the complete logic package of `to`, not a
diff) and `migrations.py`. Instructions run in order: what others depend on
is loaded first, so `load_logic` must come before `update_sessions`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from ..tomlfile import read_toml

VERSION_PATTERN = re.compile(r"[0-9]+(\.[0-9]+){1,3}")


class RelupSpecError(Exception):
    """relup.toml cannot be used; the message names the key or the file."""


class LoadLogic(msgspec.Struct, tag="load_logic", tag_field="type", forbid_unknown_fields=True):
    path: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")] = "logic"
    """A folder directly inside the package: no `/`, no `..`."""


class UpdateSessions(msgspec.Struct, tag="update_sessions", tag_field="type", forbid_unknown_fields=True):
    kind: Literal["stream"] = "stream"
    up: str = "up"
    down: str = "down"


Instruction = LoadLogic | UpdateSessions


class RelupSpec(msgspec.Struct, forbid_unknown_fields=True, rename={"from_version": "from", "to_version": "to"}):
    from_version: str
    to_version: str
    instructions: list[Instruction]
    description: str = ""

    @property
    def load(self) -> LoadLogic:
        return next(i for i in self.instructions if isinstance(i, LoadLogic))

    @property
    def updates(self) -> list[UpdateSessions]:
        return [i for i in self.instructions if isinstance(i, UpdateSessions)]


def read_spec(path: Path) -> RelupSpec:
    spec = read_toml(path, RelupSpec, RelupSpecError)
    for key, value in (("from", spec.from_version), ("to", spec.to_version)):
        if not VERSION_PATTERN.fullmatch(value):
            raise RelupSpecError(f"{path}: `{key}` = {value!r} is not a version like 1.2.0")
    kinds = [type(i) for i in spec.instructions]
    if kinds.count(LoadLogic) != 1:
        raise RelupSpecError(f"{path}: needs exactly one `load_logic` instruction")
    if kinds.index(LoadLogic) != 0:
        raise RelupSpecError(f"{path}: `load_logic` must come before the updates that need it")
    return spec
