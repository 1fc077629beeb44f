"""The pipeline DAG: dataset -> experts (fan-out, when needed) -> teacher -> distill -> soft labels
-> relabel (stored labels only) -> evaluation (fan-out) -> export + report.

Composition only: every stage is a task in ``tasks.stages``; keys come from ``condense.stages``.
Run it in-process (``condense run`` or ``python -m flows.pipeline``) or as a deployment
(``prefect.yaml``).
"""

from __future__ import annotations

import shutil
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from condense import report, stages, versions
from condense.config import PipelineConfig, load_config
from condense.errors import CondenseError
from condense.evaluate import summarize
from condense.methods import get_method
from condense.store import DEFAULT_STORE, Store, open_store, write_json
from tasks import stages as t


class StageClock:
    """Wall time and cache status per summary stage (a stage is cached when its artifact existed)."""

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, Any]] = {}

    def start(self, name: str, key: str, cached: bool) -> float:
        self.stages[name] = {"cached": cached, "seconds": 0.0, "key": key}
        return time.perf_counter()

    def stop(self, name: str, started: float) -> None:
        self.stages[name]["seconds"] = round(time.perf_counter() - started, 3)

    def run(self, name: str, cached: bool, task: Any, **params: Any) -> Any:
        """Run a single-task stage, timed; ``params['key']`` is its store key."""
        begun = self.start(name, params["key"], cached)
        result = _run(task, cached, **params).result()
        self.stop(name, begun)
        return result


def _run(task: Any, cached: bool, **params: Any) -> Any:
    """Submit a stage; when its artifact is missing, bypass any stale Prefect cache record."""
    return (task if cached else task.with_options(refresh_cache=True)).submit(**params)


def _record_experts(
    cfg: PipelineConfig, st: Store, dataset_key: str, tasks: dict[str, Any], clock: StageClock, quiet: bool
) -> str:
    """Fan out one task per expert into the shared buffer, then seal it; returns the experts key."""
    experts_key = stages.experts_key(cfg, dataset_key)
    cached = st.has(stages.EXPERTS, experts_key)
    begun = clock.start("experts", experts_key, cached)
    stages.open_experts(st, experts_key, cfg, dataset_key)
    futures = [
        _run(
            tasks["record_expert"],
            cached,
            store=st.location,
            key=experts_key,
            cfg=cfg,
            dataset_key=dataset_key,
            index=i,
            quiet=quiet,
        )
        for i in range(cfg.experts.num_experts)
    ]
    _run(
        tasks["finish_experts"],
        cached,
        store=st.location,
        key=experts_key,
        records=[f.result() for f in futures],
    ).result()
    clock.stop("experts", begun)
    return experts_key


def task_runner(runner: str = "threads", dask_address: str | None = None, workers: int = 2) -> Any:
    """Prefect's default thread pool, or a Dask cluster (prefect-dask): an existing scheduler at
    ``dask_address``, else a local cluster of ``workers`` single-threaded processes. Tasks pass only
    store keys, so any worker that sees the store can run any stage."""
    if runner == "threads":
        return None
    if runner != "dask":
        raise ValueError(f"unknown runner {runner!r}: threads or dask")
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise CondenseError("--runner dask needs prefect-dask: pip install -e '.[dask]'") from None
    if dask_address:
        return DaskTaskRunner(address=dask_address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "dashboard_address": None},
    )


def _link(location: str) -> str:
    """A clickable form of a store location: file:// for a local path, the URL itself otherwise."""
    return location if "://" in location else Path(location).as_uri()


def _label_summary(cfg: PipelineConfig, relabel_meta: dict[str, Any] | None) -> dict[str, Any]:
    """Where the evaluation's labels came from, and what stored labels cost next to the images."""
    if cfg.evaluate.recipe == "mtt":
        return {"kind": cfg.evaluate.labels}
    summary: dict[str, Any] = {"kind": f"kd-{cfg.relabel.mode}", "top_k": cfg.relabel.top_k}
    if relabel_meta is not None:
        summary.update(
            {k: relabel_meta[k] for k in ("epochs", "label_bytes", "label_disk_bytes", "image_bytes")}
        )
    return summary


@flow(name="condense-pipeline")
def pipeline(
    preset: str = "digits-mtt",
    overrides: list[str] | None = None,
    store: str = DEFAULT_STORE,
    quiet: bool = False,
) -> dict[str, Any]:
    """Distil a dataset with the preset's method, evaluate it, export it; returns the run summary."""
    started = time.perf_counter()
    cfg: PipelineConfig = load_config(preset, overrides or [])
    st = open_store(store)
    results = st.root / "_prefect_results"
    tasks = {
        name: getattr(t, name).with_options(result_storage=results)
        for name in (
            "record_expert",
            "finish_experts",
            "teacher",
            "distill",
            "soft_labels",
            "relabel",
            "evaluate",
            "export",
        )
    }
    clock = StageClock()

    dataset_key = t.prepare_dataset(cfg, st.location)
    keys = {"dataset": dataset_key}

    method = get_method(cfg.method)
    experts_key = None
    if stages.needs_experts(cfg):
        experts_key = _record_experts(cfg, st, dataset_key, tasks, clock, quiet)
        keys["experts"] = experts_key

    teacher_key = stages.teacher_key(cfg, dataset_key, experts_key)
    keys["teacher"] = teacher_key
    teacher_meta = clock.run(
        "teacher",
        st.has(stages.TEACHER, teacher_key),
        tasks["teacher"],
        store=st.location,
        key=teacher_key,
        cfg=cfg,
        dataset_key=dataset_key,
        experts_key=experts_key,
        quiet=quiet,
    )

    trajectories = experts_key if method.needs_experts else None
    observer = teacher_key if method.needs_teacher else None
    distill_key = stages.distill_key(cfg, dataset_key, trajectories, observer)
    keys["distill"] = distill_key
    clock.run(
        "distill",
        st.has(stages.DISTILL, distill_key),
        tasks["distill"],
        store=st.location,
        key=distill_key,
        cfg=cfg,
        dataset_key=dataset_key,
        experts_key=trajectories,
        teacher_key=observer,
        quiet=quiet,
    )

    labels_key = stages.soft_labels_key(cfg, distill_key, teacher_key)
    keys["soft_labels"] = labels_key
    clock.run(
        "soft_labels",
        st.has(stages.SOFT_LABELS, labels_key),
        tasks["soft_labels"],
        store=st.location,
        key=labels_key,
        cfg=cfg,
        dataset_key=dataset_key,
        distill_key=distill_key,
        teacher_key=teacher_key,
    )

    relabel_meta = None
    if stages.uses_stored_labels(cfg):
        keys["relabel"] = stages.relabel_key(cfg, distill_key, teacher_key)
        relabel_meta = clock.run(
            "relabel",
            st.has(stages.RELABEL, keys["relabel"]),
            tasks["relabel"],
            store=st.location,
            key=keys["relabel"],
            cfg=cfg,
            keys=keys,
            quiet=quiet,
        )

    subjects = ["distilled"]
    subjects += ["random_real"] if cfg.evaluate.random_real else []
    subjects += ["full_data"] if cfg.evaluate.full_data else []
    runs = []
    for subject in subjects:
        inputs = stages.evaluation_inputs(cfg, subject, keys)
        for arch in cfg.evaluate.models:
            for index in range(cfg.evaluate.seeds):
                key = stages.evaluation_key(cfg, subject, arch, index, inputs)
                runs.append((subject, arch, key, st.has(stages.EVALUATE, key), index))
    eval_keys = [r[2] for r in runs]
    evaluate_key = stages.evaluation_set_key(eval_keys)
    begun = clock.start("evaluate", evaluate_key, all(r[3] for r in runs))
    futures = [
        (
            subject,
            arch,
            _run(
                tasks["evaluate"],
                hit,
                store=st.location,
                key=key,
                cfg=cfg,
                subject=subject,
                arch=arch,
                index=index,
                keys=keys,
                quiet=quiet,
            ),
        )
        for subject, arch, key, hit, index in runs
    ]
    accuracies: dict[str, dict[str, list[float]]] = {}
    for subject, arch, future in futures:
        accuracies.setdefault(arch, {}).setdefault(subject, []).append(future.result()["accuracy"])
    clock.stop("evaluate", begun)

    table = {
        arch: {subject: summarize(accs) for subject, accs in by_subject.items()}
        for arch, by_subject in accuracies.items()
    }
    export_key = stages.export_key(distill_key, labels_key, eval_keys)
    export_meta = _run(
        tasks["export"],
        st.has(stages.EXPORT, export_key),
        store=st.location,
        key=export_key,
        cfg=cfg,
        keys=keys,
        accuracy=table,
    ).result()
    export_dir = st.path(stages.EXPORT, export_key)
    keys["export"] = export_key

    run_id = f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    run_dir = st.root / "runs" / run_id
    run_url = f"{st.location}/runs/{run_id}"
    run_dir.mkdir(parents=True)
    shutil.copy(export_dir / "grid.png", run_dir / "grid.png")
    first = cfg.evaluate.models[0]
    summary = {
        "run_id": run_id,
        "config_name": cfg.name,
        "dataset": st.meta("dataset", dataset_key)["card"]["name"],
        "method": cfg.method,
        "ipc": cfg.ipc,
        "store": st.location,
        "seconds": round(time.perf_counter() - started, 2),
        "stages": clock.stages,
        "accuracy": {arch: table[arch]["distilled"] for arch in cfg.evaluate.models},
        "baselines": {s: {k: table[first][s][k] for k in ("mean", "std")} for s in subjects[1:]},
        "baselines_by_arch": {
            arch: {s: table[arch][s] for s in subjects[1:]} for arch in cfg.evaluate.models
        },
        "evaluation_runs": cfg.evaluate.seeds,
        "learned_lr": st.meta(stages.DISTILL, distill_key)["lr"],
        "evaluation_recipe": cfg.evaluate.recipe,
        "teacher": {k: teacher_meta[k] for k in ("source", "arch", "train_accuracy", "test_accuracy")},
        "labels": _label_summary(cfg, relabel_meta),
        "distill_stats": st.meta(stages.DISTILL, distill_key).get("stats", {}),
        "artifacts": {
            "synthetic": f"{st.url(stages.DISTILL, distill_key)}/synthetic.zarr",
            "soft_labels": f"{st.url(stages.SOFT_LABELS, labels_key)}/labels.zarr",
            "shards": [f"{st.url(stages.EXPORT, export_key)}/{name}" for name in export_meta["shards"]],
            "manifest": f"{st.url(stages.EXPORT, export_key)}/manifest.json",
            "grid_png": f"{run_url}/grid.png",
            "run_dir": run_url,
        },
        "keys": keys,
    }
    version, new = versions.publish(
        st,
        {
            "dataset": summary["dataset"],
            "method": cfg.method,
            "ipc": cfg.ipc,
            "config_name": cfg.name,
            "source_fingerprint": st.meta("dataset", dataset_key)["card"]["fingerprint"],
            "accuracy": summary["accuracy"],
            "baselines": summary["baselines"],
            "run_id": run_id,
            "keys": keys,
            "evaluations": eval_keys,
        },
    )
    summary["version"] = {"number": version["version"], "new": new, "created": version["created"]}
    write_json(run_dir / "summary.json", summary)
    (run_dir / "report.md").write_text(report.markdown(summary))
    st.share(f"runs/{run_id}")
    grid_link = _link(f"{run_url}/grid.png")
    create_markdown_artifact(
        key="condense-report",
        markdown=report.markdown(summary).replace("(grid.png)", f"({grid_link})"),
        description="condense run report",
    )
    create_link_artifact(
        key="condense-grid",
        link=grid_link,
        link_text=f"synthetic images: {summary['dataset']} / {cfg.method} / ipc {cfg.ipc}",
        description="grid of the distilled images",
    )
    create_table_artifact(
        key="condense-accuracy",
        table=report.accuracy_rows(summary),
        description="test accuracy (%), mean ± std",
    )
    return summary


if __name__ == "__main__":
    import sys

    print(report.text_table(pipeline(sys.argv[1] if len(sys.argv) > 1 else "digits-mtt", sys.argv[2:])))
