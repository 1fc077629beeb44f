"""A finished run: its summary (the ``--json`` object), its published version and its run folder.

The summary is built from the plan and what each job reported; the run folder
(``<store>/runs/<run_id>/``) holds ``summary.json``, ``report.md`` and ``grid.png``.
"""

from __future__ import annotations

import shutil
import time
import uuid
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

from condense import report, versions
from condense.config import PipelineConfig
from condense.errors import DamagedArtifactError
from condense.export import GRID
from condense.leases import Lease
from condense.stages import dataset_job, execute, get_stage, make_plan
from condense.stages.evaluate import evaluation_name, subjects
from condense.stages.export import accuracy_table
from condense.stages.plan import Plan
from condense.store import Store, write_json


def stage_table(plan: Plan, outcomes: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per stage, in plan order: cached (every job was), compute seconds (the work inside its jobs,
    summed; waiting for a device turn or another job is not work), wall seconds (first start to last
    end), key, the devices its jobs ran on and (on GPUs) the peak device memory of any of its jobs."""
    table: dict[str, dict[str, Any]] = {}
    for stage in ["dataset", *plan.stages()]:
        mine = [o for o in outcomes if o["stage"] == stage]
        begin = min(o["started"] for o in mine)
        end = max(o["started"] + o["seconds"] for o in mine)
        table[stage] = {
            "cached": all(o["cached"] for o in mine),
            "seconds": round(sum(o["compute_seconds"] for o in mine), 3),
            "wall_seconds": round(end - begin, 3),
            "key": plan.summary_key(stage),
            "devices": sorted({o["device"]["device"] for o in mine}),
        }
        peaks = [o["peak_memory_bytes"] for o in mine if "peak_memory_bytes" in o]
        if peaks:
            table[stage]["peak_memory_bytes"] = max(peaks)
    return table


def device_names(outcomes: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """What each device that ran a job is (name, memory or threads)."""
    return {o["device"]["device"]: o["device"] for o in outcomes}


def _label_summary(cfg: PipelineConfig, store: Store, plan: Plan) -> dict[str, Any]:
    """Where the evaluation's labels came from, and what stored labels cost next to the images."""
    if cfg.evaluate.recipe != "kd":
        return {"kind": cfg.evaluate.labels}
    r = cfg.relabel
    summary: dict[str, Any] = {
        "kind": f"kd-{r.mode}",
        "top_k": r.top_k,
        "quantize": r.quantize,
        "stored_epochs": r.stored_epochs,
    }
    if "relabel" in plan.keys:
        meta = store.meta("relabel", str(plan.keys["relabel"]))
        summary.update({k: meta[k] for k in ("epochs", "label_bytes", "label_disk_bytes", "image_bytes")})
    return summary


def storage(cfg: PipelineConfig, card: dict[str, Any], distill: dict[str, Any]) -> dict[str, Any]:
    """What the set costs to keep and how many images a student trains on: the method's own account
    where it stores more than images (INFER: real images and compensators, ``stats["storage"]``),
    else ipc images per class, one byte per pixel and channel as exported."""
    stats = distill.get("stats", {})
    if "storage" in stats:
        return stats["storage"]
    images = len(card["classes"]) * cfg.ipc
    pixels = card["channels"] * card["resolution"] ** 2
    return {"stored_images": images, "training_images": images, "image_bytes": images * pixels}


def build_summary(
    cfg: PipelineConfig, store: Store, plan: Plan, outcomes: list[dict[str, Any]], run_id: str, seconds: float
) -> dict[str, Any]:
    keys = {stage: key for stage, key in plan.keys.items() if isinstance(key, str)}
    card = store.meta("dataset", keys["dataset"])["card"]
    distill = store.meta("distill", keys["distill"])
    teacher = store.meta("teacher", keys["teacher"])
    table = accuracy_table(store, list(plan.keys["evaluate"]))
    models = cfg.evaluate.models
    baselines = [s for s in table[models[0]] if s != "distilled"]
    export_url = store.url("export", keys["export"])
    run_url = f"{store.location}/runs/{run_id}"
    return {
        "run_id": run_id,
        "config_name": cfg.name,
        "dataset": card["name"],
        "method": cfg.method,
        "ipc": cfg.ipc,
        "store": store.location,
        "seconds": round(seconds, 2),
        "stages": stage_table(plan, outcomes),
        "devices": device_names(outcomes),
        "accuracy": {arch: table[arch]["distilled"] for arch in models},
        "baselines": {s: {k: table[models[0]][s][k] for k in ("mean", "std")} for s in baselines},
        "baselines_by_arch": {arch: {s: table[arch][s] for s in baselines} for arch in models},
        "evaluation_runs": cfg.evaluate.seeds,
        "learned_lr": distill["lr"],
        # How the accuracies were measured, each set's: the recipe, and what departs from its standard
        # form ("mtt+adam": the mtt recipe with Adam; "replay": the distilled set's learned schedule;
        # "staged": the distilled set trained stage by stage, PDD's).
        "evaluation_recipe": evaluation_name(cfg, "distilled"),
        "evaluation": {subject: evaluation_name(cfg, subject) for subject in subjects(cfg)},
        "teacher": {
            **{k: teacher[k] for k in ("source", "arch", "train_accuracy", "test_accuracy")},
            **({"members": teacher["members"]} if "members" in teacher else {}),
        },
        "labels": _label_summary(cfg, store, plan),
        "storage": storage(cfg, card, distill),
        "distill_stats": distill.get("stats", {}),
        "input_std": distill.get("input_std"),
        "artifacts": {
            "synthetic": f"{store.url('distill', keys['distill'])}/synthetic.zarr",
            "soft_labels": f"{store.url('soft_labels', keys['soft_labels'])}/labels.zarr",
            "shards": [f"{export_url}/{name}" for name in store.meta("export", keys["export"])["shards"]],
            "manifest": f"{export_url}/manifest.json",
            "grid_png": f"{run_url}/{GRID}",
            "run_dir": run_url,
        },
        "keys": keys,
    }


def new_run_id() -> str:
    return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def finish_run(
    cfg: PipelineConfig,
    store: Store,
    plan: Plan,
    outcomes: list[dict[str, Any]],
    started: float,
    run_id: str,
) -> dict[str, Any]:
    """Summarise the run, publish its set as a version, and write its run folder; returns the summary."""
    summary = build_summary(cfg, store, plan, outcomes, run_id, time.time() - started)
    record = {
        "dataset": summary["dataset"],
        "method": cfg.method,
        "ipc": cfg.ipc,
        "config_name": cfg.name,
        "source_fingerprint": store.meta("dataset", summary["keys"]["dataset"])["card"]["fingerprint"],
        "accuracy": summary["accuracy"],
        "baselines": summary["baselines"],
        "run_id": run_id,
        "keys": summary["keys"],
        "evaluations": list(plan.keys["evaluate"]),
    }
    version, new = versions.publish(store, record)
    summary["version"] = {"number": version["version"], "new": new, "created": version["created"]}
    run_dir = store.root / versions.RUNS / run_id
    run_dir.mkdir(parents=True)
    shutil.copy(store.path("export", summary["keys"]["export"]) / GRID, run_dir / GRID)
    write_json(run_dir / "summary.json", summary)
    (run_dir / "report.md").write_text(report.markdown(summary))
    store.share(f"{versions.RUNS}/{run_id}")
    return summary


def finish_cached(cfg: PipelineConfig, store: Store) -> tuple[dict[str, Any], int] | None:
    """A run whose every job is already in the store, finished without a flow run: the same
    summary, version and run folder as the pipeline flow writes, and the number of jobs; None when
    any job has something to compute (then the flow runs). The check is what the executor itself
    does first (the artifact is committed, its meta intact and its files of their recorded sizes),
    so nothing that would be recomputed is taken as done."""
    started, run_id = time.time(), new_run_id()
    dataset = get_stage("dataset")
    params = dataset.resolve(cfg) if dataset.resolve is not None else {}
    # Resolved once here (the source's fingerprint reads its files), not again by the executor.
    resolved = replace(dataset_job(), key=dataset.key(cfg, {}, params), params=params)
    dataset_key = resolved.key
    if not _intact(store, "dataset", dataset_key):
        return None
    plan = make_plan(cfg, store, dataset_key)
    if not all(_intact(store, job.stage, job.key) for job in plan.jobs):
        return None
    with Lease(store, run_id) as lease:  # gc keeps what the summary reads until it is written
        lease.protect([("dataset", dataset_key), *plan.artifacts()])
        outcomes = [execute(job, cfg, store) for job in [resolved, *plan.jobs]]
        return finish_run(cfg, store, plan, outcomes, started, run_id), len(outcomes)


def _intact(store: Store, stage: str, key: str) -> bool:
    try:
        return store.has(stage, key) and store.verify(stage, key) is None
    except DamagedArtifactError:
        return False
