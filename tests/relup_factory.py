"""Builds relup packages in a temporary relups directory, for engine tests.

Each package is the installed logic with its VERSION changed and optional
edits, a relup.toml and a migrations.py, exactly as an operator ships one.
"""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

from mediaserver.runtime.generation import installed_logic_dir

IDENTITY_MIGRATIONS = """
def up(state):
    return dict(state)


def down(state):
    return dict(state)
"""


def make_relup(
    relups: Path,
    to: str,
    *,
    from_version: str = "1.0.0",
    migrations: str = IDENTITY_MIGRATIONS,
    edits: dict[str, tuple[str, str]] | None = None,
    extra_files: dict[str, str] | None = None,
    base: Path | None = None,
    toml: str | None = None,
) -> Path:
    """relups/<to>/ with logic (VERSION = to), relup.toml and migrations.py.

    `edits` maps a logic file to (old, new) text to replace; `extra_files`
    adds files under logic/.
    """
    package = relups / to
    logic = package / "logic"
    shutil.copytree(base or installed_logic_dir(), logic, ignore=shutil.ignore_patterns("__pycache__"))
    init = logic / "__init__.py"
    text = init.read_text()
    old_version = text.split('VERSION = "', 1)[1].split('"', 1)[0]
    init.write_text(text.replace(f'VERSION = "{old_version}"', f'VERSION = "{to}"'))
    for name, (old, new) in (edits or {}).items():
        path = logic / name
        source = path.read_text()
        assert old in source, f"{old!r} not in {name}"
        path.write_text(source.replace(old, new))
    for name, body in (extra_files or {}).items():
        (logic / name).write_text(textwrap.dedent(body))
    (package / "migrations.py").write_text(textwrap.dedent(migrations))
    (package / "relup.toml").write_text(
        toml
        if toml is not None
        else textwrap.dedent(
            f"""\
            from = "{from_version}"
            to = "{to}"
            description = "test relup"

            [[instructions]]
            type = "load_logic"

            [[instructions]]
            type = "update_sessions"
            kind = "stream"
            """
        )
    )
    return package
