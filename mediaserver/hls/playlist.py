"""HLS media playlist rendering and atomic writing (RFC 8216)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class SegmentEntry:
    sequence: int
    uri: str
    duration: float
    """Seconds."""
    discontinuity: bool


def target_duration(entries: list[SegmentEntry], configured: float) -> int:
    """EXT-X-TARGETDURATION: no segment may be longer once rounded to an integer.

    RFC 8216 rounds each EXTINF to the nearest integer for this comparison; the
    configured target is the floor so the value stays stable for regular GOPs.
    """
    longest = max((round(e.duration) for e in entries), default=0)
    return max(int(math.ceil(configured)), longest, 1)


def render(
    entries: list[SegmentEntry],
    *,
    target: int,
    discontinuity_sequence: int,
    ended: bool,
) -> str:
    media_sequence = entries[0].sequence if entries else 0
    lines = [
        "#EXTM3U",
        "#EXT-X-VERSION:3",
        f"#EXT-X-TARGETDURATION:{target}",
        f"#EXT-X-MEDIA-SEQUENCE:{media_sequence}",
    ]
    if discontinuity_sequence:
        lines.append(f"#EXT-X-DISCONTINUITY-SEQUENCE:{discontinuity_sequence}")
    for entry in entries:
        if entry.discontinuity:
            lines.append("#EXT-X-DISCONTINUITY")
        lines.append(f"#EXTINF:{entry.duration:.3f},")
        lines.append(entry.uri)
    if ended:
        lines.append("#EXT-X-ENDLIST")
    lines.append("")
    return "\n".join(lines)


def write_atomically(path: Path, text: str) -> None:
    """Readers see the old playlist or the new one, never a partial file."""
    # The temp file is made fresh (O_EXCL | O_NOFOLLOW): a symlink or FIFO
    # planted under its name is removed, never followed or waited on; rename
    # replaces whatever entry `path` was without following it.
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with open(fd, "w", encoding="utf-8") as f:
        f.write(text)
    try:
        os.replace(tmp, path)
    except IsADirectoryError:
        os.unlink(tmp)
        raise IsADirectoryError(f"playlist {path} is a directory; not replaced") from None


@dataclass(slots=True)
class ParsedPlaylist:
    entries: list[SegmentEntry]
    target: int
    discontinuity_sequence: int
    ended: bool


def parse(text: str) -> ParsedPlaylist:
    """Read back a playlist this module wrote (after a restart)."""
    entries: list[SegmentEntry] = []
    sequence = target = discontinuity_sequence = 0
    duration = 0.0
    discontinuity = ended = False
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("#EXT-X-MEDIA-SEQUENCE:"):
            sequence = int(line.split(":", 1)[1])
        elif line.startswith("#EXT-X-TARGETDURATION:"):
            target = int(line.split(":", 1)[1])
        elif line.startswith("#EXT-X-DISCONTINUITY-SEQUENCE:"):
            discontinuity_sequence = int(line.split(":", 1)[1])
        elif line == "#EXT-X-DISCONTINUITY":
            discontinuity = True
        elif line.startswith("#EXTINF:"):
            duration = float(line.split(":", 1)[1].split(",", 1)[0])
        elif line == "#EXT-X-ENDLIST":
            ended = True
        elif line and not line.startswith("#"):
            entries.append(SegmentEntry(sequence, line, duration, discontinuity))
            sequence += 1
            discontinuity = False
    return ParsedPlaylist(entries, target, discontinuity_sequence, ended)
