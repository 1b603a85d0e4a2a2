"""The admin API's bearer token: from the config, or generated into the data directory.

A generated token is written once, mode 0600, to `data_dir/admin.token`,
where the CLI finds it. A token file that others can read is replaced.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from .config import Config

TOKEN_FILE = "admin.token"


def token_path(config: Config) -> Path:
    return Path(config.data_dir) / TOKEN_FILE


def read_token_file(path: Path) -> str | None:
    """The token in `path` if it is ours and private, else None."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode) or info.st_mode & 0o077 or info.st_uid != os.getuid():
            return None
        token = path.read_text(encoding="utf-8").strip()
    except (FileNotFoundError, PermissionError):
        return None
    return token or None


def load_or_create_token(config: Config) -> str:
    if config.admin.token:
        return config.admin.token
    path = token_path(config)
    existing = read_token_file(path)
    if existing:
        return existing
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{TOKEN_FILE}.{os.getpid()}")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        os.write(fd, token.encode() + b"\n")
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return token
