"""Reading a served file without following a symlink or opening anything but a regular file.

Anyone who can write to the data directory could plant a symlink (to
/etc/passwd, to the admin token), a FIFO (an open() that blocks the event
loop) or a directory where a playlist is expected. So the HTTP side opens the
stream directory with O_NOFOLLOW | O_DIRECTORY, the file relative to it
(`dir_fd`) after an lstat that says "regular file", with O_NOFOLLOW |
O_NONBLOCK, and checks with fstat that what it opened is that same regular
file. Anything else is "not there" (None): the caller answers 404.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def open_regular(directory: Path, name: str) -> tuple[int, os.stat_result] | None:
    """An fd and its fstat for the regular file `name` directly in `directory`, or None.

    `directory`'s last component must be a real directory (not a link to one);
    `name` must be a single path component (the caller matched it already).
    """
    try:
        dir_fd = os.open(directory, _DIR_FLAGS)
    except OSError:
        return None
    try:
        try:
            before = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            return None
        if not stat.S_ISREG(before.st_mode):
            return None
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
        except OSError:
            return None
        opened = os.fstat(fd)
        # Swapped between lstat and open for something else: refuse.
        if not stat.S_ISREG(opened.st_mode) or (opened.st_dev, opened.st_ino) != (before.st_dev, before.st_ino):
            os.close(fd)
            return None
        return fd, opened
    finally:
        os.close(dir_fd)


def read_regular(directory: Path, name: str, limit: int = 64 * 1024 * 1024) -> bytes | None:
    """The bytes of the regular file `name` in `directory` (at most `limit`), or None."""
    opened = open_regular(directory, name)
    if opened is None:
        return None
    fd, info = opened
    try:
        size = min(info.st_size, limit)
        chunks = []
        while size > 0:
            chunk = os.read(fd, size)
            if not chunk:
                break
            chunks.append(chunk)
            size -= len(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)
