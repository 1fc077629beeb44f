"""The code a stage runs, as a hash that nobody maintains by hand.

A stage's code version is the source of its module and of every ``condense`` module that module
imports, transitively: an import walk over the parsed source (``ast``), so a helper three imports
away is in the key as surely as the stage itself. What counts:

- every ``import condense.x`` / ``from condense.x import y`` anywhere in a module, including
  imports inside functions (they run too);
- ``from package import name`` counts ``package.name`` when that is a module, else the package;
- a package's ``__init__`` counts only when something imports from it directly (importing
  ``condense.stages.base`` does not pull in every stage through ``condense/stages/__init__.py``).

What does not: dynamic imports (``importlib.import_module``). Registries use them on purpose, so
that a method's key holds that method's code and not every other method's; the distill stage adds
the chosen method's module explicitly (:func:`condense.stages.distill.code_modules`). Third-party
packages are not hashed.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from collections.abc import Iterable
from pathlib import Path

PACKAGE = "condense"
ROOT = Path(__file__).resolve().parent
"""The directory of the ``condense`` package being run (a copy in a test is hashed as itself)."""


def module_file(name: str) -> Path | None:
    """The source file of ``condense`` module ``name`` (``condense.a.b``), or None if it is none."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    base = ROOT.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _absolute(node: ast.ImportFrom, current: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    package = current.split(".") if is_package else current.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


@functools.cache
def direct_imports(name: str) -> frozenset[str]:
    """The ``condense`` modules that module ``name`` imports (anywhere in its source)."""
    path = module_file(name)
    if path is None:
        return frozenset()
    tree = ast.parse(path.read_bytes(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(node, name, path.name == "__init__.py")
            submodules = [f"{source}.{alias.name}" for alias in node.names]
            modules = [m for m in submodules if module_file(m) is not None]
            found.update(modules)
            if len(modules) < len(submodules):  # some names are attributes of the package itself
                found.add(source)
    return frozenset(m for m in found if m != name and module_file(m) is not None)


@functools.cache
def closure(name: str) -> frozenset[str]:
    """``name`` and every ``condense`` module it imports, transitively."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        module = todo.pop()
        if module not in seen and module_file(module) is not None:
            seen.add(module)
            todo.extend(direct_imports(module))
    return frozenset(seen)


def code_modules(names: Iterable[str]) -> list[str]:
    """The sorted union of the closures of ``names``."""
    return sorted(set().union(*(closure(n) for n in names)))


@functools.cache
def _source_digest(name: str) -> bytes:
    path = module_file(name)
    assert path is not None
    return hashlib.sha256(path.read_bytes()).digest()


def code_version(*names: str) -> str:
    """Hash of the source of ``names`` and everything they import (module names and contents), cached
    per process: the code of a running process does not change under it."""
    digest = hashlib.sha256()
    for module in code_modules(names):
        digest.update(module.encode() + b"\0" + _source_digest(module))
    return digest.hexdigest()[:16]
