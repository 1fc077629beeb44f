"""Prefect tasks: one generic task runs any stage's job; one finishes the run.

Tasks take the store's location and a job (stage, key, params, input keys), and return small JSON
data, never tensors. Prefect persists nothing for them: the store is the cache (the executor looks
a job's key up before running it) and the truth, so no result record (a pickle, in Prefect's
format) is ever written or read back, and nobody who can write to a store can plant code in it.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import task_run

from condense import compare as comparing
from condense import devices
from condense import summary as run_summary
from condense.config import PipelineConfig
from condense.progress import Progress
from condense.stages import Job, Plan, execute, get_stage
from condense.store import open_store

devices.prepare_process()  # a worker's first task: before it runs any CUDA work


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


def _job_name() -> str:
    return task_run.parameters["job"].name


def job_progress(job: Job, cfg: PipelineConfig, quiet: bool) -> Progress:
    """A single-job stage (teacher, distill, ...) also reports to the UI; fanned-out jobs only log."""
    label = get_stage(job.stage).describe(cfg, job.params)
    if job.part is None and not job.params:
        return ArtifactProgress(label, f"condense-{job.stage.replace('_', '-')}-progress", quiet)
    return Progress(label, quiet=quiet)


@task(name="stage", task_run_name=_job_name, persist_result=False, cache_policy=NO_CACHE)
def run_stage(job: Job, cfg: PipelineConfig, store: str, quiet: bool = False) -> dict[str, Any]:
    """Run one job of the plan (or find its artifact in the store); returns its outcome."""
    return execute(job, cfg, open_store(store), job_progress(job, cfg, quiet))


@task(name="finish-run", persist_result=False, cache_policy=NO_CACHE)
def finish_run(
    cfg: PipelineConfig, store: str, plan: Plan, outcomes: list[dict[str, Any]], started: float, run_id: str
) -> dict[str, Any]:
    """Summarise, publish the version and write the run folder."""
    return run_summary.finish_run(cfg, open_store(store), plan, outcomes, started, run_id)


@task(name="finish-comparison", persist_result=False, cache_policy=NO_CACHE)
def finish_comparison(
    comparison: comparing.Comparison,
    store: str,
    outcomes: dict[str, comparing.Outcome],
    run_id: str,
    seconds: float,
) -> dict[str, Any]:
    """Score every cell, write and publish the leaderboard."""
    return comparing.finish(comparison, open_store(store), outcomes, run_id, seconds)
