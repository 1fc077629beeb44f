"""The ``condense`` command.

Prefect is configured to run quietly and offline before it is imported: no telemetry, warnings
only, and (with no ``PREFECT_API_URL``) a local API server that dies with the command, so no server
is needed (:mod:`condense_flows.prefect_process`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from condense_flows.data_cli import data_app
from condense_flows.prefect_process import (
    configure_prefect,
    in_thread,
    start_local_api_quietly,
    stop_on_signals,
)

if TYPE_CHECKING:
    from prefect.server.api.server import SubprocessASGIServer

    from condense.store import Store

app = typer.Typer(
    help="Dataset distillation as a cached Prefect pipeline: experts -> distill -> soft labels -> evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

StoreOption = Annotated[
    str | None,
    typer.Option(
        metavar="DIR|URL",
        help="Artifact store: a directory, or an fsspec URL shared by all workers (s3://bucket/store, "
        "gs://..., file:///mnt/...). Default: $CONDENSE_STORE, else ./data/store.",
    ),
]


PresetArgument = Annotated[
    str,
    typer.Argument(
        metavar="PRESET|METHOD",
        help="A preset <dataset>-<method> (cifar10-mtt; see `condense presets`), a method with "
        "--dataset, or a YAML config path.",
    ),
]
DatasetOption = Annotated[
    str | None,
    typer.Option(
        metavar="DATASET",
        help="Run METHOD on this benchmark dataset (digits, cifar10, cifar100, tinyimagenet, "
        "imagenette, ...): the same as the preset <dataset>-<method>.",
    ),
]
IpcOption = Annotated[
    int | None, typer.Option(metavar="N", min=1, help="Images per class; picks the budget's row for N.")
]
BudgetOption = Annotated[
    str | None,
    typer.Option(
        metavar="cpu|paper",
        help="cpu (the default): sized for a laptop CPU; paper: the method's published "
        "hyperparameters for this dataset and IPC.",
    ),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="KEY=VALUE",
        help="Override a config field: --set distill.iterations=300 --set evaluate.seeds=5.",
    ),
]


def _target(
    preset: str, dataset: str | None, ipc: int | None, budget: str | None, set_: list[str] | None
) -> tuple[str, list[str]]:
    """``PRESET|METHOD --dataset D --ipc N --budget B --set ...`` as a preset name and overrides."""
    from condense.configure import run_source
    from condense.errors import CondenseError

    try:
        source, extra = run_source(preset, dataset, ipc, budget)
    except CondenseError as err:
        _fail(str(err), 2)
    return source, [*extra, *(set_ or [])]


_finished_from_store = False
"""Set when ``run`` finished from the store, with nothing started that needs an orderly exit."""


LOCAL_DASK_WORKERS = 2
"""Worker processes of the local Dask cluster ``--runner dask`` starts without an address."""


def dask_workers(dask_address: str | None) -> int:
    """How many workers the Dask cluster has that a run will use: the scheduler's count at
    ``dask_address`` (asked once, before the run), else the local cluster's."""
    if not dask_address:
        return LOCAL_DASK_WORKERS
    from condense.errors import CondenseError

    try:
        import distributed
    except ImportError:
        raise CondenseError("--runner dask needs prefect-dask: pip install -e '.[dask]'") from None
    try:
        with distributed.Client(dask_address, timeout=30) as client:
            return max(1, len(client.scheduler_info()["workers"]))
    except OSError as err:
        raise CondenseError(f"Dask scheduler {dask_address}: {err}") from None


def task_runner(
    runner: str = "threads", dask_address: str | None = None, workers: int = LOCAL_DASK_WORKERS
) -> Any:
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


@contextmanager
def one_line_errors(debug: bool = False) -> Iterator[None]:
    """What goes wrong becomes one line on stderr and exit 1 (the traceback only with --debug):
    a CondenseError as it is, anything else (a filesystem, a network, credentials) with its type."""
    from condense.errors import CondenseError

    try:
        yield
    except typer.Exit:
        raise
    except CondenseError as err:
        if debug:
            raise
        _fail(str(err))
    except Exception as err:  # noqa: BLE001 - one line for the user, the traceback with --debug
        if debug:
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        _fail(f"{type(err).__name__}: {first} (rerun with --debug for the traceback)")


@app.command()
def run(
    preset: PresetArgument,
    dataset: DatasetOption = None,
    ipc: IpcOption = None,
    budget: BudgetOption = None,
    set_: SetOption = None,
    store: StoreOption = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the summary as one JSON line at the end.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines on stderr.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and Prefect's logs.")] = False,
    runner: Annotated[
        str,
        typer.Option(
            metavar="threads|dask",
            help="Task runner for the fan-out: Prefect's threads, or Dask (prefect-dask).",
        ),
    ] = "threads",
    dask_address: Annotated[
        str | None,
        typer.Option(
            metavar="ADDRESS", help="Scheduler of an existing Dask cluster (default: a local cluster)."
        ),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(
            metavar="DEVICE", help="auto (a GPU when there is one), cpu, cuda or cuda:N: compute.device."
        ),
    ] = None,
    devices: Annotated[
        str | None,
        typer.Option(
            metavar="LIST",
            help="Spread experts and evaluation runs over these devices, one job per GPU at a time: "
            "0,1 or cuda:0,cuda:1 (compute.devices; default: every visible GPU).",
        ),
    ] = None,
    flow: Annotated[
        bool,
        typer.Option(
            "--flow",
            help="Start a Prefect flow run even when every job is cached (by default such a run "
            "is finished from the store without one: same summary, version and run folder).",
        ),
    ] = False,
) -> None:
    """Run the whole pipeline; a rerun reuses every stage whose inputs did not change.

    condense run mtt --dataset cifar100 --ipc 10 --budget paper"""
    configure_prefect(debug)
    from condense import devices as compute
    from condense.configure import load_config
    from condense.errors import CondenseError
    from condense.store import open_store

    preset, overrides = _target(preset, dataset, ipc, budget, set_)
    if device:
        overrides.append(f"compute.device={device}")
    if devices is not None:
        names = [f"cuda:{d}" if d.strip().isdigit() else d.strip() for d in devices.split(",")]
        if not all(names):
            _fail(f"--devices {devices!r}: name each device (0,1 or cuda:0,cuda:1), none empty", 2)
        overrides.append(f"compute.devices=[{','.join(names)}]")
    try:
        cfg = load_config(preset, overrides)  # bad config fails here, before any Prefect or store work
        compute.fan_out(cfg.compute.device, cfg.compute.devices)  # a device that is not here, too
        store_dir = open_store(store).location
        if runner not in ("threads", "dask"):  # bad input: exit 2 before any work, as other options
            raise CondenseError(f"unknown runner {runner!r}: threads or dask")
    except CondenseError as err:
        _fail(str(err), 2)

    from condense.report import text_table

    if not flow:  # nothing to compute: no Prefect import, server or flow run (seconds, not tens)
        from condense.summary import finish_cached

        with one_line_errors(debug):
            done = finish_cached(cfg, open_store(store_dir))
        if done is not None:
            global _finished_from_store
            _finished_from_store = True
            summary, jobs = done
            if not quiet:
                typer.echo(
                    f"all {jobs} jobs cached: nothing to run (no Prefect flow run; --flow starts one)",
                    err=True,
                )
            typer.echo(text_table(summary))
            if as_json:
                typer.echo(json.dumps(summary, separators=(",", ":")))
            return

    from condense_flows.pipeline import pipeline

    with one_line_errors(debug):
        runs_on = task_runner(runner, dask_address)
        if runs_on is not None and cfg.compute.shards == "auto":  # one shard per Dask worker
            overrides.append(f"compute.shards={dask_workers(dask_address)}")
    pipeline_flow = pipeline if runs_on is None else pipeline.with_options(task_runner=runs_on)
    summary = _run_flow(pipeline_flow, debug, preset, overrides, store_dir, quiet)

    typer.echo(text_table(summary))
    if as_json:
        typer.echo(json.dumps(summary, separators=(",", ":")))


def _run_flow(flow: Any, debug: bool, *args: Any) -> Any:
    """Run ``flow(*args)`` in a thread against ``PREFECT_API_URL``, else a local API server started
    here (quietly) that dies with this command; stop on signals; errors as one line. The progress
    bars stop before this returns, so what the command prints next is not drawn over."""
    from condense.progress import close_bars

    servers: list[SubprocessASGIServer] = []
    stop_on_signals(servers)
    try:
        with one_line_errors(debug):
            if os.environ.get("PREFECT_API_URL"):
                return in_thread(flow, *args)
            # A local ephemeral API dies with this process, so its run heartbeats (a fixed ~1 s
            # at exit) guard nothing.
            from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

            servers.append(start_local_api_quietly(debug))
            # Dask workers are other processes: without an API URL each would start its own
            # ephemeral server (and some outlive the run); point them at this one.
            os.environ["PREFECT_API_URL"] = servers[0].api_url
            with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
                return in_thread(flow, *args)
    except KeyboardInterrupt:
        _fail("interrupted; rerun the same command to resume from the last checkpoint", 130)
    finally:
        close_bars()


def _list_option(text: str | None, name: str, convert: Any = str) -> list[Any] | None:
    """``"a,b"`` -> ``["a", "b"]``; an empty list or a bad item is a one-line error (exit 2)."""
    if text is None:
        return None
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        _fail(f"--{name} is empty: give a comma-separated list", 2)
    try:
        return [convert(item) for item in items]
    except ValueError:
        _fail(f"--{name} expects a comma-separated list of {convert.__name__}s, got {text!r}", 2)


@app.command()
def compare(
    preset: Annotated[
        str,
        typer.Argument(
            metavar="COMPARISON",
            help="Comparison name (condense/recipes/compare/, e.g. digits-compare) or a YAML path.",
        ),
    ],
    methods: Annotated[
        str | None, typer.Option(metavar="LIST", help="Methods, comma-separated: mtt,dm,rded.")
    ] = None,
    ipc: Annotated[
        str | None, typer.Option(metavar="LIST", help="Images per class, comma-separated: 1,10.")
    ] = None,
    models: Annotated[
        str | None,
        typer.Option(metavar="LIST", help="Evaluation architectures, comma-separated: convnet,resnet18."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="KEY=VALUE",
            help="Override a field of every cell: --set evaluate.seeds=2, --set budget=paper.",
        ),
    ] = None,
    store: StoreOption = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the leaderboard as one JSON line at the end.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and Prefect's logs.")] = False,
) -> None:
    """Run every method at every IPC on one dataset and recipe per label regime; print a leaderboard
    with fair scores (random real, full data, DD-Ranking's LRS/ARS, calibration, cost)."""
    configure_prefect(debug)
    from condense import compare as comparing
    from condense.errors import CondenseError
    from condense.stages import dataset_job, execute
    from condense.store import open_store

    method_list = _list_option(methods, "methods")
    ipc_list = _list_option(ipc, "ipc", int)
    model_list = _list_option(models, "models")
    overrides = list(set_ or [])
    try:  # every bad input fails here, in one line, before any distillation or evaluation
        comparison = comparing.load_comparison(preset, method_list, ipc_list, model_list, overrides)
        opened = open_store(store)
        card = execute(dataset_job(), comparison.dataset_config, opened)["meta"]["card"]
        comparing.check_ipcs(comparison, card)
    except CondenseError as err:
        _fail(str(err), 2)

    from condense_flows.compare import compare as compare_flow

    board = _run_flow(
        compare_flow, debug, preset, method_list, ipc_list, model_list, overrides, opened.location, quiet
    )
    typer.echo(comparing.text_table(comparing.rows(board["cells"])))
    version = board["version"]
    state = "new" if version["new"] else f"unchanged since {version['created']}"
    typer.echo(f"\nleaderboard {board['dataset']}/{board['name']} v{version['number']} ({state})")
    for name, path in board["files"].items():
        typer.echo(f"{name}: {path}")
    for name, path in board["pictures"].items():
        typer.echo(f"{name}: {path}")
    if as_json:
        typer.echo(json.dumps(board, separators=(",", ":")))


@app.command()
def presets() -> None:
    """List the benchmark matrix: each method's paper table rows (dataset: IPCs) and where it does
    not apply. Every <dataset>-<method> pair runs at any IPC with --budget cpu."""
    from condense.configure import cards, recipes

    for name, card in cards().items():
        typer.echo(f"{name:<13} {card.title}")
    typer.echo("\na run is <dataset>-<method> (or METHOD --dataset D); --budget paper needs a row below\n")
    for name, recipe in recipes().items():
        rows = " ".join(f"{d}:{'/'.join(map(str, i))}" for d, i in recipe.paper_rows().items())
        typer.echo(f"{name:<6} {recipe.title}")
        typer.echo(f"       paper  {rows or '-'}")
        if recipe.not_for:
            typer.echo(f"       not    {', '.join(recipe.not_for)}")


@app.command()
def config(
    preset: PresetArgument,
    dataset: DatasetOption = None,
    ipc: IpcOption = None,
    budget: BudgetOption = None,
    set_: SetOption = None,
    sources: Annotated[
        bool,
        typer.Option(
            "--sources",
            help="List every setting as key, value and where it came from (dataset card, method, "
            "budget or paper table row, --set, or the schema's default).",
        ),
    ] = False,
) -> None:
    """Print the fully resolved config (every field, defaults included) as YAML."""
    import yaml

    from condense.configure import leaves, resolve, validated_dump
    from condense.errors import CondenseError

    source, overrides = _target(preset, dataset, ipc, budget, set_)
    try:
        resolution = resolve(source, overrides)
        dump = validated_dump(resolution)
    except CondenseError as err:
        _fail(str(err), 2)
    if not sources:
        typer.echo(yaml.safe_dump(dump, sort_keys=False))
        return
    for key, value in leaves(dump):
        typer.echo(f"{key} = {json.dumps(value)}  # {resolution.source_of(key)}")


@app.command()
def plan(
    preset: PresetArgument,
    dataset: DatasetOption = None,
    ipc: IpcOption = None,
    budget: BudgetOption = None,
    set_: SetOption = None,
    store: StoreOption = None,
    why: Annotated[
        bool, typer.Option("--why", help="Say why each stage that is not cached recomputes.")
    ] = False,
) -> None:
    """Print the jobs a run would do and which are cached, without running anything; with --why, what
    changed for each that recomputes (a module, a setting, an input), against the closest artifact of
    its stage in the store."""
    from condense.configure import load_config
    from condense.errors import CondenseError
    from condense.stages.why import explain

    source, overrides = _target(preset, dataset, ipc, budget, set_)
    try:
        cfg = load_config(source, overrides)
    except CondenseError as err:
        _fail(str(err), 2)
    st = _store(store)
    with one_line_errors():
        verdicts = explain(cfg, st)
    for verdict in verdicts:
        typer.echo(verdict.line(why))
    if len(verdicts) == 1 and not verdicts[0].cached:
        typer.echo("(no stored dataset of this content: the later stages are planned once it is prepared)")


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

    with one_line_errors():
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
        float,
        typer.Option(
            metavar="MINUTES", help="Keep anything written this recently (a run may still be using it)."
        ),
    ] = 60.0,
    keep_runs: Annotated[
        int,
        typer.Option(metavar="N", help="Run reports kept per published dataset/method/IPC, newest first."),
    ] = 10,
) -> None:
    """Remove stage artifacts and run reports that no published version references, all but the
    newest --keep-runs reports of each published set, and stale leases of killed runs."""
    from condense.garbage import gc as collect_garbage
    from condense.report import human_bytes

    st = _store(store)
    with one_line_errors():
        found = collect_garbage(st, dry_run, partials, grace_minutes * 60, keep_runs)
    verb = "would remove" if dry_run else "removed"
    for line in found.damaged:
        typer.echo(f"kept {line}")
    for path in found.removable:
        typer.echo(f"{verb} {path}")
    typer.echo(
        f"{verb} {len(found.removable)} entries ({human_bytes(found.bytes)}); kept {found.kept} artifacts"
    )
    if found.partial:
        typer.echo(f"left {len(found.partial)} unfinished entries (resumable work); --partials removes them")


@app.command()
def verify(
    store: StoreOption = None,
    move_aside: Annotated[
        bool,
        typer.Option(
            "--move-aside", help="Move damaged artifacts aside, so that the next run recomputes them."
        ),
    ] = False,
) -> None:
    """Check every artifact in a store against the sizes and sha256 recorded when it was committed."""
    from condense.garbage import verify as verify_store

    st = _store(store)
    with one_line_errors():
        checked, damaged = verify_store(st, move_aside)
    for line in damaged:
        typer.echo(line)
    typer.echo(f"checked {checked} artifacts: {len(damaged)} damaged")
    if damaged:
        raise typer.Exit(1)


@app.command()
def export(
    source: Annotated[
        str,
        typer.Argument(
            metavar="SOURCE",
            help="A run folder or export directory; with --dataset/--method/--ipc, a store (path or URL).",
        ),
    ],
    to: Annotated[Path, typer.Option("--to", metavar="DIR", help="Output directory.")],
    dataset: Annotated[str | None, typer.Option(metavar="NAME", help="Published set: dataset name.")] = None,
    method: Annotated[str | None, typer.Option(metavar="NAME", help="Published set: method.")] = None,
    ipc: Annotated[int | None, typer.Option(metavar="N", help="Published set: images per class.")] = None,
    version: Annotated[
        str, typer.Option(metavar="N|latest", help="A version number, or the latest.")
    ] = "latest",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a non-empty --to (it is swapped whole, never mixed).")
    ] = False,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            metavar="folder|hf",
            help="folder: <to>/<class>/<n>.png + labels.json; hf: a Hugging Face datasets folder"
            " (save_to_disk; columns image, label, soft_label); needs the hf extra.",
        ),
    ] = "folder",
) -> None:
    """Write a distilled set as an image folder: <to>/<class>/<n>.png and labels.json (soft labels);
    or, with --format hf, as a Hugging Face datasets folder with a train split: image (Image), label
    (ClassLabel named by the classes), soft_label (float32 list, when the set has soft labels).

    Publish an hf export with: python -c "import datasets;
    datasets.DatasetDict.load_from_disk('<to>').push_to_hub('<user>/<name>')" (after hf auth login).
    """
    from condense.convert import write_hf_dataset, write_image_folder

    if version != "latest" and not (version.isascii() and version.isdigit()):
        _fail(f"--version must be 'latest' or a number, not {version!r}", 2)
    if fmt not in ("folder", "hf"):
        _fail(f"--format must be 'folder' or 'hf', not {fmt!r}", 2)
    selected = version if version == "latest" else int(version)
    with one_line_errors():
        if fmt == "hf":
            out = write_hf_dataset(source, to, dataset, method, ipc, selected, overwrite)
        else:
            out = write_image_folder(source, to, dataset, method, ipc, selected, overwrite)
    if fmt == "hf":
        typer.echo(f"wrote {out} (Hugging Face datasets folder: datasets.load_from_disk({str(out)!r}))")
    else:
        typer.echo(f"wrote {out} ({len(list(out.glob('*/*.png')))} images, labels.json)")


app.add_typer(data_app, name="data")


def main() -> None:
    import os

    # cuBLAS reads its workspace setting at the process's first call: set before any work (see
    # condense.devices.prepare_process; importing torch here would slow every command down).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    try:
        app()
    except SystemExit as done:
        if done.code in (0, None) and _finished_from_store:
            # A run finished from the store started no server, thread or process: torch's teardown
            # (half a second of a three-second rerun) guards nothing. Output is flushed first.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        raise


if __name__ == "__main__":
    main()
