"""The compare flow: every (method, IPC) cell through the pipeline's stages, one leaderboard.

Every cell is planned like ``condense run`` (``condense.compare``); their jobs are pooled, so what
cells share runs once, and every job goes through the pipeline's one task, so a job whose artifact is
in the store is a cache hit. A cell whose job fails (a guard refuses it, it diverges) is a failed row;
the others complete. Run it with ``condense compare`` or as a deployment (``prefect.yaml``).
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.exceptions import UnfinishedRun
from prefect.futures import PrefectFuture

from condense import compare as comparing
from condense.leases import Lease
from condense.stages import dataset_job
from condense.store import open_store
from condense.summary import new_run_id
from condense_tasks.stages import finish_comparison, run_stage


def settle(future: PrefectFuture) -> comparing.Outcome:
    """A job's outcome; the error that failed its cell; None when a job it waits for failed."""
    try:
        return future.result()
    except comparing.CELL_FAILURES as err:
        return err
    except UnfinishedRun:
        return None


@flow(name="condense-compare")
def compare(
    preset: str = "digits-compare",
    methods: list[str] | None = None,
    ipc: list[int] | None = None,
    models: list[str] | None = None,
    overrides: list[str] | None = None,
    store: str | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Distil and evaluate every (method, IPC) cell of a comparison; returns the leaderboard.

    ``methods``, ``ipc`` and ``models`` replace the comparison's lists; ``overrides`` (``key=value``)
    apply to every cell.
    """
    started, run_id = time.time(), new_run_id()
    comparison = comparing.load_comparison(preset, methods, ipc, models, overrides or [])
    opened = open_store(store)
    location = opened.location
    with Lease(opened, run_id) as lease:  # gc keeps what this comparison uses until it ends
        dataset = run_stage(dataset_job(), comparison.dataset_config, location, quiet)
        lease.protect([("dataset", dataset["key"])])
        comparing.plan_comparison(comparison, opened, dataset["key"])
        lease.protect(comparison.artifacts())
        futures: dict[str, PrefectFuture] = {}
        for name, job in comparison.jobs.items():
            waits = [futures[upstream] for upstream in comparison.after[name]]
            futures[name] = run_stage.submit(job, comparison.configs[name], location, quiet, wait_for=waits)
        outcomes = {name: settle(future) for name, future in futures.items()}
        board = finish_comparison(comparison, location, outcomes, run_id, time.time() - started)
    publish_artifacts(board)
    return board


def publish_artifacts(board: dict[str, Any]) -> None:
    """The leaderboard as a table and as markdown, for Prefect's UI."""
    table = comparing.rows(board["cells"])
    create_table_artifact(
        key="condense-leaderboard",
        table=[dict(zip(table[0], row, strict=True)) for row in table[1:]],
        description=f"{board['name']} on {board['dataset']}: leaderboard v{board['version']['number']}",
    )
    with open(board["files"]["markdown"], encoding="utf-8") as markdown:
        create_markdown_artifact(key="condense-leaderboard-report", markdown=markdown.read())


if __name__ == "__main__":
    import sys

    result = compare(sys.argv[1] if len(sys.argv) > 1 else "digits-compare", overrides=sys.argv[2:])
    print(comparing.text_table(comparing.rows(result["cells"])))
