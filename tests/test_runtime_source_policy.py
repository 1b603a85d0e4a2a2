"""The loader refuses logic source that could escape its generation."""

import pytest

from mediaserver.runtime.generation import installed_logic_dir, read_sources
from mediaserver.runtime.source_policy import check_source


def reasons(text: str) -> list[str]:
    return [v.reason for v in check_source(text.encode(), "x.py")]


def test_installed_logic_passes_the_policy():
    for text, path in read_sources(installed_logic_dir()).values():
        assert check_source(text, str(path)) == [], path


@pytest.mark.parametrize(
    "source, expected",
    [
        ("import mediaserver.logic.state\n", "absolute self-import"),
        ("from mediaserver.logic import state\n", "absolute self-import"),
        ("import importlib\n", "import of `importlib`"),
        ("import threading\n", "import of `threading`"),
        ("from os import path\n", "import from `os`"),
        ("x = __import__('os')\n", "`__import__()`"),
        ("exec('1')\n", "`exec()`"),
        ("eval('1')\n", "`eval()`"),
        ("class A:\n    def __del__(self):\n        pass\n", "`__del__`"),
        ("import signal\n", "import of `signal`"),
        ("import weakref\n", "import of `weakref`"),
        ("async def f():\n    pass\n", "never awaits"),
        ("X = 0\ndef f():\n    global X\n    X = 1\n", "`global`"),
    ],
)
def test_forbidden_constructs_are_refused(source, expected):
    found = reasons(source)
    assert any(expected in r for r in found), found


def test_relative_imports_and_msgspec_are_fine():
    assert reasons("from . import state\nfrom .effects import CODEC\nimport msgspec\nimport math\n") == []


@pytest.mark.parametrize(
    "source, name",
    [
        ("open('/tmp/x', 'w')\n", "open"),
        ("def handle(state, message):\n    with open('/tmp/x') as f:\n        return f.read()\n", "open"),
        ("f = open\n", "open"),
        ("import numpy\n", "numpy"),
        ("import pathlib\n", "pathlib"),
        ("import io\n", "io"),
        ("import socket\n", "socket"),
        ("from subprocess import run\n", "subprocess"),
        ("x = __builtins__\n", "__builtins__"),
        ("x = (1).__class__.__subclasses__\n", "__subclasses__"),
    ],
)
def test_io_is_refused_with_file_line_and_name(source, name):
    found = check_source(("\n" + source).encode(), "pkg/x.py")
    assert found, source
    text = str(found[0])
    assert text.startswith("pkg/x.py:2:") or text.startswith("pkg/x.py:3:"), text
    assert f"`{name}" in text, text
