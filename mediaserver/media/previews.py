"""Runs thumbnail and level jobs off the event loop and keeps their results.

One `StreamPreviews` per stream name (a runtime resource, like the HLS
writer). Jobs run in a small shared thread pool (PyAV releases the GIL while
decoding); at most one job of each kind per stream is in flight, so a slow
machine skips thumbnails instead of queueing them.

Thumbnails are made on demand: logic says when a keyframe is due (every few
seconds), the keyframe is kept, and it is decoded only while someone is
looking (a thumbnail request in the last `VIEWER_WINDOW` seconds), or on the
request itself. Decoding a 1080p keyframe costs 5-20 ms of CPU; a stream
nobody watches should not pay it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..logsetup import event
from .levels import aac_levels
from .thumbnails import keyframe_to_jpeg

log = logging.getLogger("mediaserver.previews")
_MAX_WINDOW_FRAMES = 256
VIEWER_WINDOW = 30.0


class PreviewPool:
    def __init__(self, workers: int = 2) -> None:
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="previews")

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


class StreamPreviews:
    def __init__(self, name: str, pool: PreviewPool, thumbnail_width: int = 320) -> None:
        self.name = name
        self.pool = pool
        self.thumbnail_width = thumbnail_width
        self.configs: dict[str, bytes] = {}
        self.thumbnail: bytes | None = None
        self.thumbnail_dts = -1
        self.thumbnail_size = (0, 0)
        self.thumbnail_at = 0.0
        self.levels: list[dict[str, float]] = []
        self.levels_dts = -1
        self.levels_at = 0.0
        self.skipped = 0
        self.failures = 0
        self._window: list[Any] = []
        self._window_start = -1
        self.levels_window: tuple[int, int] = (-1, -1)
        """Output dts of the first frame measured and of the frame that closed the window."""
        self._busy = {"thumbnail": False, "levels": False}
        self._keyframe: tuple[int, bytes] | None = None
        """The latest keyframe logic chose, not decoded yet."""
        self._viewed_at = -VIEWER_WINDOW
        self._waiters: list[asyncio.Future[None]] = []

    def set_codec(self, track: str, config: bytes) -> None:
        self.configs[track] = bytes(config)

    def request_thumbnail(self, dts: int, keyframe: Any) -> None:
        self._keyframe = (dts, bytes(keyframe))
        if time.monotonic() - self._viewed_at < VIEWER_WINDOW:
            self._decode_pending()

    def _decode_pending(self) -> bool:
        config = self.configs.get("video")
        if self._keyframe is None or config is None or self._busy["thumbnail"]:
            return self._busy["thumbnail"]
        dts, keyframe = self._keyframe
        self._keyframe = None
        self._submit("thumbnail", self._thumbnail_done, dts, keyframe_to_jpeg, config, keyframe, self.thumbnail_width)
        return True

    async def current_thumbnail(self) -> bytes | None:
        """The freshest thumbnail, decoding the pending keyframe first if there is one."""
        self._viewed_at = time.monotonic()
        if self._decode_pending():
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter
        return self.thumbnail

    def add_levels_frame(self, dts: int, data: Any) -> None:
        if not self._window:
            self._window_start = dts
        if len(self._window) < _MAX_WINDOW_FRAMES:
            self._window.append(bytes(data))

    def end_levels_window(self, dts: int) -> None:
        frames, self._window = self._window, []
        config = self.configs.get("audio")
        if config is None or len(frames) < 2:
            return
        self._submit("levels", self._levels_done, (self._window_start, dts), aac_levels, config, frames)

    def _submit(self, kind: str, done: Any, dts: Any, fn: Any, *args: Any) -> None:
        if self._busy[kind]:
            self.skipped += 1
            return
        self._busy[kind] = True
        future = asyncio.get_running_loop().run_in_executor(self.pool.executor, fn, *args)
        future.add_done_callback(lambda f: self._finish(kind, done, dts, f))

    def _finish(self, kind: str, done: Any, dts: Any, future: asyncio.Future[Any]) -> None:
        self._busy[kind] = False
        if kind == "thumbnail":
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        if future.cancelled():
            return
        error = future.exception()
        if error is not None:
            self.failures += 1
            if self.failures <= 3:
                event(log, logging.WARNING, f"{kind} failed", stream=self.name, reason=f"{type(error).__name__}: {error}")
            return
        done(dts, future.result())

    def _thumbnail_done(self, dts: int, result: tuple[bytes, int, int]) -> None:
        self.thumbnail, width, height = result
        self.thumbnail_size = (width, height)
        self.thumbnail_dts = dts
        self.thumbnail_at = time.time()

    def _levels_done(self, window: tuple[int, int], levels: list[dict[str, float]]) -> None:
        if levels:
            self.levels = levels
            self.levels_window = window
            self.levels_dts = window[1]
            self.levels_at = time.time()

    @property
    def has_thumbnail(self) -> bool:
        """A thumbnail exists or can be made from a keyframe already kept."""
        return self.thumbnail is not None or self._keyframe is not None

    def describe(self) -> dict[str, Any]:
        return {
            "thumbnail": self.thumbnail is not None,
            "thumbnail_dts": self.thumbnail_dts,
            "thumbnail_at": self.thumbnail_at,
            "levels": self.levels,
            "levels_dts": self.levels_dts,
            "levels_at": self.levels_at,
        }
