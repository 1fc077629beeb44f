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
import json
import os
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
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


def absolute(module: str | None, level: int, current: str, is_package: bool) -> str:
    """The absolute name of ``from <level dots><module> import ...`` written in module ``current``."""
    if not level:
        return module or ""
    package = current.split(".") if is_package else current.split(".")[:-1]
    base = package[: len(package) - (level - 1)]
    return ".".join([*base, *([module] if module else [])])


def _strip(tree: ast.Module) -> tuple[ast.Import | ast.ImportFrom, ...]:
    """Remove docstrings and other bare string statements from ``tree`` in place; returns its import
    statements (one walk does both: parsing and walking are most of what keying a plan costs)."""
    imports: list[ast.Import | ast.ImportFrom] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            imports.append(node)
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
    return tuple(imports)


def _dump(tree: ast.Module) -> str:
    return ast.dump(tree, annotate_fields=False, include_attributes=False)


@dataclass(frozen=True)
class Parsed:
    """What keying needs of one source file: its digest, its imports and its infrastructure mark."""

    digest: str
    """sha256 (16 hex digits) of the normalised syntax tree."""
    imports: tuple[tuple[str | None, int, tuple[str, ...]], ...]
    """(module, level, names) per import statement; module None for ``import a.b``."""
    marker: str | None
    """Its top-level ``INFRASTRUCTURE`` string, or None."""


def _parse(source: bytes, filename: str) -> Parsed:
    tree = ast.parse(source, filename=filename)
    imports = tuple(
        (None, 0, tuple(a.name for a in node.names))
        if isinstance(node, ast.Import)
        else (node.module, node.level, tuple(a.name for a in node.names))
        for node in _strip(tree)
    )
    marker = next(
        (
            str(node.value.value)
            for node in tree.body
            if isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == MARKER for t in node.targets)
            and isinstance(node.value, ast.Constant)
        ),
        None,
    )
    return Parsed(hashlib.sha256(_dump(tree).encode()).hexdigest()[:16], imports, marker)


def cache_dir() -> Path:
    """Where condense keeps what it can always recompute: ``$CONDENSE_CACHE_DIR``, else ``condense``
    under ``$XDG_CACHE_HOME`` or ``~/.cache``."""
    chosen = os.environ.get("CONDENSE_CACHE_DIR")
    if chosen:
        return Path(chosen)
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "condense"


def _cache_file() -> Path:
    return cache_dir() / "code-digests.json"


class _Cache:
    """Parsed files by the sha256 of their bytes, kept on disk between processes: parsing the
    package is most of what planning an all-cached run costs. Keyed by content, an entry can only
    be missing, never stale; an unreadable cache is ignored, a failed write skipped."""

    LIMIT = 4096

    def __init__(self) -> None:
        self.entries: dict[str, Parsed] | None = None
        self.new = False
        self.lock = threading.Lock()

    def get(self, path: Path) -> Parsed:
        source = path.read_bytes()
        raw = hashlib.sha256(source).hexdigest()
        with self.lock:
            if self.entries is None:
                self.entries = self._read()
            found = self.entries.get(raw)
        if found is None:
            found = _parse(source, str(path))
            with self.lock:
                self.entries[raw] = found
                self.new = True
        return found

    def _read(self) -> dict[str, Parsed]:
        try:
            data = json.loads(_cache_file().read_text(encoding="utf-8"))
            return {
                raw: Parsed(d, tuple((m, lv, tuple(ns)) for m, lv, ns in imports), marker)
                for raw, (d, imports, marker) in data.items()
            }
        except (OSError, ValueError, TypeError):
            return {}

    def save(self) -> None:
        with self.lock:
            if not self.new or self.entries is None:
                return
            self.new = False
            kept = list(self.entries.items())[-self.LIMIT :]
            data = {raw: [p.digest, [list(i) for i in p.imports], p.marker] for raw, p in kept}
        target = _cache_file()
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            scratch = target.with_name(f"{target.name}.{os.getpid()}.tmp")
            scratch.write_text(json.dumps(data), encoding="utf-8")
            os.replace(scratch, target)  # whole or absent for a reader in another process
        except OSError:
            pass


_cache = _Cache()


@functools.cache
def _parsed(path: Path) -> Parsed:
    return _cache.get(path)


@functools.cache
def direct_imports(name: str) -> frozenset[str]:
    """The ``condense`` modules that module ``name`` imports (anywhere in its source)."""
    path = source_file(name)
    if path is None:
        return frozenset()
    found: set[str] = set()
    for module, level, names in _parsed(path).imports:
        if module is None and level == 0:  # import a.b
            found.update(names)
            continue
        source = absolute(module, level, name, path.name == "__init__.py")
        submodules = [f"{source}.{alias}" for alias in names]
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
    return _parsed(path).marker if path is not None else None


def normalised(source: bytes, filename: str = "<source>") -> str:
    """The syntax tree of ``source`` without docstrings or other bare string statements, as text:
    what the interpreter runs, not how it is written or commented."""
    tree = ast.parse(source, filename=filename)
    _strip(tree)
    return _dump(tree)


@functools.cache
def module_digest(name: str) -> str:
    """The digest of module ``name``'s normalised source (16 hex digits)."""
    path = source_file(name)
    assert path is not None
    return _parsed(path).digest


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
    _cache.save()
    return digest.hexdigest()[:16]
