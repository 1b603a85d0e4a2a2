"""Thumbnail and audio-level policy: which frames the media path looks at, and when.

Thumbnails come from keyframes only (they decode alone), at most one per
interval. Audio levels are measured on a short window of AAC frames once per
interval, so decoding costs a fraction of the stream. Both run on the
stream's own timeline (output dts): logic has no clock.
"""

from __future__ import annotations

import copy
from typing import Any

from .effects import LEVELS_END, LEVELS_FRAME, THUMBNAIL
from .state import Previews


def on_video(previews: Previews, dts: int, keyframe: bool, data: Any) -> tuple[Previews, list[tuple[Any, ...]]]:
    if not keyframe or previews.thumbnail_interval_ms <= 0 or dts < previews.next_thumbnail:
        return previews, []
    new = copy.copy(previews)
    new.next_thumbnail = dts + previews.thumbnail_interval_ms
    return new, [(THUMBNAIL, dts, data)]


def on_audio(previews: Previews, dts: int, data: Any) -> tuple[Previews, list[tuple[Any, ...]]]:
    if previews.levels_interval_ms <= 0:
        return previews, []
    if previews.levels_until >= 0:
        if dts < previews.levels_until:
            return previews, [(LEVELS_FRAME, dts, data)]
        new = copy.copy(previews)
        new.levels_until = -1
        return new, [(LEVELS_END, dts)]
    if dts < previews.next_levels:
        return previews, []
    new = copy.copy(previews)
    new.next_levels = dts + previews.levels_interval_ms
    new.levels_until = dts + previews.levels_window_ms
    return new, [(LEVELS_FRAME, dts, data)]


def settings(values: dict[str, Any]) -> Previews:
    return Previews(
        thumbnail_interval_ms=int(values.get("thumbnail_interval_ms", 5000)),
        levels_interval_ms=int(values.get("levels_interval_ms", 2000)),
        levels_window_ms=int(values.get("levels_window_ms", 500)),
    )
