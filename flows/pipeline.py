"""The pipeline flow: plan the stages a config needs, submit them, publish the run.

    dataset -> experts (one job per expert, when needed) -> teacher -> distill -> soft labels
      -> relabel (stored labels only) -> evaluation (subject x model x seed) -> export

The plan comes from the stage declarations (``condense.stages``); every job runs through one task,
so the thread pool, a Dask cluster or a work pool's workers take it unchanged. Run it with
``condense run`` or ``python -m condense_flows.pipeline``, or as a deployment (``prefect.yaml``).
"""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import fsspec
from prefect import flow
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from condense import report
from condense.configure import load_config
from condense.leases import Lease
from condense.stages import dataset_job, make_plan
from condense.store import open_store
from condense.summary import new_run_id
from condense_tasks.stages import finish_run, run_stage


@flow(name="condense-pipeline")
def pipeline(
    preset: str = "digits-mtt",
    overrides: list[str] | None = None,
    store: str | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Distil a dataset with the preset's method, evaluate it, export it; returns the run summary.

    ``store``: a directory or fsspec URL; default ``$CONDENSE_STORE`` or ``./data/store``.
    """
    started, run_id = time.time(), new_run_id()
    cfg = load_config(preset, overrides or [])
    opened = open_store(store)
    location = opened.location
    with Lease(opened, run_id) as lease:  # gc keeps what this run uses until it ends
        dataset = run_stage(dataset_job(), cfg, location, quiet)
        lease.protect([("dataset", dataset["key"])])
        plan = make_plan(cfg, opened, dataset["key"])
        lease.protect(plan.artifacts())
        futures: dict[str, Any] = {}
        for job in plan.jobs:
            waits = [futures[name] for name in plan.after[job.name]]
            futures[job.name] = run_stage.submit(job, cfg, location, quiet, wait_for=waits)
        outcomes = [dataset, *(future.result() for future in futures.values())]
        summary = finish_run(cfg, location, plan, outcomes, started, run_id)
    publish_artifacts(summary)
    return summary


def publish_artifacts(summary: dict[str, Any]) -> None:
    """The report, a link to the grid of images and the accuracy table, for Prefect's UI."""
    grid = summary["artifacts"]["grid_png"]
    link = grid if "://" in grid else Path(grid).as_uri()
    create_markdown_artifact(
        key="condense-report",
        markdown=report.markdown(summary).replace("(grid.png)", f"({link})"),
        description="condense run report",
    )
    create_link_artifact(
        key="condense-grid",
        link=link,
        link_text=f"synthetic images: {summary['dataset']} / {summary['method']} / ipc {summary['ipc']}",
        description="grid of the distilled images",
    )
    with fsspec.open(grid, "rb") as picture:  # the picture itself, for a UI that cannot reach the file
        encoded = base64.b64encode(picture.read()).decode()
    create_markdown_artifact(
        key="condense-grid-image",
        markdown=f"![the distilled images](data:image/png;base64,{encoded})",
        description="the distilled images, one row per class",
    )
    create_table_artifact(
        key="condense-accuracy",
        table=report.accuracy_rows(summary),
        description="test accuracy (%), mean ± std",
    )


if __name__ == "__main__":
    import sys

    print(report.text_table(pipeline(sys.argv[1] if len(sys.argv) > 1 else "digits-mtt", sys.argv[2:])))
