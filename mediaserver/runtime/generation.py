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

import ast
import asyncio
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import itertools
import linecache
import sys
import traceback
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .source_policy import check_source

ROOT = "mediaserver._generations"
REQUIRED_NAMES = ("VERSION", "STATE_VERSION", "StreamState", "init", "handle", "describe")


class GenerationError(Exception):
    """A generation could not be loaded; the message says which file and why."""


@dataclass(slots=True)
class _Source:
    code: types.CodeType
    filename: str
    is_package: bool


class GenerationFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves the modules of loaded generations from memory (compiled once)."""

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
        if source.is_package:
            module.__path__ = []
        exec(source.code, module.__dict__)


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
        parts = list(relative.parts)
        if any(part.startswith(".") or part == "__pycache__" for part in parts):
            continue
        sources[".".join(parts)] = (path.read_bytes(), path)
    return sources


@dataclass(slots=True)
class _Prepared:
    number: int
    package_name: str
    source_dir: Path
    sources: dict[str, _Source] = field(default_factory=dict)
    result: Generation | None = None


def _prepare(source_dir: Path, extra_modules: dict[str, Path], prepared: _Prepared) -> Iterator[None]:
    files = read_sources(source_dir)
    for name, path in extra_modules.items():
        try:
            files[name] = (path.read_bytes(), path)
        except OSError as exc:
            raise GenerationError(f"cannot read {path}: {exc.strerror}") from None
    yield
    violations = []
    for text, path in files.values():  # every file checked before any is compiled, all refusals said
        violations.extend(check_source(text, str(path)))
    if violations:
        raise GenerationError("logic refused: " + "; ".join(str(v) for v in violations))
    yield
    for relative, (text, path) in files.items():
        is_package = relative == "__init__" or relative.endswith(".__init__")
        dotted = relative.removesuffix("__init__").rstrip(".")
        fullname = f"{prepared.package_name}.{dotted}" if dotted else prepared.package_name
        filename = f"{path} [g{prepared.number}]"
        try:
            code = compile(text, filename, "exec", dont_inherit=True)
        except (SyntaxError, ValueError) as exc:
            raise GenerationError(f"{path}: cannot compile: {exc}") from None
        prepared.sources[fullname] = _Source(code, filename, is_package)
        linecache.cache[filename] = (
            len(text), None, text.decode("utf-8", "replace").splitlines(keepends=True), filename,
        )
        yield


def _activate(prepared: _Prepared) -> Iterator[None]:
    """Execute the modules one per step: the package object is registered first,
    unexecuted, so each submodule can be imported on its own; its __init__ runs last."""
    _install_finder()
    _finder.sources.update(prepared.sources)
    name = prepared.package_name
    spec = importlib.util.spec_from_loader(name, _finder, origin=prepared.sources[name].filename, is_package=True)
    assert spec is not None
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    for module_name in prepared.sources:
        if module_name != name and module_name not in sys.modules:
            importlib.import_module(module_name)
            yield
    _finder.exec_module(package)
    missing = [name for name in REQUIRED_NAMES if not hasattr(package, name)]
    if missing:
        raise GenerationError(f"logic in {prepared.source_dir} lacks {', '.join(missing)}")
    prepared.result = Generation(
        number=prepared.number,
        source_dir=prepared.source_dir,
        package_name=prepared.package_name,
        module_names=list(prepared.sources),
        package=package,
        version=str(package.VERSION),
        state_version=int(package.STATE_VERSION),
        handle=package.handle,
        init=package.init,
        describe=package.describe,
        state_type=package.StreamState,
    )


def _new_prepared(source_dir: Path) -> _Prepared:
    number = next(_counter)
    return _Prepared(number, f"{ROOT}.g{number}", source_dir)


def _discard(prepared: _Prepared) -> None:
    _forget(prepared.package_name, list(prepared.sources))
    for source in prepared.sources.values():
        linecache.cache.pop(source.filename, None)


def _fail(prepared: _Prepared, exc: BaseException) -> GenerationError:
    where = _where(prepared, exc)
    _discard(prepared)
    if isinstance(exc, GenerationError):
        return exc
    return GenerationError(
        f"loading logic from {prepared.source_dir} failed{where}: {type(exc).__name__}: {exc}"
    )


def _where(prepared: _Prepared, exc: BaseException) -> str:
    """` at FILE:LINE`, the innermost line of this generation's code that raised."""
    filenames = {source.filename for source in prepared.sources.values()}
    found = ""
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename in filenames:
            found = f" at {frame.filename.rsplit(' [g', 1)[0]}:{frame.lineno}"
    return found


def read_version(source_dir: Path) -> str:
    """The `VERSION = "x.y.z"` of `source_dir/__init__.py`, read from its AST (nothing runs)."""
    path = source_dir / "__init__.py"
    try:
        tree = ast.parse(path.read_bytes(), str(path))
    except (OSError, SyntaxError, ValueError) as exc:
        raise GenerationError(f"cannot read VERSION from {path}: {exc}") from None
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == "VERSION" for t in targets):
            value = getattr(node, "value", None)
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                return value.value
            raise GenerationError(f"{path}:{node.lineno}: VERSION must be a string literal")
    raise GenerationError(f"{path} has no VERSION = \"...\" at module level")


def load_generation(source_dir: Path, extra_modules: dict[str, Path] | None = None) -> Generation:
    """Load the logic package in `source_dir` as a new generation, all or nothing.

    `extra_modules` (name -> file) are loaded into the same generation, e.g. a
    relup's migrations, so they are purged with it.
    """
    prepared = _new_prepared(source_dir)
    try:
        for _ in _prepare(source_dir, extra_modules or {}, prepared):
            pass
        for _ in _activate(prepared):
            pass
        assert prepared.result is not None
        return prepared.result
    except BaseException as exc:  # user code can raise anything, even SystemExit
        raise _fail(prepared, exc) from None


async def load_generation_async(
    source_dir: Path, extra_modules: dict[str, Path] | None = None
) -> Generation:
    """`load_generation` one file per event-loop turn, to keep streams flowing."""
    prepared = _new_prepared(source_dir)
    try:
        for _ in _prepare(source_dir, extra_modules or {}, prepared):
            await asyncio.sleep(0)
        for _ in _activate(prepared):
            await asyncio.sleep(0)
        assert prepared.result is not None
        return prepared.result
    except BaseException as exc:
        if isinstance(exc, asyncio.CancelledError):
            _discard(prepared)
            raise
        raise _fail(prepared, exc) from None


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
