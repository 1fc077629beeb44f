"""Scoring a comparison: per cell its accuracies, DD-Ranking's scores, calibration and cost, and
the fingerprint that says whether a leaderboard changed."""

from __future__ import annotations

from typing import Any

from condense import artifacts, scores
from condense.compare.spec import Cell, Comparison
from condense.config import ModelConfig
from condense.errors import CondenseError
from condense.models import CONVNET
from condense.report import input_scale
from condense.stages import Plan
from condense.stages.base import input_key
from condense.store import Store, stable_hash

UPSTREAM = ("difficulty", "experts", "teacher")
"""Stages whose seconds count as a method's preparation cost when its distillation reads them."""


Outcome = dict[str, Any] | BaseException | None
"""What a pooled job ended with: its outcome, the error that failed it, or None when it never ran
because a job it waits for failed."""


def failure(cell: Cell, outcomes: dict[str, Outcome]) -> str | None:
    """The one-line reason a cell failed (its first failed job's error), or None."""
    for name in cell.jobs:
        outcome = outcomes.get(name)
        if isinstance(outcome, BaseException):
            stage = name.split("-", 1)[0].split("[", 1)[0]
            message = " ".join(str(outcome).split())
            if not isinstance(outcome, CondenseError):  # not one of ours: its kind says what went wrong
                message = f"{type(outcome).__name__}: {message}" if message else type(outcome).__name__
            return f"{stage}: {message or type(outcome).__name__}"
    if any(outcomes.get(name) is None for name in cell.jobs):
        return "a job it needs did not run"
    return None


def _by_subject(store: Store, plan: Plan, arch: str) -> dict[str, dict[str, Any]]:
    """{subject: accuracy mean/std/runs, mean ECE, temperature-scaled ECE and ECE after masked
    temperature scaling} of one variant."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for key in plan.keys["evaluate"]:
        meta = store.meta("evaluate", key)
        if meta["arch"] == arch:
            runs.setdefault(meta["subject"], []).extend(meta["runs"])
    out = {}
    for subject, found in runs.items():
        entry: dict[str, Any] = scores.summarize([r["accuracy"] for r in found])
        for name in ("ece", "ece_scaled", "ece_masked"):
            values = [r.get(name) for r in found]
            entry[name] = None if None in values else round(sum(values) / len(values), 2)
        out[subject] = entry
    return out


def _ancestors(plan: Plan, stage: str) -> set[str]:
    """Stage names of the jobs ``stage``'s job waits for, transitively."""
    after = {job.name: plan.after[job.name] for job in plan.jobs}
    stage_of = {job.name: job.stage for job in plan.jobs}
    todo = [name for name in after if stage_of[name] == stage]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        for upstream in after.get(name, []):
            if upstream not in seen:
                seen.add(upstream)
                todo.append(upstream)
    return {stage_of[name] for name in seen if name in stage_of} | {"dataset"}


def stage_seconds(meta: dict[str, Any]) -> float:
    """Compute time of an artifact: its own plus its parts' (one expert each)."""
    return float(meta.get("seconds", 0.0)) + sum(float(p.get("seconds", 0.0)) for p in meta.get("parts", []))


def cost(cell: Cell, store: Store) -> dict[str, Any]:
    """Distillation seconds, preparation seconds (experts, difficulty, teacher it reads), and the bytes
    of the images and of what their labels need (as stored, or the teacher when labels are online)."""
    cfg, plan = cell.configs["main"], cell.plans["main"]
    keys = plan.keys
    distill = store.meta("distill", str(keys["distill"]))
    upstream = [s for s in UPSTREAM if s in _ancestors(plan, "distill") and s in keys]
    synthetic = artifacts.load_synthetic(store, str(keys["distill"]))
    count, classes = (
        len(synthetic.labels),
        len(store.meta("dataset", str(keys["dataset"]))["card"]["classes"]),
    )
    # One byte per pixel and channel, as exported; a method that stores more or less than its images
    # (INFER: real images and compensators) says what it stores.
    stored = distill.get("stats", {}).get("storage", {})
    image_bytes = int(stored.get("image_bytes", synthetic.images.numel()))
    if cfg.evaluate.recipe == "kd" and cfg.relabel.mode == "stored":
        labels, label_bytes = (
            "stored soft labels",
            int(store.meta("relabel", str(keys["relabel"]))["label_bytes"]),
        )
    elif cfg.evaluate.recipe == "kd":
        weights = store.path("teacher", str(keys["teacher"])) / artifacts.TEACHER_WEIGHTS
        labels, label_bytes = "teacher online", weights.stat().st_size
    elif cfg.evaluate.labels == "hard":
        labels, label_bytes = "hard", count  # one byte per class index
    else:
        labels, label_bytes = cfg.evaluate.labels, count * classes * 4  # float32 rows
    return {
        "distill_seconds": round(stage_seconds(distill), 2),
        "upstream_seconds": round(sum(stage_seconds(store.meta(s, str(keys[s]))) for s in upstream), 2),
        "image_bytes": image_bytes,
        "label_bytes": int(label_bytes),
        "labels": labels,
    }


def _mean_std(entry: dict[str, Any] | None) -> dict[str, float] | None:
    return None if entry is None else {"mean": entry["mean"], "std": entry["std"]}


def student(arch: str, model: ModelConfig) -> str:
    """The evaluation network as the leaderboard names it. A ConvNet shows its norm (and any width or
    depth it was given): the presets follow their papers, instance norm for MTT's family and batch
    norm for the teacher-based methods, so the same ``convnet`` is two different students unless
    ``evaluate.model`` pins one."""
    if arch != CONVNET:
        return arch
    shown = ["no norm" if model.norm == "none" else model.norm]
    shown += [f"width {model.width}"] if model.width != ModelConfig().width else []
    shown += [f"depth {model.depth}"] if model.depth is not None else []
    return f"{arch} ({', '.join(shown)})"


def score_cell(cell: Cell, arch: str, store: Store) -> dict[str, Any]:
    """The scores of one cell on one architecture, from its variants' evaluations."""
    main = _by_subject(store, cell.plans["main"], arch)
    hard = _by_subject(store, cell.plans["hard"], arch)
    plain = _by_subject(store, cell.plans["plain"], arch)
    distilled, random, full = main["distilled"], main.get("random_real"), main.get("full_data")
    entry: dict[str, Any] = {
        "accuracy": _mean_std(distilled),
        "random_real": _mean_std(random),
        "full_data": _mean_std(full),
        "hard_labels": {
            "distilled": _mean_std(hard["distilled"]),
            "full_data": _mean_std(hard.get("full_data")),
        },
        "no_augmentation": {
            "distilled": _mean_std(plain["distilled"]),
            "random_real": _mean_std(plain.get("random_real")),
        },
        "calibration": {name: distilled[name] for name in ("ece", "ece_scaled", "ece_masked")},
    }
    found: dict[str, Any] = {}
    if random is not None and "full_data" in hard:
        found.update(
            scores.label_robust(
                hard["distilled"]["mean"], hard["full_data"]["mean"], distilled["mean"], random["mean"]
            )
        )
    if random is not None and "random_real" in plain:
        found.update(
            scores.augmentation_robust(
                distilled["mean"], random["mean"], plain["distilled"]["mean"], plain["random_real"]["mean"]
            )
        )
    entry["scores"] = {k: round(v, 4) for k, v in found.items()}
    return entry


def score(comparison: Comparison, store: Store, outcomes: dict[str, Outcome]) -> list[dict[str, Any]]:
    """One entry per method x IPC x architecture: status (ok, or failed with its reason), cached
    (every job of the cell was a cache hit), accuracies, scores, calibration and cost."""
    entries = []
    for cell in comparison.cells:
        reason = failure(cell, outcomes)
        cached = reason is None and all(outcomes[name]["cached"] for name in cell.jobs)  # type: ignore[index]
        cell_cost = cost(cell, store) if reason is None else None
        distill_key = str(cell.plans["main"].keys["distill"])
        scale = input_scale(store.meta("distill", distill_key).get("input_std")) if reason is None else None
        for arch in comparison.spec.models:
            entry: dict[str, Any] = {
                "method": cell.method,
                "ipc": cell.ipc,
                "arch": arch,
                "student": student(arch, cell.configs["main"].student),
                "regime": cell.regime,
                "status": "ok" if reason is None else "failed",
                "reason": reason,
                "cached": cached,
            }
            if reason is None:
                entry.update(
                    score_cell(cell, arch, store), cost=cell_cost, input_scale=scale, distill_key=distill_key
                )
            entries.append(entry)
    return entries


def fingerprint(comparison: Comparison, entries: list[dict[str, Any]]) -> str:
    """What a leaderboard version stands for: every cell's status and the keys it was computed from."""
    cells = [
        {
            "method": c.method,
            "ipc": c.ipc,
            "keys": sorted(input_key(p.keys["evaluate"]) for p in c.plans.values()),
            "ok": all(e["status"] == "ok" for e in entries if e["method"] == c.method and e["ipc"] == c.ipc),
        }
        for c in comparison.cells
    ]
    return stable_hash({"models": comparison.spec.models, "cells": cells})
