"""``condense compare``: every (method, IPC) cell through the pipeline's own stages, scored fairly.

A comparison (``condense/recipes/compare/<name>.yaml`` or a YAML path) names a list of methods, of
IPCs and of evaluation architectures, one ``dataset`` section for every cell, and the evaluation
recipe per label regime (``hard``, ``learned``, ``soft``: MTT's SGD+DSA recipe; ``kd``: the
RDED/SRe2L recipe). A cell's config is its method's preset (``presets``, e.g. ``digits-{method}``)
with the comparison's dataset section, its ``evaluate`` settings, the recipe of the method's label
regime, the method's own ``settings`` (and ``settings_by_ipc``), the IPC, the architectures and the
command's ``--set`` overrides, in that order.

Each cell is planned like ``condense run`` (:func:`condense.stages.make_plan`) three times over:

- ``main``: the method's own regime: distilled, random real and full data;
- ``hard``: the distilled images with hard labels under the ``hard`` recipe, beside full data under
  that recipe (DD-Ranking's hard-label recovery; the same plan as ``main`` for hard-label methods);
- ``plain``: ``main`` without augmentation (no DSA; for KD no crops, flips or CutMix), distilled and
  random real (DD-Ranking's augmentation-robust score).

The jobs of every cell and variant are pooled by name (a job's name holds its store key), so what
cells share (the dataset, experts, teachers, baselines per IPC and recipe) is one job, and a job
whose artifact is in the store is a cache hit: adding a method or an IPC computes only its cells.
No Prefect here; :mod:`condense_flows.compare` submits the pooled jobs.

Its parts: :mod:`~condense.compare.spec` (the comparison and its cells),
:mod:`~condense.compare.plan` (pooled jobs), :mod:`~condense.compare.score` (per-cell results) and
:mod:`~condense.compare.render` (tables and pictures); :func:`finish` publishes the leaderboard.
"""

from __future__ import annotations

from typing import Any

from condense import versions
from condense.compare.plan import check_ipcs, plan_comparison
from condense.compare.render import csv_text, html_page, markdown, pictures, rows, text_table
from condense.compare.score import Outcome, fingerprint, score, student
from condense.compare.spec import (
    CELL_FAILURES,
    Cell,
    CompareConfig,
    Comparison,
    compare_names,
    load_comparison,
)
from condense.store import Store, write_json

__all__ = [
    "CELL_FAILURES",
    "Cell",
    "CompareConfig",
    "Comparison",
    "Outcome",
    "check_ipcs",
    "compare_names",
    "finish",
    "load_comparison",
    "plan_comparison",
    "rows",
    "student",
    "text_table",
]


def finish(
    comparison: Comparison, store: Store, outcomes: dict[str, Outcome], run_id: str, seconds: float
) -> dict[str, Any]:
    """Score every cell, write the leaderboard (markdown, CSV, JSON, pictures) into the store and
    publish it as a version (unchanged cells and results keep the latest); returns the leaderboard."""
    entries = score(comparison, store, outcomes)
    card = store.meta("dataset", str(comparison.cells[0].plans["main"].keys["dataset"]))["card"]
    name = comparison.spec.name
    series = versions.leaderboard_series(store, card["name"], name)
    relative = f"{versions.LEADERBOARDS}/{card['name']}/{name}/{run_id}"
    folder = store.root / relative
    folder.mkdir(parents=True)
    ok_keys = {e["distill_key"] for e in entries if e["status"] == "ok"}
    board: dict[str, Any] = {
        "name": name,
        "dataset": card["name"],
        "run_id": run_id,
        "seconds": round(seconds, 2),
        "methods": comparison.spec.methods,
        "ipc": comparison.spec.ipc,
        "models": comparison.spec.models,
        "cells": entries,
    }
    board["pictures"] = pictures(comparison, store, entries, folder)
    record = {
        "name": name,
        "dataset": card["name"],
        "fingerprint": fingerprint(comparison, entries),
        "folder": relative,
        "artifacts": [
            [stage, key] for stage, key in comparison.artifacts() if stage != "distill" or key in ok_keys
        ],
    }
    files = {
        name: folder / f"leaderboard.{ext}"
        for name, ext in (("markdown", "md"), ("csv", "csv"), ("json", "json"), ("html", "html"))
    }
    board["files"] = {k: str(v) for k, v in files.items()}
    files["csv"].write_text(csv_text(entries))
    files["markdown"].write_text(markdown(board))
    files["html"].write_text(html_page(board), encoding="utf-8")
    write_json(files["json"], board)
    store.share(relative)  # the files first: a published version never names a missing folder
    version, new = versions.publish_in(
        store, series, record, lambda latest: latest["fingerprint"] == record["fingerprint"]
    )
    board["version"] = {"number": version["version"], "new": new, "created": version["created"]}
    return board
