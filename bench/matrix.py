"""The benchmark matrix, checked: every method on every new dataset shape, end to end on generated data.

    python bench/matrix.py                        # every method x cifar100, tinyimagenet, imagenette
    python bench/matrix.py --methods mtt,dm --datasets cifar100 --json /tmp/matrix.json
    python bench/matrix.py --markdown             # the README's matrix, from the recipes and the JSON

Each cell is ``condense run METHOD --dataset D`` (the CPU budget) on data that
:func:`condense.datasets.generate.write_benchmark` writes in that card's layout and shape (CIFAR-100:
shards of 100 classes of 32 px; Tiny-ImageNet: its official folder, 200 classes of 64 px; ImageNette:
an ImageNet folder of wnid directories, cropped to 128 px), with the budget shrunk to seconds (IPC 1,
3 training and 1 test image per class, networks 8 channels wide, 2 iterations, 2 evaluation epochs): it
proves the pair resolves, validates, loads its layout, distils, evaluates and exports at that shape,
not its accuracy. Every pipeline runs directly (no Prefect), one after another, each in a fresh store
under ``data/matrix``. A cell that fails is reported with its one-line error; the script goes on.
Cells are merged into an existing ``--json``, so a rerun of a few cells keeps the others.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from condense.configure import cards, load_config, recipes  # noqa: E402
from condense.datasets.generate import write_benchmark  # noqa: E402
from condense.store import Store  # noqa: E402

SHAPES = {"cifar100": [], "tinyimagenet": ["dataset.source=folder", "dataset.load=memory"], "imagenette": []}
"""The generated data's layout: CIFAR-100 as the card's shards, Tiny-ImageNet from its official folder."""
SMALL = [
    "compute.device=cpu",
    "ipc=1",
    "model.width=8",
    "dataset.workers=0",
    "experts.num_experts=1",
    "experts.epochs=3",
    "teacher.epochs=10",
    "teacher.batch_size=16",
    # The cards' ResNet-18 teachers and students (ImageNet-scale rows) would take the CPU minutes a cell.
    "teacher.arch=convnet",
    "evaluate.models=[convnet]",
    "evaluate.seeds=1",
    "evaluate.epochs=2",
    "evaluate.full_data_epochs=1",
]
DISTILL_SMALL = {
    "iterations": 2,
    "checkpoint_every": 1,
    "syn_steps": 2,
    "expert_epochs": 1,
    "max_start_epoch": 1,
    "initial_max_start_epoch": None,
    "window_growth_iterations": 1,
    "batch_real": 2,
    "batch_syn": None,
    "candidates": 2,
    "student_epochs": 1,
    "curricula": [1],
    "outer_loop": 1,
    "inner_loop": 1,
}
"""Settings that shrink a method's own loop, applied where its config has the field."""
LEAST_IPC = {"pdd": 2}
"""Methods whose smallest run takes more than one image a class (PDD's two stages)."""
REAL_DATA = {
    "digits": {m: "bench/results/digits-compare-ipc1, digits-compare-ipc10" for m in recipes()},
    "cifar10": {
        **{m: "README, Methods (bench/method_table.py)" for m in ("mtt", "ftd", "datm", "pad")},
        **{m: "bench/results/cifar10-compare-cpu" for m in ("mtt", "dm", "dream", "rded", "cudd")},
    },
}
"""Pairs that ran on the real dataset at the CPU budget, and where their numbers are."""


def shrunk(name: str) -> list[str]:
    """``DISTILL_SMALL``'s settings that the pair's method config has (a method with variants, e.g.
    DREAM on DSA or DM, has its variant's)."""
    fields = type(load_config(name).distill).model_fields
    return [f"distill.{k}={json.dumps(v)}" for k, v in DISTILL_SMALL.items() if k in fields]


def run_cell(method: str, dataset: str, data: Path, store: Path) -> dict[str, Any]:
    from tests.conftest import run_pipeline

    started = time.perf_counter()
    try:
        name, overrides = f"{dataset}-{method}", [f"dataset.path={data}", *SHAPES[dataset], *SMALL]
        overrides.append(f"ipc={LEAST_IPC.get(method, 1)}")
        cfg = load_config(name, [*overrides, *shrunk(name)])
        summary = run_pipeline(Store(store), cfg)
    except Exception as err:  # noqa: BLE001 - a failed cell is a result; the others still run
        first = (str(err).strip().splitlines() or [""])[0]
        return {
            "ok": False,
            "error": f"{type(err).__name__}: {first}",
            "seconds": time.perf_counter() - started,
        }
    return {
        "ok": True,
        "seconds": round(time.perf_counter() - started, 1),
        "ipc": cfg.ipc,
        "accuracy": summary["accuracy"]["convnet"]["mean"],
    }


def markdown(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Method x dataset: the paper table's IPCs, ``cpu ok`` where the generated-data run passed,
    ``real`` where the pair ran on the real data, ``n/a`` where the method does not apply."""
    names = list(cards())
    lines = ["| method | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for method, recipe in recipes().items():
        rows = recipe.paper_rows()
        cells = []
        for dataset in names:
            if dataset in recipe.not_for:
                cells.append("n/a")
                continue
            parts = ["/".join(map(str, rows[dataset]))] if dataset in rows else []
            cell = results.get(method, {}).get(dataset)
            if cell is not None:
                parts.append("gen ok" if cell["ok"] else "gen FAIL")
            if method in REAL_DATA.get(dataset, {}):
                parts.append("real")
            cells.append(", ".join(parts) or "cpu")
        lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(recipes()))
    parser.add_argument("--datasets", default=",".join(SHAPES))
    parser.add_argument("--work", type=Path, default=ROOT / "data" / "matrix")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "matrix.json")
    parser.add_argument(
        "--markdown", action="store_true", help="print the README's matrix from --json and stop"
    )
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.json.read_text())["cells"]))
        return
    results: dict[str, dict[str, dict[str, Any]]] = (
        json.loads(args.json.read_text())["cells"] if args.json.exists() else {}
    )
    for dataset in args.datasets.split(","):
        data = args.work / "data" / dataset
        if not data.exists():
            write_benchmark(dataset, data, train_per_class=3, test_per_class=1)
        for method in args.methods.split(","):
            if dataset in recipes()[method].not_for:
                continue
            store = args.work / "stores" / f"{dataset}-{method}"
            shutil.rmtree(store, ignore_errors=True)
            cell = run_cell(method, dataset, data, store)
            results.setdefault(method, {})[dataset] = cell
            shown = f"{cell['seconds']:.1f} s" + ("" if cell["ok"] else f"  {cell['error']}")
            print(f"{dataset:<13} {method:<6} {'ok' if cell['ok'] else 'FAIL':<5} {shown}", flush=True)
    report = {"command": "python bench/matrix.py", "cells": results, "real_data": REAL_DATA}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    print(f"\n{markdown(results)}\n\nwrote {args.json}")


if __name__ == "__main__":
    main()
