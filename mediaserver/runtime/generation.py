"""Code generations: the logic package loaded as one unit, under its own names.

Each generation is compiled from source bytes read once, into fresh module
objects named `mediaserver._generations.g<N>...` (a counter, never the
version string). Imports inside it resolve through `GenerationFinder`, which
serves only those in-memory sources: no `.pyc`, no path finders, so an edited
file can never run stale. A load that fails removes every module of that
generation. Purging removes the modules, the finder's sources and the
`linecache` entries, so nothing in the runtime keeps the generation alive.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import itertools
import linecache
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .source_policy import check_source

ROOT = "mediaserver._generations"
REQUIRED_NAMES = ("VERSION", "STATE_VERSION", "StreamState", "init", "handle", "describe")


class GenerationError(Exception):
    """A generation could not be loaded; the message says which file and why."""


@dataclass(slots=True)
class _Source:
    text: bytes
    filename: str
    is_package: bool


class GenerationFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves the modules of loaded generations from memory."""

    def __init__(self) -> None:
        self.sources: dict[str, _Source] = {}

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        source = self.sources.get(fullname)
        if source is None:
            return None
        return importlib.machinery.ModuleSpec(
            fullname, self, origin=source.filename, is_package=source.is_package
        )

    def create_module(self, spec: Any) -> None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        source = self.sources[module.__name__]
        code = compile(source.text, source.filename, "exec", dont_inherit=True)
        if source.is_package:
            module.__path__ = []
        exec(code, module.__dict__)


_finder = GenerationFinder()
_counter = itertools.count(1)


def _install_finder() -> None:
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
    if ROOT not in sys.modules:
        root = types.ModuleType(ROOT, "Parent of loaded logic generations.")
        root.__path__ = []
        sys.modules[ROOT] = root


@dataclass(eq=False)
class Generation:
    number: int
    source_dir: Path
    package_name: str
    module_names: list[str]
    package: types.ModuleType | None
    version: str
    state_version: int
    handle: Callable[[Any, Any], tuple[Any, list[tuple[Any, ...]]]] = field(repr=False)
    init: Callable[[str, float, dict[str, Any]], Any] = field(repr=False)
    describe: Callable[[Any], dict[str, Any]] = field(repr=False)
    state_type: type = field(repr=False)
    purged: bool = False


def read_sources(source_dir: Path) -> dict[str, tuple[bytes, Path]]:
    """Relative module name -> (source bytes, path), each file read exactly once."""
    if not (source_dir / "__init__.py").is_file():
        raise GenerationError(f"{source_dir} is not a package (no __init__.py)")
    sources: dict[str, tuple[bytes, Path]] = {}
    for path in sorted(source_dir.rglob("*.py")):
        relative = path.relative_to(source_dir).with_suffix("")
        parts = [p for p in relative.parts]
        if any(part.startswith(".") or part == "__pycache__" for part in parts):
            continue
        name = ".".join(parts)
        sources[name] = (path.read_bytes(), path)
    return sources


def load_generation(source_dir: Path) -> Generation:
    """Load the logic package in `source_dir` as a new generation, all or nothing."""
    _install_finder()
    number = next(_counter)
    package_name = f"{ROOT}.g{number}"
    module_names: list[str] = []
    sources = read_sources(source_dir)
    violations = [v for text, path in sources.values() for v in check_source(text, str(path))]
    if violations:
        raise GenerationError("logic refused: " + "; ".join(str(v) for v in violations))
    try:
        for relative, (text, path) in sources.items():
            is_package = relative == "__init__" or relative.endswith(".__init__")
            dotted = relative.removesuffix("__init__").rstrip(".")
            fullname = f"{package_name}.{dotted}" if dotted else package_name
            filename = f"{path} [g{number}]"
            _finder.sources[fullname] = _Source(text, filename, is_package)
            linecache.cache[filename] = (
                len(text),
                None,
                text.decode("utf-8", "replace").splitlines(keepends=True),
                filename,
            )
            module_names.append(fullname)
        package = importlib.import_module(package_name)
        missing = [name for name in REQUIRED_NAMES if not hasattr(package, name)]
        if missing:
            raise GenerationError(f"logic in {source_dir} lacks {', '.join(missing)}")
        return Generation(
            number=number,
            source_dir=source_dir,
            package_name=package_name,
            module_names=module_names,
            package=package,
            version=str(package.VERSION),
            state_version=int(package.STATE_VERSION),
            handle=package.handle,
            init=package.init,
            describe=package.describe,
            state_type=package.StreamState,
        )
    except GenerationError:
        _forget(package_name, module_names)
        raise
    except BaseException as exc:  # user code can raise anything, even SystemExit
        _forget(package_name, module_names)
        raise GenerationError(f"loading logic from {source_dir} failed: {type(exc).__name__}: {exc}") from None


def purge(generation: Generation) -> None:
    """Drop every reference the runtime holds to `generation`'s code."""
    _forget(generation.package_name, generation.module_names)
    generation.package = None
    generation.handle = generation.init = generation.describe = _purged  # type: ignore[assignment]
    generation.state_type = type(None)
    generation.purged = True


def _purged(*args: Any) -> Any:
    raise GenerationError("generation was purged")


def _forget(package_name: str, module_names: list[str]) -> None:
    prefix = package_name + "."
    for name in [n for n in sys.modules if n == package_name or n.startswith(prefix)]:
        del sys.modules[name]
    for name in module_names:
        source = _finder.sources.pop(name, None)
        if source is not None:
            linecache.cache.pop(source.filename, None)
    root = sys.modules.get(ROOT)
    if root is not None:
        root.__dict__.pop(package_name.rsplit(".", 1)[1], None)


def installed_logic_dir() -> Path:
    """The logic the server starts with: the `logic/` inside the installed package."""
    return Path(__file__).resolve().parent.parent / "logic"
