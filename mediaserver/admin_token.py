"""The admin API's bearer token: from the config, or generated into the data directory.

A generated token is written once, mode 0600, to `data_dir/admin.token`,
where the CLI finds it. The server only reuses a token file that is a plain
file (not a symlink), owned by its own user and readable by nobody else;
any other file is replaced by a fresh token.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from .config import Config

TOKEN_FILE = "admin.token"
MAX_TOKEN_BYTES = 4096


def token_path(config: Config) -> Path:
    return Path(config.data_dir) / TOKEN_FILE


def read_token_file(path: Path) -> str | None:
    """The token in `path` if the file is ours and private, else None.

    Opened without following a symlink, and checked on the open descriptor,
    so the file that is checked is the file that is read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:  # missing, a symlink (ELOOP), unreadable
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_mode & 0o077 or info.st_uid != os.getuid():
            return None
        data = os.read(fd, MAX_TOKEN_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(data) > MAX_TOKEN_BYTES:
        return None
    try:
        token = data.decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    return token or None


def load_or_create_token(config: Config) -> str:
    """The configured token; else the one in `data_dir/admin.token`; else a new one, saved there."""
    if config.admin.token:
        return config.admin.token
    path = token_path(config)
    existing = read_token_file(path)
    if existing:
        return existing
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    _write_private(path, token.encode() + b"\n")
    return token


def _write_private(path: Path, data: bytes) -> None:
    """Write `path` atomically: a new 0600 file next to it (O_EXCL: never an existing
    file or a planted symlink), flushed to disk, then renamed over `path`."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
