"""Quarantined messages, one JSON line each, in `data_dir/dead-letters/NAME.jsonl`.

A message that crashed its handler twice is kept here (payload included, as
base64) so an operator can replay it against a fixed generation.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import msgspec

log = logging.getLogger("mediaserver.dead_letters")
MAX_FILE_BYTES = 16 * 1024 * 1024
"""Past this a stream's file stops growing; the count still goes up."""

_encoder = msgspec.json.Encoder()


class DeadLetters:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.count = 0

    def keep(self, stream: str, generation: int, version: str, message: Any, reason: str) -> None:
        self.count += 1
        record = {
            "time": time.time(),
            "stream": stream,
            "generation": generation,
            "version": version,
            "kind": getattr(message, "kind", type(message).__name__),
            "message": msgspec.to_builtins(message) if isinstance(message, msgspec.Struct) else repr(message),
            "reason": reason,
        }
        path = self.directory / f"{stream}.jsonl"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            if path.exists() and path.stat().st_size > MAX_FILE_BYTES:
                return
            with open(path, "ab") as f:
                f.write(_encoder.encode(record) + b"\n")
        except OSError as exc:
            log.error("cannot write dead letter for %s: %s", stream, exc)
