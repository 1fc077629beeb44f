"""The code a stage runs, as a hash that nobody maintains by hand.

A stage's code version is the source of its module and of every ``condense`` module that module
imports, transitively: an import walk over the parsed source (``ast``), so a helper three imports
away is in the key as surely as the stage itself. What counts:

- every ``import condense.x`` / ``from condense.x import y`` anywhere in a module, including
  imports inside functions (they run too);
- ``from package import name`` counts ``package.name`` when that is a module, else the package;
- a package's ``__init__`` counts only when something imports from it directly (importing
  ``condense.stages.base`` does not pull in every stage through ``condense/stages/__init__.py``);
- a module outside the package given as a root (a plugin that registers a method: the distill stage
  names the chosen method's module) is hashed by its file, and its ``condense`` imports followed.

What a module contributes is its *normalised* source: the syntax tree without docstrings or other
bare string statements, so comments, docstrings and formatting never re-key anything. Modules that
declare ``INFRASTRUCTURE = "why"`` at their top level (config schemas, the store, the executor,
progress, errors, leases and version records: code that cannot change an artifact's bytes, whose
settings reach keys as values) are walked through but not hashed.

What does not count: dynamic imports (``importlib.import_module``). Registries use them on purpose,
so that a method's key holds that method's code and not every other method's. Third-party packages
are not hashed.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import sys
from collections.abc import Iterable
from pathlib import Path

INFRASTRUCTURE = "computes keys; its own code is in none"

PACKAGE = "condense"
ROOT = Path(__file__).resolve().parent
"""The directory of the ``condense`` package being run (a copy in a test is hashed as itself)."""
MARKER = "INFRASTRUCTURE"


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


def plugin_file(name: str) -> Path | None:
    """The source file of an imported module outside the package (a plugin), or None."""
    path = getattr(sys.modules.get(name), "__file__", None)
    return Path(path) if path and path.endswith(".py") and module_file(name) is None else None


def source_file(name: str) -> Path | None:
    return module_file(name) or plugin_file(name)


def _absolute(node: ast.ImportFrom, current: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    package = current.split(".") if is_package else current.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


@functools.cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_bytes(), filename=str(path))


@functools.cache
def direct_imports(name: str) -> frozenset[str]:
    """The ``condense`` modules that module ``name`` imports (anywhere in its source)."""
    path = source_file(name)
    if path is None:
        return frozenset()
    found: set[str] = set()
    for node in ast.walk(_tree(path)):
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
        if module not in seen and source_file(module) is not None:
            seen.add(module)
            todo.extend(direct_imports(module))
    return frozenset(seen)


def code_modules(names: Iterable[str]) -> list[str]:
    """The sorted union of the closures of ``names``."""
    return sorted(set().union(*(closure(n) for n in names)))


@functools.cache
def infrastructure(name: str) -> str | None:
    """Why module ``name`` cannot change a result (its top-level ``INFRASTRUCTURE``), or None."""
    path = source_file(name)
    for node in _tree(path).body if path is not None else []:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == MARKER for t in node.targets)
            and isinstance(node.value, ast.Constant)
        ):
            return str(node.value.value)
    return None


def normalised(source: bytes, filename: str = "<source>") -> str:
    """The syntax tree of ``source`` without docstrings or other bare string statements, as text:
    what the interpreter runs, not how it is written or commented."""
    tree = ast.parse(source, filename=filename)
    for node in ast.walk(tree):
        for field in ("body", "orelse", "finalbody"):
            body = getattr(node, field, None)
            if not isinstance(body, list) or not body or not isinstance(body[0], ast.stmt):
                continue
            kept = [
                s
                for s in body
                if not (
                    isinstance(s, ast.Expr)
                    and isinstance(s.value, ast.Constant)
                    and isinstance(s.value.value, str)
                )
            ]
            setattr(node, field, kept or [ast.Pass()])
    return ast.dump(tree, annotate_fields=False, include_attributes=False)


@functools.cache
def module_digest(name: str) -> str:
    """The digest of module ``name``'s normalised source (16 hex digits)."""
    path = source_file(name)
    assert path is not None
    return hashlib.sha256(normalised(path.read_bytes(), str(path)).encode()).hexdigest()[:16]


def hashed_modules(names: Iterable[str]) -> dict[str, str]:
    """{module: digest} of what a code version is made of: the closure of ``names`` less the
    infrastructure modules."""
    return {m: module_digest(m) for m in code_modules(names) if infrastructure(m) is None}


def code_version(*names: str) -> str:
    """Hash of the normalised source of ``names`` and everything they import but infrastructure
    (module names and digests), cached per process: the code of a running process does not change
    under it."""
    digest = hashlib.sha256()
    for module, module_hash in hashed_modules(names).items():
        digest.update(f"{module}\0{module_hash}\n".encode())
    return digest.hexdigest()[:16]
