"""Relup files are trusted only inside the configured relups directory.

Every path (the package directory, and every file and folder in it) is
checked: it must lie inside the directory both as written and once resolved,
and no symlink may stand anywhere on the way. `..` cannot escape either check.
"""

from __future__ import annotations

import os
from pathlib import Path


class RelupPathError(Exception):
    """A relup path is outside the relups directory, a symlink, or missing."""


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def resolve_package(relups_dir: Path, requested: str) -> Path:
    """The package directory for `requested`: a name ("1.1.0") or an absolute path."""
    root_written = Path(os.path.abspath(relups_dir))
    root = relups_dir.resolve()
    if not root.is_dir():
        raise RelupPathError(f"relups directory {relups_dir} does not exist")
    candidate = Path(requested)
    if not candidate.is_absolute():
        candidate = root / candidate
    written = Path(os.path.abspath(candidate))  # folds "..", follows nothing
    if _inside(written, root_written):
        written = root / written.relative_to(root_written)
    if not _inside(written, root) or written == root:
        raise RelupPathError(f"relup path {requested!r} is outside the relups directory {root}")
    current = root
    for part in written.relative_to(root).parts:
        current = current / part
        if current.is_symlink():
            raise RelupPathError(f"{current} is a symlink; relup files must be plain files in {root}")
    resolved = written.resolve()
    if not _inside(resolved, root):
        raise RelupPathError(f"relup path {requested!r} resolves outside the relups directory {root}")
    if not resolved.is_dir():
        raise RelupPathError(f"relup package {requested!r} not found in {root}")
    return resolved


def check_package_tree(package: Path) -> None:
    """Refuse a package that holds a symlink anywhere (files or folders)."""
    for dirpath, dirnames, filenames in os.walk(package, followlinks=False):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if path.is_symlink():
                raise RelupPathError(f"{path} is a symlink; relup files must be plain files")
