"""A pipeline stage is a declaration; one executor runs any of them.

A :class:`Stage` says what it reads (other stages, by name), which slice of the config shapes its
result, and how to ``run``. Its store key hashes the stage name, that config slice, its code version
and the keys of what it reads, where the code version is derived from the stage's module by an import
walk (:mod:`condense.codeversion`): no list of dependencies is kept by hand, so none can be
forgotten. :func:`execute` does everything else once, for every stage and every store: cache
lookup, the work directory (kept across crashes for resumable stages), the parts of a fanned-out
artifact, timing and the commit.

A stage module declares ``STAGE = Stage(...)``; :func:`all_stages` finds every module of this package
that does. The plan (:mod:`condense.stages.plan`) orders them by what they read.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pkgutil
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from condense import devices
from condense.codeversion import code_version, hashed_modules
from condense.config import PipelineConfig
from condense.errors import CondenseError, DamagedArtifactError
from condense.prepare import RealData, load_once
from condense.progress import SILENT, Progress
from condense.store import Store, read_json, stable_hash, write_json
from condense.store.names import KEY_CHARS

INFRASTRUCTURE = "the executor (lookup, work folders, resume, commit); what it runs is followed and hashed"

PREIMAGE = "key_preimage"
"""The meta field recording what an artifact's key was made of (:meth:`Stage.preimage`)."""
CHECKPOINT = "checkpoint.pt"
PART_RECORD = "part-{}.json"
PART_CHECKPOINT = "checkpoint-{}.pt"

Params = Mapping[str, Any]
InputKeys = Mapping[str, "str | list[str]"]
"""Keys of what a job reads, by stage name: one key, or every key of a fanned-out stage."""


def input_key(value: str | Sequence[str]) -> str:
    """One string per input: a key, or the sorted keys of a fanned-out stage (e.g. all evaluations)."""
    return value if isinstance(value, str) else ",".join(sorted(value))


def stage_key(stage: str, config: Any, code: str, inputs: Mapping[str, str]) -> str:
    return stable_hash({"stage": stage, "config": config, "code": code, "inputs": dict(inputs)})[:KEY_CHARS]


def _reads_nothing(cfg: PipelineConfig, params: Params) -> tuple[str, ...]:
    return ()


def _no_extra_code(cfg: PipelineConfig) -> tuple[str, ...]:
    return ()


@dataclass(frozen=True)
class Stage:
    """A pipeline stage: name, inputs, config slice, code, run."""

    name: str
    """Its folder in the store, and how other stages name it in ``reads``."""
    run: Callable[[Context], dict[str, Any]]
    """Compute the artifact into ``ctx.work``; returns its small JSON metadata."""
    config: Callable[[PipelineConfig, Params], Any]
    """The slice of the config that shapes the result (goes into the key)."""
    reads: Callable[[PipelineConfig, Params], Sequence[str]] = _reads_nothing
    """The stages whose artifacts it reads (their keys go into its key)."""
    code: Callable[[PipelineConfig], Sequence[str]] = _no_extra_code
    """Modules it runs beyond its own module's imports (the method a registry picks)."""
    instances: Callable[[PipelineConfig], list[dict[str, Any]]] | None = None
    """Fan-out into separate artifacts (e.g. evaluation per subject x model x seed); None: one."""
    earlier: Callable[[PipelineConfig, Params], Sequence[int]] | None = None
    """A chain: the positions of the stage's own earlier instances an instance reads (PDD's stage k
    reads stage k-1's set and the experts regenerated from it). Their keys go into its key, under the
    stage's own name, in this order."""
    parts: Callable[[PipelineConfig, Params], int] | None = None
    """Fan-out of one artifact into parts computed by separate jobs (e.g. one expert each)."""
    run_part: Callable[[Context, int], dict[str, Any]] | None = None
    """Compute part ``i`` into the shared work directory; returns its record (``ctx.parts`` later)."""
    part_label: Callable[[PipelineConfig, int], str] = lambda cfg, i: f"{i:04d}"
    """Names part ``i``'s record and checkpoint in the work folder: parts of one artifact cut another
    way (a shard count changed between a kill and the rerun) must not pass for each other."""
    resolve: Callable[[PipelineConfig], dict[str, Any]] | None = None
    """Params only its own job can compute (the dataset's content fingerprint), so its key is known
    once that job ran, not at planning time."""
    resumable: bool = False
    """Work in ``<stage>/.partial/<key>/``, kept across crashes (checkpoints, finished parts)."""
    label: Callable[[PipelineConfig, Params], str] | None = None
    """How progress lines name a job of this stage (default: the stage name)."""

    @property
    def module(self) -> str:
        return self.run.__module__

    def code_version(self, cfg: PipelineConfig) -> str:
        return code_version(self.module, *self.code(cfg))

    def inputs(self, cfg: PipelineConfig, params: Params) -> tuple[str, ...]:
        """The stages whose keys go into an instance's key: what it reads, and itself when it is a
        link of a chain that reads earlier links."""
        chained = self.earlier is not None and bool(self.earlier(cfg, params))
        return (*self.reads(cfg, params), *((self.name,) if chained else ()))

    def part_count(self, cfg: PipelineConfig, params: Params) -> int:
        """How many part jobs compute an instance's artifact (0: its own job computes it whole)."""
        return self.parts(cfg, params) if self.parts is not None else 0

    def key(self, cfg: PipelineConfig, keys: InputKeys, params: Params) -> str:
        inputs = {name: input_key(keys[name]) for name in self.inputs(cfg, params)}
        return stage_key(self.name, self.config(cfg, params), self.code_version(cfg), inputs)

    def preimage(self, cfg: PipelineConfig, keys: InputKeys, params: Params) -> dict[str, Any]:
        """What the key is made of, readably: the config slice, each hashed module's digest (the code
        version hashes exactly these) and the input keys. Recorded in the artifact's meta, so that
        ``condense plan --why`` can say what changed."""
        return {
            "config": self.config(cfg, params),
            "code": hashed_modules([self.module, *self.code(cfg)]),
            "inputs": {name: input_key(keys[name]) for name in self.inputs(cfg, params)},
        }

    def describe(self, cfg: PipelineConfig, params: Params) -> str:
        return self.label(cfg, params) if self.label else self.name


_stages: dict[str, Stage] = {}
_lock = threading.Lock()


def all_stages() -> dict[str, Stage]:
    """Every stage declared in this package (a module's ``STAGE``), found once per process."""
    with _lock:
        if not _stages:
            package = __name__.rpartition(".")[0]
            for info in pkgutil.iter_modules([str(Path(__file__).parent)], f"{package}."):
                stage = getattr(importlib.import_module(info.name), "STAGE", None)
                if isinstance(stage, Stage):
                    _stages[stage.name] = stage
    return dict(_stages)


def get_stage(name: str) -> Stage:
    stages = all_stages()
    if name not in stages:
        raise CondenseError(f"unknown stage {name!r}; stages: {', '.join(sorted(stages))}")
    return stages[name]


@dataclass(frozen=True)
class Job:
    """One unit of work of a plan: an instance of a stage (or one part of it), with its store key."""

    stage: str
    key: str
    params: dict[str, Any] = field(default_factory=dict)
    keys: dict[str, str | list[str]] = field(default_factory=dict)
    """Keys of the artifacts it reads."""
    part: int | None = None
    device: str | None = None
    """Where it runs, when the plan spreads a stage's jobs over devices; None: ``compute.device``."""

    @property
    def name(self) -> str:
        """Unique within a plan: stage, part or params, key."""
        detail = "" if self.part is None else f"[{self.part}]"
        for value in self.params.values():
            if isinstance(value, list):
                detail += "-" + "+".join(map(str, value))
            elif not isinstance(value, dict):
                detail += f"-{value}"
        return f"{self.stage}{detail}-{self.key}"


@dataclass
class Stopwatch:
    """The seconds a job has computed: this attempt's, plus those of the attempts it resumes from
    (their checkpoint carries them), so that a resumed stage records its whole cost, not its last
    attempt's. Neither the time between attempts nor a killed attempt's work after its last checkpoint
    (done again by the next) is counted."""

    attempt: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: float = field(default_factory=time.perf_counter)
    carried: float = 0.0
    """Seconds of earlier attempts, read from the checkpoint this attempt resumed from."""

    def total(self) -> float:
        return self.carried + time.perf_counter() - self.started


STOPWATCH = "_stopwatch"
"""The checkpoint entry that carries a job's seconds across attempts (never seen by the stage)."""


class TorchCheckpoints:
    """Resumable state as one file written atomically (temporary name, then rename); ``on_save``
    runs after each save (a remote store shares the checkpoint with other machines there); with a
    ``stopwatch``, each save records the job's seconds so far and a load by a later attempt adds them.

    Loaded with ``weights_only=True``: tensors and plain containers, never code. A checkpoint that
    does not load (damaged, or not one of ours) is moved aside and the work starts over."""

    def __init__(
        self,
        path: Path,
        on_save: Callable[[], None] = lambda: None,
        progress: Progress = SILENT,
        stopwatch: Stopwatch | None = None,
    ):
        self.path = path
        self.on_save = on_save
        self.progress = progress
        self.stopwatch = stopwatch

    def load(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is only lost work
            aside = self.path.with_name(f"{self.path.name}.unreadable-{uuid.uuid4().hex[:8]}")
            os.replace(self.path, aside)
            reason = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
            self.progress.note(
                f"checkpoint {self.path} does not load ({reason}); moved to {aside.name}, starting over"
            )
            return None
        watch = state.pop(STOPWATCH, None) if isinstance(state, dict) else None
        # A checkpoint this attempt wrote itself holds this attempt's seconds already.
        if self.stopwatch is not None and watch is not None and watch["attempt"] != self.stopwatch.attempt:
            self.stopwatch.carried = float(watch["seconds"])
        return state

    def save(self, state: dict[str, Any]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.tmp")
        if self.stopwatch is not None:
            watch = {"attempt": self.stopwatch.attempt, "seconds": self.stopwatch.total()}
            state = {**state, STOPWATCH: watch}
        torch.save(state, tmp)
        os.replace(tmp, self.path)
        self.on_save()


@dataclass
class Context:
    """What a stage's ``run`` gets: its config, store, key, inputs' keys, params and work folder."""

    stage: str
    cfg: PipelineConfig
    store: Store
    key: str
    keys: InputKeys
    params: Params
    work: Path
    progress: Progress = SILENT
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    parts: list[dict[str, Any]] = field(default_factory=list)
    """The records of every part (in a stage with parts, when ``run`` seals them)."""
    part: str | None = None
    """The label of the part this job computes (``Stage.part_label``); None for a whole job."""
    stopwatch: Stopwatch = field(default_factory=Stopwatch)
    """This job's seconds, carried across the attempts that resume it."""
    _data: RealData | None = None

    def data(self) -> RealData:
        """The prepared real data on the job's device: read and prepared there once per process."""
        if self._data is None:
            self._data = load_once(self.store, str(self.keys["dataset"]), self.cfg.dataset, self.device)
        return self._data

    @property
    def compile_step(self) -> bool:
        """Whether training steps go through ``torch.compile`` on this job's device."""
        return devices.compile_wanted(self.cfg.compute.compile, self.device)

    def meta(self, stage: str) -> dict[str, Any]:
        """The metadata of the input artifact of ``stage``."""
        return self.store.meta(stage, str(self.keys[stage]))

    def share(self, *names: str) -> None:
        """Make files or folders of a resumable stage's work folder visible to other machines."""
        self.store.push(self.stage, self.key, *names)

    def pull(self, *names: str) -> None:
        """Fetch what other machines shared of this artifact's work folder."""
        self.store.pull(self.stage, self.key, *names)

    def checkpoints(self) -> TorchCheckpoints:
        """This job's checkpoint file (a part's own), shared with other machines after every save."""
        name = CHECKPOINT if self.part is None else PART_CHECKPOINT.format(self.part)
        return TorchCheckpoints(self.work / name, lambda: self.share(name), self.progress, self.stopwatch)


def _check_key(stage: Stage, job: Job, cfg: PipelineConfig) -> None:
    """A worker whose code or config differs from the planner's must not write under the plan's key."""
    key = stage.key(cfg, job.keys, job.params)
    if key != job.key:
        raise CondenseError(
            f"stage {job.stage}: this process computes key {key}, the plan says {job.key}: the worker runs"
            " other code than the process that planned the run (update it and rerun)"
        )


def _run_part(stage: Stage, ctx: Context, index: int) -> tuple[dict[str, Any], bool]:
    """(the part's record, whether it was found done: on this machine or shared by another)."""
    ctx.part = stage.part_label(ctx.cfg, index)
    record_name = PART_RECORD.format(ctx.part)
    ctx.pull(record_name, PART_CHECKPOINT.format(ctx.part))
    if (ctx.work / record_name).exists():
        return read_json(ctx.work / record_name), True
    assert stage.run_part is not None
    record = {**stage.run_part(ctx, index), "seconds": round(ctx.stopwatch.total(), 3)}
    write_json(ctx.work / record_name, record)
    ctx.share(record_name)  # after the part's own files: the record vouches for them
    return record, False


def _seal(stage: Stage, ctx: Context) -> dict[str, Any]:
    """Run the stage (gathering its parts first) and commit what it wrote."""
    count = stage.part_count(ctx.cfg, ctx.params)
    if count:
        ctx.pull()
        records = [ctx.work / PART_RECORD.format(stage.part_label(ctx.cfg, i)) for i in range(count)]
        missing = [i for i, record in enumerate(records) if not record.exists()]
        if missing:
            raise CondenseError(f"stage {stage.name}: parts {missing} of {ctx.key} were not computed")
        ctx.parts = [read_json(record) for record in records]
    elif stage.resumable:
        ctx.pull(CHECKPOINT)
    meta = stage.run(ctx)
    if count:
        meta = {**meta, "parts": ctx.parts}
    meta["seconds"] = round(ctx.stopwatch.total(), 3)
    meta[PREIMAGE] = stage.preimage(ctx.cfg, ctx.keys, ctx.params)
    scratch = ["checkpoint*.pt", "part-*.json", f"{CHECKPOINT}.*", "checkpoint-*.pt.*"]
    for path in [found for pattern in scratch for found in ctx.work.glob(pattern)]:
        path.unlink(missing_ok=True)
    ctx.store.commit(stage.name, ctx.key, ctx.work, meta)
    return ctx.store.meta(stage.name, ctx.key)


def _context(
    stage: Stage,
    job: Job,
    cfg: PipelineConfig,
    store: Store,
    progress: Progress,
    work: Path,
    device: torch.device,
) -> Context:
    return Context(stage.name, cfg, store, job.key, job.keys, job.params, work, progress, device)


def _intact(store: Store, stage: str, key: str, progress: Progress) -> bool:
    """Whether ``(stage, key)`` is committed with its meta and file sizes as recorded; a damaged one is
    moved aside, so that it is computed again (its contents are hashed when a job reads it)."""
    if not store.has(stage, key):
        return False
    try:
        store.verify(stage, key)
    except DamagedArtifactError:
        damaged = store.set_aside_if_damaged(stage, key)
        if damaged is None:  # replaced by another job since the first look
            return True
        moved = f"; moved aside to {damaged.moved_to}" if damaged.moved_to else ""
        progress.note(f"artifact {stage}/{key} is damaged: {damaged.problem}{moved}, recomputing it")
        return False
    return True


def execute(job: Job, cfg: PipelineConfig, store: Store, progress: Progress = SILENT) -> dict[str, Any]:
    """Run ``job`` unless its artifact exists; returns what happened, as JSON-able data:
    ``{"job", "stage", "key", "params", "part", "cached", "started", "seconds", "compute_seconds",
    "meta"}`` (``meta`` is the part's record for a part job; ``cached``: nothing had to be computed;
    ``seconds`` from start to end, ``compute_seconds`` only the computing, after any wait for the
    device)."""
    stage = get_stage(job.stage)
    if stage.resolve is not None and not job.key:
        params = {**job.params, **stage.resolve(cfg)}
        job = replace(job, params=params, key=stage.key(cfg, job.keys, params))
    _check_key(stage, job, cfg)
    started = time.time()
    device = devices.resolve(job.device or cfg.compute.device)  # here, on the machine that runs it
    meta: dict[str, Any] | None = None  # set when this job computed (or found its part's record)
    memory: dict[str, Any] = {}
    cached = _intact(store, stage.name, job.key, progress)
    compute_seconds = 0.0  # inside the job, once its device turn came: never the wait for it
    if not cached:
        with (
            devices.exclusive(device, cfg.compute.cpu_jobs),
            devices.configured(device, cfg.compute.deterministic),
            devices.measured(device, stage.name, _lower_memory(stage.name, cfg)) as memory,
        ):
            turn = time.time()
            meta, cached = _compute(stage, job, cfg, store, progress, device)
            compute_seconds = time.time() - turn
    if meta is None:  # committed, by an earlier run or by another one while this job waited
        meta = store.meta(stage.name, job.key)
        if job.part is not None:
            meta = meta["parts"][job.part]
    return {
        "job": job.name,
        "stage": job.stage,
        "key": job.key,
        "params": job.params,
        "part": job.part,
        "cached": cached,
        "started": started,
        "seconds": round(time.time() - started, 3),
        "compute_seconds": round(compute_seconds, 3),
        "meta": meta,
        "device": devices.describe(device),
        **memory,
        **_nondeterminism(device, cfg),
    }


def _lower_memory(stage: str, cfg: PipelineConfig) -> str:
    """What to change when ``stage`` runs out of device memory."""
    if stage == "distill" and getattr(cfg.distill, "memory", None) == "unrolled":
        return f"{devices.LOWER_MEMORY}; or set distill.memory=constant (memory flat in syn_steps)"
    return devices.LOWER_MEMORY


def _nondeterminism(device: torch.device, cfg: PipelineConfig) -> dict[str, list[str]]:
    """In deterministic mode on CUDA: the kernels without a deterministic version this process ran."""
    if device.type != "cuda" or not cfg.compute.deterministic:
        return {}
    return {"nondeterministic_kernels": devices.nondeterministic_kernels()}


def _compute(
    stage: Stage, job: Job, cfg: PipelineConfig, store: Store, progress: Progress, device: torch.device
) -> tuple[dict[str, Any] | None, bool]:
    """(meta, cached) of a job whose artifact was not there: computed here, or found done by another
    run (resumable artifacts are worked on by one run at a time: the second waits, then finds it)."""
    if not (stage.resumable or stage.parts is not None):  # (a stage with parts shares one work folder)
        with store.writing(stage.name, job.key) as tmp:
            return _seal(stage, _context(stage, job, cfg, store, progress, tmp, device)), False
    with contextlib.ExitStack() as held:
        if job.part is not None:
            held.enter_context(store.lock(stage.name, f"{job.key}-{job.part}"))
        else:
            held.enter_context(store.lock(stage.name, job.key))
            # Sealing clears the part records and moves the work folder: no part job of another run
            # may be looking at it meanwhile (each waits, then finds the artifact committed).
            for part in range(stage.part_count(cfg, job.params)):
                held.enter_context(store.lock(stage.name, f"{job.key}-{part}"))
        if _intact(store, stage.name, job.key, progress):
            return None, True
        ctx = _context(stage, job, cfg, store, progress, store.partial(stage.name, job.key), device)
        if job.part is not None:
            return _run_part(stage, ctx, job.part)
        return _seal(stage, ctx), False
