"""What a definition-level code version would buy over the module-level one, measured before building it.

    python bench/definition_closure.py                  # this checkout, and the last 40 commits
    python bench/definition_closure.py --json bench/results/definition-closure.json

Today a stage's key hashes every module of its import closure (less infrastructure), each whole. A
definition-level closure would hash only the top-level functions, classes and constants the stage
reaches by name, starting from its own module and its method's (whole), falling back to a whole
module where a reference cannot be resolved statically (a module object passed around, a name that
is not a definition). Module-level statements other than definitions (registrations, ``if`` blocks)
count whenever anything of their module is reached.

Part 1, per stage of this checkout: hashed lines at module level and at definition level.
Part 2, over the last ``--commits`` commits: how many re-key each stage under either scheme (both
with today's normalisation and infrastructure list), so that the difference is what moving to
definitions would have saved.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cache_keys import ROOT, STAGES, lines, past_trees, roots, table, walker  # noqa: E402

WHOLE = "*"
"""A reference that stands for every definition of its module (the fallback)."""


@dataclass
class Module:
    """One module's top level: its definitions by name, its other statements, what its names import."""

    definitions: dict[str, ast.stmt] = field(default_factory=dict)
    other: list[ast.stmt] = field(default_factory=list)
    imports: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    """Local name -> (module, attribute), attribute None when the name is a module."""


class Definitions:
    """The definition-level closure over the package a :func:`cache_keys.walker` reads."""

    def __init__(self, walk: ModuleType):
        self.walk = walk
        self.modules: dict[str, Module] = {}

    def module(self, name: str) -> Module:
        if name not in self.modules:
            found = Module()
            path = self.walk.source_file(name)
            tree = ast.parse(path.read_bytes()) if path is not None else ast.Module(body=[])
            for node in tree.body:
                self._top(name, node, found, self._is_package(name))
            self.modules[name] = found
        return self.modules[name]

    def _top(self, name: str, node: ast.stmt, found: Module, package: bool) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            found.definitions[node.name] = node
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            named = [t.id for t in targets if isinstance(t, ast.Name)]
            for target in named:
                found.definitions[target] = node
            if not named:
                found.other.append(node)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            self._imports(name, node, found, package)
        else:
            found.other.append(node)
            for inner in ast.walk(node):  # imports inside ``if TYPE_CHECKING:`` and the like
                if isinstance(inner, ast.Import | ast.ImportFrom):
                    self._imports(name, inner, found, package)

    def _imports(self, name: str, node: ast.Import | ast.ImportFrom, found: Module, package: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("condense"):
                    local = alias.asname or alias.name.split(".")[0]
                    found.imports[local] = (alias.asname and alias.name or local, None)
            return
        source = self.walk.absolute(node.module, node.level, name, package)
        if not source.startswith("condense"):
            return
        for alias in node.names:
            sub = f"{source}.{alias.name}"
            target = (sub, None) if self.walk.module_file(sub) is not None else (source, alias.name)
            found.imports[alias.asname or alias.name] = target

    def references(self, module: str, node: ast.AST) -> set[tuple[str, str]]:
        """(module, name) pairs ``node`` refers to; (module, WHOLE) where it uses a module as a value."""
        own = self.module(module)
        found: set[tuple[str, str]] = set()
        attribute_bases: set[int] = set()
        for inner in ast.walk(node):
            if isinstance(inner, ast.Attribute):
                chain, base = [inner.attr], inner.value
                while isinstance(base, ast.Attribute):
                    chain.append(base.attr)
                    base = base.value
                if isinstance(base, ast.Name) and own.imports.get(base.id, ("", ""))[1] is None:
                    attribute_bases.add(id(base))
                    found.add(self._resolve_chain(own.imports[base.id][0], list(reversed(chain))))
        for inner in ast.walk(node):
            if isinstance(inner, ast.Import | ast.ImportFrom):  # an import inside a function
                local = Module()
                self._imports(module, inner, local, self._is_package(module))
                found.update((target, attr or WHOLE) for target, attr in local.imports.values())
            if isinstance(inner, ast.Name) and id(inner) not in attribute_bases:
                if inner.id in own.definitions:
                    found.add((module, inner.id))
                elif inner.id in own.imports:
                    target, attr = own.imports[inner.id]
                    found.add((target, attr if attr is not None else WHOLE))
        return found

    def _is_package(self, module: str) -> bool:
        path = self.walk.source_file(module)
        return path is not None and path.name == "__init__.py"

    def _resolve_chain(self, module: str, chain: list[str]) -> tuple[str, str]:
        """``module.a.b...``: the longest module prefix, then the first attribute of what remains."""
        while chain and self.walk.module_file(f"{module}.{chain[0]}") is not None:
            module = f"{module}.{chain.pop(0)}"
        return (module, chain[0]) if chain else (module, WHOLE)

    def closure(self, start: list[str]) -> dict[str, set[str]]:
        """module -> names reached from the whole modules ``start`` (WHOLE: every definition)."""
        reached: dict[str, set[str]] = {}
        todo = [(m, WHOLE) for m in start]
        while todo:
            module, name = todo.pop()
            if self.walk.source_file(module) is None:
                continue
            own = self.module(module)
            names = reached.setdefault(module, set())
            if name in names or WHOLE in names:
                continue
            first = not names
            if name != WHOLE and name not in own.definitions:
                if name in own.imports:  # a name this module re-exports
                    target, attr = own.imports[name]
                    todo.append((target, attr if attr is not None else WHOLE))
                    names.add(name)
                    continue
                name = WHOLE  # not resolvable statically: the whole module
            names.add(name)
            nodes = list(own.definitions.values()) if name == WHOLE else [own.definitions[name]]
            if first:
                nodes += own.other
            for node in nodes:
                todo.extend(self.references(module, node))
        return reached

    def hashed(self, reached: dict[str, set[str]], infrastructure: set[str]) -> dict[str, list[ast.stmt]]:
        """module -> the statements a definition-level key would hash (infrastructure left out)."""
        out = {}
        for module, names in sorted(reached.items()):
            if module in infrastructure:
                continue
            own = self.module(module)
            chosen = (
                own.definitions
                if WHOLE in names
                else {n: own.definitions[n] for n in names if n in own.definitions}
            )
            unique = {id(n): n for n in [*chosen.values(), *own.other]}
            out[module] = sorted(unique.values(), key=lambda n: n.lineno)
        return out


def statement_lines(statements: dict[str, list[ast.stmt]]) -> int:
    return sum((n.end_lineno or n.lineno) - n.lineno + 1 for nodes in statements.values() for n in nodes)


def digest(walk: ModuleType, statements: dict[str, list[ast.stmt]]) -> str:
    total = hashlib.sha256()
    for module, nodes in statements.items():
        body = ast.Module(body=list(nodes), type_ignores=[])
        total.update(module.encode() + b"\0" + walk.normalised(ast.unparse(body).encode()).encode())
    return total.hexdigest()


def measure(walk: ModuleType, infrastructure: set[str]) -> dict[str, dict[str, Any]]:
    """stage -> module-level and definition-level lines and digests, for the tree ``walk`` reads."""
    definitions = Definitions(walk)
    out = {}
    for stage in STAGES:
        if walk.module_file(f"condense.stages.{stage}") is None:
            continue
        modules = [m for m in walk.code_modules(roots(stage)) if m not in infrastructure]
        module_digest = hashlib.sha256()
        for module in modules:
            module_digest.update(
                module.encode() + b"\0" + walk.normalised(walk.source_file(module).read_bytes()).encode()
            )
        statements = definitions.hashed(definitions.closure(roots(stage)), infrastructure)
        out[stage] = {
            "module lines": lines(walk, modules),
            "definition lines": statement_lines(statements),
            "modules": len(modules),
            "modules reached by name": len(statements),
            "module digest": module_digest.hexdigest(),
            "definition digest": digest(walk, statements),
        }
    return out


def history(count: int, infrastructure: set[str]) -> list[dict[str, Any]]:
    commits, trees = past_trees(count, lambda walk: measure(walk, infrastructure))
    rows = []
    for i, line in enumerate(commits[:-1]):
        now, parent = trees[i], trees[i + 1]
        shared = [s for s in now if s in parent]
        rows.append(
            {
                "commit": line[:60],
                "module": sorted(s for s in shared if now[s]["module digest"] != parent[s]["module digest"]),
                "definition": sorted(
                    s for s in shared if now[s]["definition digest"] != parent[s]["definition digest"]
                ),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commits", type=int, default=40)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    here = walker(ROOT / "condense")
    infrastructure = {
        m for m in here.code_modules([f"condense.stages.{s}" for s in STAGES]) if here.infrastructure(m)
    }
    sizes = [
        {"stage": stage, **{k: v for k, v in row.items() if "digest" not in k}}
        for stage, row in measure(here, infrastructure).items()
    ]
    print("hashed lines per stage key (distill: with MTT), module level vs definition level\n")
    print(table(sizes))
    changes = history(args.commits, infrastructure)
    totals = [
        {
            "stage": stage,
            "commits re-keying it, module level": sum(stage in r["module"] for r in changes),
            "definition level": sum(stage in r["definition"] for r in changes),
        }
        for stage in STAGES
    ]
    print(f"\nper stage, of the last {len(changes)} commits\n")
    print(table(totals))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"sizes": sizes, "history": changes, "totals": totals}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
