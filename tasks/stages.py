"""Prefect tasks: one per pipeline stage, each a few lines around a ``condense.stages`` call.

Every task takes the store root and its stage key (computed by the flow from configs and input keys)
and returns the artifact's small metadata dict, never tensors. Prefect's cache key for a task is
the store key: the store is the truth, Prefect's cache is the index to it.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import TaskRunContext

from condense import prepare, stages
from condense.config import PipelineConfig
from condense.progress import Progress
from condense.store import open_store


def store_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """``<task>-<store key>[-<index>]``: the task name keeps two stages with equal keys from sharing a
    record, the index the experts that fill one stage."""
    index = parameters.get("index")
    return f"{context.task.name}-{parameters['key']}" + ("" if index is None else f"-{index}")


class ArtifactProgress(Progress):
    """Progress lines on stderr, and a Prefect progress artifact for the UI (at most every
    ``every`` seconds, and at the end) so a long distillation can be watched from the server."""

    def __init__(self, label: str, key: str, quiet: bool, every: float = 10.0):
        super().__init__(label, quiet=quiet)
        self.key, self.every = key, every
        self.artifact_id: Any = None
        self._published = -float("inf")

    def step(self, i: int, total: int, detail: str = "") -> None:
        super().step(i, total, detail)
        now = time.monotonic()
        if i != total and now - self._published < self.every:
            return
        self._published = now
        percent = round(100.0 * i / total, 1)
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(
                percent, key=self.key, description=f"{self.label}: {detail}".rstrip(": ")
            )
        else:
            update_progress_artifact(self.artifact_id, percent, description=f"{self.label}: {detail}")


@task(name="prepare-dataset", retries=0)
def prepare_dataset(cfg: PipelineConfig, store: str) -> str:
    """Decode the source into the store (cached by content fingerprint); returns the dataset key."""
    key, _ = prepare.prepare(cfg.dataset, open_store(store), cfg.ipc)
    return key


@task(name="record-expert", cache_key_fn=store_cache_key)
def record_expert(
    store: str, key: str, cfg: PipelineConfig, dataset_key: str, index: int, quiet: bool = False
) -> dict:
    return stages.record_expert(
        open_store(store), key, cfg, dataset_key, index, Progress("experts", quiet=quiet)
    )


@task(name="finish-experts", cache_key_fn=store_cache_key)
def finish_experts(store: str, key: str, records: list[dict]) -> dict:
    stages.finish_experts(open_store(store), key, records)
    return open_store(store).meta(stages.EXPERTS, key)


@task(name="teacher", cache_key_fn=store_cache_key)
def teacher(
    store: str, key: str, cfg: PipelineConfig, dataset_key: str, experts_key: str | None, quiet: bool = False
) -> dict:
    progress = ArtifactProgress("teacher", "condense-teacher-progress", quiet)
    return stages.run_teacher(open_store(store), key, cfg, dataset_key, experts_key, progress)


@task(name="distill", cache_key_fn=store_cache_key)
def distill(
    store: str,
    key: str,
    cfg: PipelineConfig,
    dataset_key: str,
    experts_key: str | None,
    teacher_key: str | None,
    quiet: bool = False,
) -> dict:
    progress = ArtifactProgress(cfg.method, "condense-distill-progress", quiet)
    return stages.run_distill(open_store(store), key, cfg, dataset_key, experts_key, teacher_key, progress)


@task(name="soft-labels", cache_key_fn=store_cache_key)
def soft_labels(
    store: str, key: str, cfg: PipelineConfig, dataset_key: str, distill_key: str, teacher_key: str
) -> dict:
    return stages.run_soft_labels(open_store(store), key, cfg, dataset_key, distill_key, teacher_key)


@task(name="relabel", cache_key_fn=store_cache_key)
def relabel(store: str, key: str, cfg: PipelineConfig, keys: dict[str, str], quiet: bool = False) -> dict:
    return stages.run_relabel(open_store(store), key, cfg, keys, Progress("relabel", quiet=quiet))


@task(name="evaluate", cache_key_fn=store_cache_key)
def evaluate(
    store: str,
    key: str,
    cfg: PipelineConfig,
    subject: str,
    arch: str,
    index: int,
    keys: dict[str, str],
    quiet: bool = False,
) -> dict:
    label = f"eval {subject} {arch} #{index}"
    return stages.run_evaluation(
        open_store(store), key, cfg, subject, arch, index, keys, Progress(label, quiet=quiet)
    )


@task(name="export", cache_key_fn=store_cache_key)
def export(store: str, key: str, cfg: PipelineConfig, keys: dict[str, str], accuracy: dict) -> dict:
    return stages.run_export(open_store(store), key, cfg, keys, accuracy)
