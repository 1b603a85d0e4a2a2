"""Executes a session's effects against the media path.

Effects are tuples (see `mediaserver.wire`); this is the only place that
turns them into calls. An effect that fails is logged with the stream's name
and counted; the session and every other stream go on.
"""

from __future__ import annotations

import logging
from typing import Any

from .. import wire
from ..hls.segmenter import HlsWriter
from ..media.previews import StreamPreviews
from ..logsetup import event

log = logging.getLogger("mediaserver.effects")
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_LOGGED_FAILURES = 5


class HlsEffects:
    def __init__(self, name: str, writer: HlsWriter, previews: StreamPreviews | None = None) -> None:
        self.name = name
        self.writer = writer
        self.previews = previews
        self.failures = 0

    def run(self, effects: list[tuple[Any, ...]]) -> None:
        writer = self.writer
        for effect in effects:
            op = effect[0]
            try:
                if op == wire.PACKET:
                    writer.write(effect[1], effect[2], effect[3], effect[4], effect[5])
                elif op == wire.SEGMENT_START:
                    writer.start_segment(effect[1], effect[2])
                elif op == wire.SEGMENT_END:
                    writer.end_segment(effect[1], effect[2])
                elif op == wire.LEVELS_FRAME:
                    if self.previews is not None:
                        self.previews.add_levels_frame(effect[1], effect[2])
                elif op == wire.CODEC:
                    writer.set_codec(effect[1], effect[2])
                    if self.previews is not None:
                        self.previews.set_codec(effect[1], effect[2])
                elif op == wire.THUMBNAIL:
                    if self.previews is not None:
                        self.previews.request_thumbnail(effect[1], effect[2])
                elif op == wire.LEVELS_END:
                    if self.previews is not None:
                        self.previews.end_levels_window(effect[1])
                elif op == wire.STREAM_END:
                    writer.end_stream()
                elif op == wire.LOG:
                    event(log, _LEVELS.get(effect[1], logging.INFO), str(effect[2]), stream=self.name)
                else:
                    raise ValueError(f"unknown effect opcode {op!r}")
            except Exception as exc:  # the media path must not take the session down
                self.failures += 1
                if self.failures <= _LOGGED_FAILURES or self.failures % 1000 == 0:
                    event(
                        log,
                        logging.ERROR,
                        "effect failed",
                        stream=self.name,
                        effect=op,
                        reason=f"{type(exc).__name__}: {exc}",
                        failures=self.failures,
                    )
