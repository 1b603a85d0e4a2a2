"""Where a previous process left each PID's continuity counter, read back from its last segment.

A new server process continues the playlists it finds (media sequence goes
on, after EXT-X-DISCONTINUITY). FFmpeg's HLS demuxer keeps one MPEG-TS
demuxer across segments and ignores that tag for continuity counters, so a
writer that starts its counters at 0 again makes it report "Packet corrupt"
at the restart. The counters a crashed process never saved are in the file
it wrote: the last packet of each PID carries them.

One read of one segment at start-up, decoded with numpy (no loop per packet).
Anything odd (missing, not a regular file, not 188-byte aligned TS) gives no
counters: the writer then starts at 0, which costs a player warning, never a
wrong byte.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from pathlib import Path

import numpy as np

log = logging.getLogger("mediaserver.hls")

_TS = 188
_SEGMENT_NAME = re.compile(r"seg[0-9]+\.ts")
_MAX_READ = 64 * 1024 * 1024
"""A segment of a few seconds is a few MB; anything bigger is not ours."""


def next_counters(directory: Path, name: str) -> dict[int, int]:
    """Next continuity counter per PID after the segment `name` in `directory`
    (the form of `TsState.cc`), or {} when the segment cannot be trusted."""
    if not _SEGMENT_NAME.fullmatch(name):
        log.warning("segment name %r in a recovered playlist is not segN.ts; counters start at 0", name)
        return {}
    path = directory / name
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        log.warning("segment %s not read for its counters: %s", path, exc.strerror)
        return {}
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size > _MAX_READ:
        # Checked before wrapping the fd: open() refuses a directory with an error.
        os.close(fd)
        log.warning("segment %s is not a regular file of at most %d bytes; counters start at 0", path, _MAX_READ)
        return {}
    with open(fd, "rb") as f:
        data = f.read()
    return counters_after(data)


def counters_after(data: bytes) -> dict[int, int]:
    """Next continuity counter per PID after the TS packets in `data` ({} if not TS)."""
    count = len(data) // _TS
    if count == 0 or len(data) % _TS:
        return {}
    packets = np.frombuffer(data, dtype=np.uint8).reshape(count, _TS)
    if not (packets[:, 0] == 0x47).all():
        return {}
    # Only packets with a payload advance the counter (2.4.3.3).
    carrying = packets[(packets[:, 3] & 0x10) != 0]
    if not len(carrying):
        return {}
    pids = ((carrying[:, 1].astype(np.int32) & 0x1F) << 8) | carrying[:, 2]
    counters = carrying[:, 3] & 0x0F
    # The last occurrence of each PID: unique on the reversed order.
    unique, first_from_end = np.unique(pids[::-1], return_index=True)
    last = counters[::-1][first_from_end]
    return {int(pid): (int(cc) + 1) & 0x0F for pid, cc in zip(unique, last)}
