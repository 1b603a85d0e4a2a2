"""What logic source may contain, checked on the AST before any of it runs.

Loading code twice into one interpreter is only safe if the loaded code
cannot reach outside its generation or leave anything running behind it.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

ALLOWED_IMPORTS = frozenset(
    {
        "__future__", "msgspec", "typing", "dataclasses", "enum", "math", "copy",
        "collections", "itertools", "functools", "fractions", "bisect", "heapq", "re",
        "operator", "statistics", "struct", "zlib", "binascii", "base64", "abc",
    }
)
"""Top-level modules logic (and migrations) may import absolutely: pure libraries
that do no I/O. numpy is not one of them (np.load, np.save, tofile, memmap)."""

FORBIDDEN_CALLS = frozenset({"exec", "eval", "compile", "__import__", "breakpoint", "globals", "setattr"})
FORBIDDEN_NAMES = frozenset({"importlib", "threading", "_thread", "signal", "weakref", "sys", "os"})
IO_NAMES = frozenset({"open", "input", "print", "__builtins__", "__loader__", "__spec__", "__file__"})
"""Builtins that do I/O or reach the interpreter's internals: logic returns effects instead."""
FORBIDDEN_ATTRIBUTES = frozenset({"__globals__", "__builtins__", "__subclasses__", "__code__", "__loader__"})
FORBIDDEN_METHODS = frozenset({"__del__"})


@dataclass(frozen=True, slots=True)
class Violation:
    filename: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.filename}:{self.line}: {self.reason}"


def check_source(text: bytes, filename: str) -> list[Violation]:
    """Every rule `text` breaks; a syntax error is itself one violation."""
    try:
        tree = ast.parse(text, filename)
    except SyntaxError as exc:
        return [Violation(filename, exc.lineno or 0, f"syntax error: {exc.msg}")]
    found: list[Violation] = []

    def add(node: ast.AST, reason: str) -> None:
        found.append(Violation(filename, getattr(node, "lineno", 0), reason))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top == "mediaserver":
                    add(node, f"absolute self-import `import {alias.name}`: import the package relatively")
                elif top not in ALLOWED_IMPORTS:
                    add(node, f"import of `{alias.name}` is not allowed in logic")
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                top = (node.module or "").split(".")[0]
                if top == "mediaserver":
                    add(node, f"absolute self-import `from {node.module} import ...`: use a relative import")
                elif top not in ALLOWED_IMPORTS:
                    add(node, f"import from `{node.module}` is not allowed in logic")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id in FORBIDDEN_CALLS:
                add(node, f"call to `{node.func.id}()` is not allowed in logic")
        elif isinstance(node, ast.Name) and node.id in FORBIDDEN_NAMES:
            add(node, f"use of `{node.id}` is not allowed in logic")
        elif isinstance(node, ast.Name) and node.id in IO_NAMES:
            add(node, f"use of `{node.id}` is not allowed in logic (no I/O: return an effect)")
        elif isinstance(node, ast.Attribute) and node.attr in FORBIDDEN_ATTRIBUTES:
            add(node, f"attribute `{node.attr}` is not allowed in logic")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if node.name in FORBIDDEN_METHODS:
                add(node, "`__del__` is not allowed in logic (finalisers run at purge time)")
            if isinstance(node, ast.AsyncFunctionDef):
                add(node, f"`async def {node.name}`: session logic never awaits; return an effect")
        elif isinstance(node, (ast.Await, ast.AsyncFor, ast.AsyncWith)):
            add(node, "`await` in logic: return an effect instead")
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            add(node, "`global`/`nonlocal` state is not allowed in logic")
    return found
