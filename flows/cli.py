"""The ``condense`` command.

Prefect is configured to run quietly and offline before it is imported: no telemetry, warnings
only, and (with no ``PREFECT_API_URL``) the in-process ephemeral API, so no server is needed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

if TYPE_CHECKING:
    from prefect.server.api.server import SubprocessASGIServer

    from condense.store import Store

app = typer.Typer(
    help="Dataset distillation as a cached Prefect pipeline: experts -> distill -> soft labels -> evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

QUIET_PREFECT = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
}


def _configure_prefect(debug: bool) -> None:
    for name, value in QUIET_PREFECT.items():
        os.environ.setdefault(name, value)
    # Failures are reported by this command as one line; Prefect's own tracebacks only with --debug.
    level = "INFO" if debug else "CRITICAL"
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", level)
    os.environ.setdefault("PREFECT_INTERNAL_LOGGING_LEVEL", level)  # e.g. the events worker's exit notes
    # The ephemeral API server logs its shutdown (cancelled event flushes, sqlalchemy pool resets, via
    # the root logger) as errors: noise for a local run.
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", level)
    os.environ.setdefault("PREFECT_LOGGING_ROOT_LEVEL", level)


def _start_local_api_quietly(debug: bool = False) -> SubprocessASGIServer:
    """Start Prefect's ephemeral API server now, its output going to a log file in PREFECT_HOME.

    The server is a subprocess that inherits stderr, and at shutdown it sometimes logs cancelled
    database work as errors, after this command has said all it has to say. Prefect reuses this
    same server instance for the rest of the process.
    """
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_HOME

    if debug:
        server = SubprocessASGIServer()
        server.start()
        return server
    home = Path(PREFECT_HOME.value())
    home.mkdir(parents=True, exist_ok=True)
    saved = os.dup(2)
    with open(home / "condense-ephemeral-server.log", "ab") as log:
        os.dup2(log.fileno(), 2)
        try:
            server = SubprocessASGIServer()
            server.start()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    return server


StoreOption = Annotated[
    str | None,
    typer.Option(
        help="Artifact store: a directory, or an fsspec URL shared by all workers (s3://bucket/store, "
        "gs://..., file:///mnt/...). Default: $CONDENSE_STORE, else ./data/store."
    ),
]


def task_runner(runner: str = "threads", dask_address: str | None = None, workers: int = 2) -> Any:
    """Prefect's default thread pool (None), or a Dask cluster (prefect-dask): an existing scheduler
    at ``dask_address``, else a local cluster of ``workers`` single-threaded processes. Jobs pass only
    store keys, so any worker that sees the store can run any stage."""
    from condense.errors import CondenseError

    if runner == "threads" and not dask_address:
        return None
    if runner not in ("threads", "dask"):
        raise CondenseError(f"unknown runner {runner!r}: threads or dask")
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


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def run(
    preset: Annotated[
        str, typer.Argument(help="Preset name (see `condense presets`) or a YAML config path.")
    ],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config field: --set ipc=10 --set distill.iterations=300."),
    ] = None,
    store: StoreOption = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the summary as one JSON line at the end.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines on stderr.")] = False,
    debug: Annotated[bool, typer.Option(help="Show tracebacks and Prefect's logs.")] = False,
    runner: Annotated[
        str, typer.Option(help="Task runner for the fan-out: 'threads' (default) or 'dask' (prefect-dask).")
    ] = "threads",
    dask_address: Annotated[
        str | None, typer.Option(help="Scheduler of an existing Dask cluster (default: a local cluster).")
    ] = None,
) -> None:
    """Run the whole pipeline; a rerun reuses every stage whose inputs did not change."""
    _configure_prefect(debug)
    from condense.configure import load_config
    from condense.errors import CondenseError
    from condense.store import open_store

    overrides = list(set_ or [])
    try:
        load_config(preset, overrides)  # bad config fails here, before any Prefect or store work
        store_dir = open_store(store).location
    except CondenseError as err:
        _fail(str(err), 2)

    from condense_flows.pipeline import pipeline

    try:
        runs_on = task_runner(runner, dask_address)
        flow = pipeline if runs_on is None else pipeline.with_options(task_runner=runs_on)
        if os.environ.get("PREFECT_API_URL"):
            summary = flow(preset, overrides, store_dir, quiet)
        else:
            # A local ephemeral API dies with this process, so its run heartbeats (a fixed ~1 s at
            # exit) guard nothing.
            from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

            server = _start_local_api_quietly(debug)
            # Dask workers are other processes: without an API URL each would start its own
            # ephemeral server (and some outlive the run); point them at this one.
            os.environ["PREFECT_API_URL"] = server.api_url
            with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
                summary = flow(preset, overrides, store_dir, quiet)
    except CondenseError as err:
        if debug:
            raise
        _fail(str(err))
    except KeyboardInterrupt:
        _fail("interrupted; rerun the same command to resume from the last checkpoint", 130)
    except Exception as err:  # noqa: BLE001 - one line for the user, the traceback with --debug
        if debug:
            raise
        _fail(f"{type(err).__name__}: {err} (rerun with --debug for the traceback)")

    from condense.report import text_table

    typer.echo(text_table(summary))
    if as_json:
        typer.echo(json.dumps(summary, separators=(",", ":")))


@app.command()
def presets() -> None:
    """List the bundled presets."""
    from condense.configure import PRESET_DIR, preset_names

    for name in preset_names():
        first = (PRESET_DIR / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ")
        typer.echo(f"{name:<16} {first}")


@app.command()
def config(
    preset: Annotated[str, typer.Argument(help="Preset name or YAML path.")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a field, as for `run`.")] = None,
) -> None:
    """Print the fully resolved config (every field, defaults included) as YAML."""
    import yaml

    from condense.configure import load_config
    from condense.errors import CondenseError

    try:
        cfg = load_config(preset, list(set_ or []))
    except CondenseError as err:
        _fail(str(err), 2)
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def _store(store: str | None) -> Store:
    from condense.errors import CondenseError
    from condense.store import open_store

    try:
        return open_store(store)
    except CondenseError as err:
        _fail(str(err), 2)


@app.command("ls")
def list_sets(
    store: StoreOption = None,
    all_versions: Annotated[bool, typer.Option("--all", help="Every version, not only the latest.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """List the distilled sets published in a store (dataset, method, IPC, version, source, accuracy)."""
    from condense.versions import list_versions

    records = list_versions(_store(store), latest_only=not all_versions)
    if as_json:
        for record in records:
            typer.echo(json.dumps(record, separators=(",", ":")))
        return
    if not records:
        typer.echo("no distilled sets published in this store yet (run `condense run ...`)")
        return
    from condense.report import versions_table

    typer.echo(versions_table(records))


@app.command()
def gc(
    store: StoreOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would be removed.")] = False,
    partials: Annotated[
        bool, typer.Option("--partials", help="Also remove unfinished (resumable) work and temp files.")
    ] = False,
    grace_minutes: Annotated[
        float, typer.Option(help="Keep anything written this recently (a run may still be using it).")
    ] = 60.0,
) -> None:
    """Remove stage artifacts and run reports that no published version references."""
    from condense.errors import CondenseError
    from condense.report import human_bytes
    from condense.versions import gc as collect_garbage

    st = _store(store)
    try:
        found = collect_garbage(st, dry_run=dry_run, partials=partials, grace_seconds=grace_minutes * 60)
    except CondenseError as err:
        _fail(str(err))
    verb = "would remove" if dry_run else "removed"
    for path in found.removable:
        typer.echo(f"{verb} {path}")
    typer.echo(
        f"{verb} {len(found.removable)} entries ({human_bytes(found.bytes)}); kept {found.kept} artifacts"
    )
    if found.partial:
        typer.echo(f"left {len(found.partial)} unfinished entries (resumable work); --partials removes them")


@app.command()
def export(
    source: Annotated[
        str,
        typer.Argument(
            help="A run folder or export directory; with --dataset/--method/--ipc, a store (path or URL)."
        ),
    ],
    to: Annotated[Path, typer.Option("--to", help="Output directory.")],
    dataset: Annotated[str | None, typer.Option(help="Published set: dataset name.")] = None,
    method: Annotated[str | None, typer.Option(help="Published set: method.")] = None,
    ipc: Annotated[int | None, typer.Option(help="Published set: images per class.")] = None,
    version: Annotated[str, typer.Option(help="'latest' or a version number.")] = "latest",
) -> None:
    """Write a distilled set as an image folder: <to>/<class>/<n>.png and labels.json (soft labels)."""
    from condense.errors import CondenseError
    from condense.export import write_image_folder

    try:
        out = write_image_folder(
            source, to, dataset, method, ipc, version if version == "latest" else int(version)
        )
    except (CondenseError, ValueError) as err:
        _fail(str(err))
    typer.echo(f"wrote {out} ({len(list(out.glob('*/*.png')))} images, labels.json)")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
