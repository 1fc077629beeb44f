"""The package's layers: no import runs back up them, and every module has its place.

A module may import its own layer and the ones below. The layers, bottom up:

0. foundation: the schemas, errors, the store, devices, networks and augmentations, data sources,
   version records: what every layer above may use.
1. data and training primitives: loading and preparing real data, the supervised loop, relabeling.
2. artifacts: the formats stages store (the synthetic set, expert buffers, soft labels, the export).
3. algorithms: experts, teachers, evaluation and every distillation method (with their internals).
4. stages: declarations of what each step reads, keys and runs, and the executor that runs them.
5. products: what users call: configuration, comparisons, run summaries, gc, readers, converters.

``flows/`` and ``tasks/`` sit above all of them; nothing in ``condense`` imports Prefect.
"""

from __future__ import annotations

import ast

import pytest

from condense import codeversion

LAYERS: dict[int, set[str]] = {
    0: {
        "condense",
        "condense.augment",
        "condense.codeversion",
        "condense.config",
        "condense.crops",
        "condense.devices",
        "condense.errors",
        "condense.folders",
        "condense.gsam",
        "condense.leases",
        "condense.models",
        "condense.plots",
        "condense.progress",
        "condense.report",
        "condense.scores",
        "condense.versions",
        "condense.zca",
    },
    1: {"condense.prepare", "condense.relabel", "condense.streaming", "condense.training"},
    2: {"condense.artifacts", "condense.export", "condense.synthetic"},
    3: {
        "condense.difficulty",
        "condense.evaluate",
        "condense.experts",
        "condense.labels",
        "condense.teacher",
    },
    4: set(),
    5: {
        "condense.configure",
        "condense.convert",
        "condense.devicecheck",
        "condense.distilled",
        "condense.garbage",
        "condense.summary",
    },
}
PACKAGES = {
    "condense.store": 0,
    "condense.datasets": 0,
    "condense.methods": 3,
    "condense.stages": 4,
    "condense.compare": 5,
}
"""Packages whose modules all share one layer."""


def _modules() -> list[str]:
    return sorted(
        ".".join(("condense", *p.relative_to(codeversion.ROOT).with_suffix("").parts)).removesuffix(
            ".__init__"
        )
        for p in codeversion.ROOT.rglob("*.py")
    )


def layer(module: str) -> int | None:
    for number, members in LAYERS.items():
        if module in members:
            return number
    for package, number in PACKAGES.items():
        if module == package or module.startswith(f"{package}."):
            return number
    return None


def upward_imports() -> list[str]:
    """``a (n) -> b (m)`` for every import of a higher layer m > n."""
    found = []
    for module in _modules():
        for target in sorted(codeversion.direct_imports(module)):
            if (layer(target) or 0) > (layer(module) or 0):
                found.append(f"{module} ({layer(module)}) -> {target} ({layer(target)})")
    return found


def test_every_module_has_a_layer():
    assert [m for m in _modules() if layer(m) is None] == []


def test_no_import_runs_back_up_the_layers():
    assert upward_imports() == []


def test_the_check_finds_an_import_that_runs_back_up(monkeypatch: pytest.MonkeyPatch):
    # artifacts.py importing the method layer (for SyntheticSet) was such an import.
    real = codeversion.direct_imports

    def with_upward(module: str) -> frozenset[str]:
        extra = {"condense.methods.base"} if module == "condense.artifacts" else set()
        return real(module) | extra

    monkeypatch.setattr(codeversion, "direct_imports", with_upward)
    assert upward_imports() == ["condense.artifacts (2) -> condense.methods.base (3)"]


def test_the_library_never_imports_prefect_or_the_flows():
    outside = ("prefect", "condense_flows", "condense_tasks")
    found = []
    for path in sorted(codeversion.ROOT.rglob("*.py")):
        module = str(path.relative_to(codeversion.ROOT))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            found += [f"{module}: {n}" for n in names if n.split(".")[0] in outside]
    assert found == []
