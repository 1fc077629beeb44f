"""Planning a comparison: every cell's variants planned like ``condense run``, their jobs pooled by
name so that what cells share runs once."""

from __future__ import annotations

from typing import Any

from condense.compare.spec import Comparison
from condense.prepare import check_ipc
from condense.stages import Job, Plan, make_plan
from condense.store import Store


def check_ipcs(comparison: Comparison, card: dict[str, Any]) -> None:
    """Every IPC fits every class (DatasetError otherwise), checked before any cell's job runs."""
    for ipc in comparison.spec.ipc:
        check_ipc(card, ipc)


def _needed(plan: Plan) -> list[Job]:
    """The plan's evaluation jobs and everything they wait for (not the export), in plan order."""
    wanted: set[str] = set()
    todo = [job.name for job in plan.jobs if job.stage == "evaluate"]
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo += plan.after[name]
    return [job for job in plan.jobs if job.name in wanted]


def plan_comparison(comparison: Comparison, store: Store, dataset_key: str) -> Comparison:
    """Plan every cell's variants and pool their jobs by name (equal names, equal work)."""
    check_ipcs(comparison, store.meta("dataset", dataset_key)["card"])
    for cell in comparison.cells:
        for variant, cfg in cell.configs.items():
            plan = make_plan(cfg, store, dataset_key)
            cell.plans[variant] = plan
            for job in _needed(plan):
                comparison.jobs.setdefault(job.name, job)
                comparison.configs.setdefault(job.name, cfg)
                comparison.after.setdefault(job.name, plan.after[job.name])
                if job.name not in cell.jobs:
                    cell.jobs.append(job.name)
    return comparison
