"""Generations: loaded from source into their own names, all or nothing, purgeable."""

import gc
import os
import shutil
import sys
import weakref
from pathlib import Path

import pytest

from mediaserver.runtime.generation import (
    GenerationError,
    installed_logic_dir,
    load_generation,
    purge,
)

SETTINGS = {"segment_target_ms": 2000, "timestamp_jump_ms": 10000}


def generation_modules(generation):
    return [n for n in sys.modules if n.startswith(generation.package_name)]


@pytest.fixture
def logic_copy(tmp_path) -> Path:
    target = tmp_path / "logic"
    shutil.copytree(installed_logic_dir(), target, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def test_two_generations_have_separate_modules():
    first = load_generation(installed_logic_dir())
    second = load_generation(installed_logic_dir())
    try:
        assert first.package_name != second.package_name
        assert first.package.stream is not second.package.stream
        state = first.init("a", 0.0, SETTINGS)
        assert type(state) is first.state_type
        assert type(state) is not second.state_type
        # Inside a generation, every module resolves to that generation's modules.
        assert first.package.stream.timestamps is first.package.timestamps
        assert first.package.stream.timestamps is not second.package.timestamps
    finally:
        purge(first)
        purge(second)


@pytest.mark.parametrize(
    "broken, error",
    [
        ("def oops(:\n", "syntax error"),
        ("raise RuntimeError('boom at import')\n", "RuntimeError: boom at import"),
        ("from . import does_not_exist\n", "ImportError"),
        ("raise SystemExit(3)\n", "SystemExit"),
    ],
)
def test_failed_load_leaves_no_module_behind(logic_copy, broken, error):
    (logic_copy / "zz_broken.py").write_text(broken)
    # Imported last, so the modules before it have already executed.
    (logic_copy / "__init__.py").write_text(
        (logic_copy / "__init__.py").read_text() + "\nfrom . import zz_broken\n"
    )
    before = set(sys.modules)
    with pytest.raises(GenerationError, match=error):
        load_generation(logic_copy)
    assert set(sys.modules) - before <= {"mediaserver._generations"}
    assert not [n for n in sys.modules if n.startswith("mediaserver._generations.")
                and n not in before]


def test_missing_entry_point_is_refused(logic_copy):
    text = (logic_copy / "__init__.py").read_text().replace("VERSION = ", "NOT_VERSION = ")
    (logic_copy / "__init__.py").write_text(text)
    with pytest.raises(GenerationError, match="lacks VERSION"):
        load_generation(logic_copy)


def test_edited_file_with_same_size_and_mtime_never_runs_stale(logic_copy):
    init_py = logic_copy / "__init__.py"
    text = init_py.read_text()
    first = load_generation(logic_copy)
    stat = init_py.stat()
    edited = text.replace('VERSION = "1.0.0"', 'VERSION = "9.9.9"')
    assert len(edited) == len(text)
    init_py.write_text(edited)
    os.utime(init_py, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = load_generation(logic_copy)
    try:
        assert first.version == "1.0.0"
        assert second.version == "9.9.9"
    finally:
        purge(first)
        purge(second)


def test_purge_frees_the_generation():
    generation = load_generation(installed_logic_dir())
    state_class = weakref.ref(generation.state_type)
    module = weakref.ref(generation.package)
    assert generation_modules(generation)
    purge(generation)
    gc.collect()
    assert generation_modules(generation) == []
    assert state_class() is None
    assert module() is None


def test_tracebacks_show_generation_source():
    generation = load_generation(installed_logic_dir())
    try:
        with pytest.raises(KeyError) as info:
            generation.init("a", 0.0, {})
        frames = [entry.path for entry in info.traceback]
        assert any(f"[g{generation.number}]" in str(path) for path in frames)
    finally:
        purge(generation)
