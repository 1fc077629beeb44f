"""What enters a stage's key, and how often commits re-key it: the raw-source scheme against the
normalised one (docstrings, comments and formatting dropped; infrastructure modules walked, not hashed).

    python bench/cache_keys.py                      # this checkout, and the last 40 commits
    python bench/cache_keys.py --commits 80 --json bench/results/cache-keys.json

Part 1, per stage of this checkout: the modules and source lines its code version hashed before
(every module of its import closure) and now (the closure less ``INFRASTRUCTURE`` modules).

Part 2, over the last ``--commits`` commits: for each commit and stage, whether its code version
differs from the parent commit's, under the old scheme (raw bytes of every closure module) and the
new one (normalised source, today's infrastructure modules left out). Each commit's tree is read with
``git archive``; the import walk is today's :mod:`condense.codeversion`, pointed at that tree.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from condense.stages import all_stages  # noqa: E402

T = TypeVar("T")
STAGES = sorted(all_stages())
"""Today's stages; a commit's tree is asked for each that it has."""


def walker(package: Path) -> ModuleType:
    """A fresh copy of today's codeversion (its caches empty), walking the package at ``package``."""
    spec = importlib.util.spec_from_file_location(
        f"codeversion_{abs(hash(package))}", ROOT / "condense" / "codeversion.py"
    )
    if spec is None or spec.loader is None:
        raise SystemExit(f"error: cannot load {ROOT / 'condense' / 'codeversion.py'}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    module.ROOT = package
    return module


def roots(stage: str) -> list[str]:
    """The modules a stage's code version starts from (distill: MTT's, the default method)."""
    return [f"condense.stages.{stage}", *(["condense.methods.mtt"] if stage == "distill" else [])]


def lines(walk: ModuleType, modules: list[str]) -> int:
    return sum(len(walk.source_file(m).read_text().splitlines()) for m in modules)


def stage_sizes(walk: ModuleType, infrastructure: set[str]) -> list[dict[str, Any]]:
    rows = []
    for stage in STAGES:
        if walk.module_file(f"condense.stages.{stage}") is None:
            continue
        every = walk.code_modules(roots(stage))
        hashed = [m for m in every if m not in infrastructure]
        rows.append(
            {
                "stage": stage,
                "modules before": len(every),
                "lines before": lines(walk, every),
                "modules now": len(hashed),
                "lines now": lines(walk, hashed),
            }
        )
    return rows


def versions(walk: ModuleType, infrastructure: set[str]) -> dict[str, tuple[str, str]]:
    """stage -> (old-scheme digest, new-scheme digest) for the tree ``walk`` reads."""
    out = {}
    for stage in STAGES:
        if walk.module_file(f"condense.stages.{stage}") is None:
            continue
        old, new = hashlib.sha256(), hashlib.sha256()
        for module in walk.code_modules(roots(stage)):
            source = walk.source_file(module).read_bytes()
            old.update(module.encode() + b"\0" + hashlib.sha256(source).digest())
            if module not in infrastructure:
                new.update(module.encode() + b"\0" + walk.normalised(source).encode())
        out[stage] = (old.hexdigest(), new.hexdigest())
    return out


def past_trees(count: int, read: Callable[[ModuleType], T]) -> tuple[list[str], list[T]]:
    """The last ``count`` + 1 commits (``"<sha> <subject>"``, newest first) and ``read`` of each one's
    ``condense`` tree, walked by today's code version (see :func:`walker`)."""
    commits = subprocess.run(
        ["git", "log", "--format=%h %s", f"-{count + 1}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    trees: list[T] = []
    with tempfile.TemporaryDirectory() as tmp:
        for line in commits:
            sha = line.split()[0]
            target = Path(tmp) / sha
            target.mkdir()
            archive = subprocess.run(
                ["git", "archive", sha, "condense"], cwd=ROOT, capture_output=True, check=True
            )
            with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
                tar.extractall(target, filter="data")
            trees.append(read(walker(target / "condense")))
    return commits, trees


def history(count: int, infrastructure: set[str]) -> list[dict[str, Any]]:
    commits, trees = past_trees(count, lambda walk: versions(walk, infrastructure))
    rows = []
    for i, line in enumerate(commits[:-1]):
        now, parent = trees[i], trees[i + 1]
        rows.append(
            {
                "commit": line[:60],
                "old": sorted(s for s in now if s in parent and now[s][0] != parent[s][0]),
                "new": sorted(s for s in now if s in parent and now[s][1] != parent[s][1]),
            }
        )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    columns = list(rows[0])
    cells = [[str(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)) for line in [columns, *cells]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commits", type=int, default=40)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    here = walker(ROOT / "condense")
    infrastructure = {
        m for m in here.code_modules([f"condense.stages.{s}" for s in STAGES]) if here.infrastructure(m)
    }
    sizes = stage_sizes(here, infrastructure)
    print("what a stage's key hashes (distill: with MTT)\n")
    print(table(sizes))
    changes = history(args.commits, infrastructure)
    print(f"\nstages re-keyed by each of the last {len(changes)} commits (old scheme / new scheme)\n")
    for row in changes:
        print(
            f"{row['commit']:<62} old: {','.join(row['old']) or '-':<70} new: {','.join(row['new']) or '-'}"
        )
    totals = [
        {
            "stage": stage,
            "commits re-keying it, old": sum(stage in r["old"] for r in changes),
            "new": sum(stage in r["new"] for r in changes),
        }
        for stage in STAGES
        if any(stage in r["old"] or stage in r["new"] for r in changes)
        or stage in {s["stage"] for s in sizes}
    ]
    print(f"\nper stage, of {len(changes)} commits\n")
    print(table(totals))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"sizes": sizes, "history": changes, "totals": totals}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
