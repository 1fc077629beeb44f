"""Where the arithmetic runs: the device setting, what it names, its fast-math and determinism
switches, peak-memory accounting, and one clear error when a stage does not fit.

``compute.device`` is ``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``.
The device is in no cache key: a set distilled on a GPU and one distilled on the CPU differ by
floating-point rounding, not in kind, so either serves a later run.
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import re
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from condense.errors import CondenseError, ConfigError

DEVICE_PATTERN = re.compile(r"(auto|cuda)(#\d+)?|cpu|cuda:\d+")
"""A device setting; ``auto#N`` and ``cuda#N`` are a fanned-out job's turn N, resolved where it runs."""
LOWER_MEMORY = "lower distill.batch_syn, distill.syn_steps or evaluate.batch_size, or use a larger device"
UNRESOLVED = ("auto", "cuda")
"""Settings that name no particular device: the machine that runs a job decides what they mean."""


def resolve(setting: str) -> torch.device:
    """The torch device a setting names on this machine, always with its index on CUDA (``cuda`` is
    ``cuda:0`` here, so both take the same turns and peak-memory counters); ``auto#N``/``cuda#N``
    are turn N over this machine's GPUs (``auto#N`` is the CPU where there is none). A one-line
    error when it names a device that is not here."""
    if not DEVICE_PATTERN.fullmatch(setting):
        raise ConfigError(f"unknown device {setting!r}: use auto, cpu, cuda or cuda:N")
    name, _, turn = setting.partition("#")
    if name == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {name} was asked for, but this machine has no usable CUDA device")
    count = torch.cuda.device_count()
    if turn:
        return torch.device("cuda", int(turn) % count)
    index = int(name.partition(":")[2]) if ":" in name else None  # no torch.device: huge N overflows
    if index is not None and index >= count:
        raise ConfigError(f"device {setting}: only {count} CUDA device(s) here")
    return torch.device("cuda", torch.cuda.current_device() if index is None else index)


def fan_out(setting: str, devices: list[str] | None) -> list[str]:
    """The devices fanned-out jobs (experts, evaluation runs) are spread over, in turn: the given list
    (each checked here), else the one setting, which for ``auto`` and ``cuda`` the worker that runs a
    job resolves (:func:`in_turn`): a planner without a GPU must not pin a GPU worker's jobs to its CPU."""
    if devices:
        for name in devices:
            resolve(name)
        return list(devices)
    if setting not in UNRESOLVED:
        resolve(setting)
    return [setting]


def data_parallel(processes: int | str, devices: list[str] | None, job: torch.device) -> list[str]:
    """The device of each process of a data-parallel training (``compute.data_parallel``) in a job on
    ``job``: the first of ``devices`` when listed, else ``job``'s kind (every visible GPU for
    ``auto``), else one process."""
    if devices:
        count = len(devices) if processes == "auto" else int(processes)
        if count > len(devices):
            raise ConfigError(
                f"compute.data_parallel {count} exceeds the {len(devices)} listed compute.devices"
            )
        return list(devices[:count])
    if job.type == "cuda":
        visible = torch.cuda.device_count()
        count = visible if processes == "auto" else int(processes)
        if count > visible:
            raise ConfigError(f"compute.data_parallel {count} exceeds the {visible} visible GPUs")
        return [f"cuda:{i}" for i in range(count)]
    return [str(job)] * (1 if processes == "auto" else int(processes))


def in_turn(spread: list[str], turn: int) -> str:
    """The device setting of a fanned-out job's ``turn``: the list's entry in turn, or for one unresolved
    setting that setting with the turn (``auto#3``: every visible GPU in turn where the job runs)."""
    if len(spread) == 1 and spread[0] in UNRESOLVED:
        return f"{spread[0]}#{turn}"
    return spread[turn % len(spread)]


PIN_ABOVE = 1 << 20
"""Bytes above which an upload goes through pinned memory (below, pinning costs more than it saves)."""


def upload(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device`` without making the host wait (a plain ``.to(device)`` synchronises the
    stream after its copy): an asynchronous copy, from pinned memory when it is large. The source may
    be freed at once: CUDA stages a pageable source before the call returns, and torch's pinned
    allocator keeps a pinned one until the copy is done."""
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu" and tensor.nbytes > PIN_ABOVE:
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


RESIDENT_FRACTION = 4
"""Expert buffers are kept on a GPU when they take at most 1/4 of its free memory."""


def resident_budget(device: torch.device) -> int:
    """Bytes of read-only inputs (expert trajectories) worth keeping resident on ``device``: a share
    of a GPU's free memory; none on the CPU, where reading per draw costs no copy (and paper-scale
    buffers are gigabytes); everything on other devices (the checking device of tests)."""
    if device.type == "cpu":
        return 0
    if device.type == "cuda":
        return torch.cuda.mem_get_info(indexed(device))[0] // RESIDENT_FRACTION
    return 1 << 62


def describe(device: torch.device) -> dict[str, Any]:
    """What ran a stage, for the summary: the device and its name (and memory on a GPU)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        memory = round(props.total_memory / 2**30, 1)
        return {"device": f"cuda:{index}", "name": props.name, "memory_gib": memory}
    name = platform.processor() or platform.machine()
    return {"device": "cpu", "name": name, "threads": torch.get_num_threads()}


CUBLAS_WORKSPACE = ":4096:8"
"""cuBLAS's fixed workspace for repeatable results; read once, at a process's first cuBLAS call, so
the CLI and the task entry point set it at start-up (:func:`prepare_process`)."""


def prepare_process() -> None:
    """What must hold before any CUDA work in this process: cuBLAS's fixed workspace (a deterministic
    job set later would be too late), and the record of kernels without a deterministic version."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    _record_nondeterministic_kernels()


_NONDETERMINISTIC = re.compile(r"(\S+) does not have a deterministic implementation")
_nondeterministic: set[str] = set()
_showwarning = warnings.showwarning


def _record_nondeterministic_kernels() -> None:
    """Torch warns (with ``warn_only``) once per call site when a kernel has no deterministic CUDA
    version; keep the kernels' names for the run summary instead of printing them mid-progress."""
    global _showwarning
    if getattr(warnings.showwarning, "_condense", False):
        return
    _showwarning = warnings.showwarning

    def show(
        message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None
    ) -> None:
        found = _NONDETERMINISTIC.search(str(message))
        if found:
            _nondeterministic.add(found.group(1))
            return
        _showwarning(message, category, filename, lineno, file, line)

    show._condense = True  # type: ignore[attr-defined]
    warnings.showwarning = show


def nondeterministic_kernels() -> list[str]:
    """Kernels this process ran in deterministic mode that have no deterministic CUDA version (e.g.
    ``grid_sampler_2d_backward_cuda``: DSA's scale and rotate, the crops of SRe2L-style recovery)."""
    return sorted(_nondeterministic)


_flags_lock = threading.Lock()
_jobs_by_mode: dict[bool, int] = {True: 0, False: 0}
_saved_flags: dict[str, bool] = {}


def _cuda_flags() -> dict[str, bool]:
    return {
        "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_tf32": torch.backends.cudnn.allow_tf32,
        "benchmark": torch.backends.cudnn.benchmark,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
    }


def _set_cuda_flags(flags: dict[str, bool]) -> None:
    torch.backends.cuda.matmul.allow_tf32 = flags["matmul_tf32"]
    torch.backends.cudnn.allow_tf32 = flags["cudnn_tf32"]
    torch.backends.cudnn.benchmark = flags["benchmark"]
    torch.backends.cudnn.deterministic = flags["cudnn_deterministic"]
    torch.use_deterministic_algorithms(flags["deterministic"], warn_only=flags["warn_only"])


def job_flags(deterministic: bool) -> dict[str, bool]:
    """Torch's process-wide switches for a CUDA job. Fast: TF32 matrix multiplies and convolutions (a
    large speed-up for these small ConvNets at a precision distillation does not notice) and cuDNN's
    autotuner. Deterministic: neither, and deterministic kernels, with ``warn_only`` because some have
    no deterministic CUDA version (:func:`nondeterministic_kernels` names those that ran)."""
    return {
        "matmul_tf32": not deterministic,
        "cudnn_tf32": not deterministic,
        "benchmark": not deterministic,
        "cudnn_deterministic": deterministic,
        "deterministic": deterministic,
        "warn_only": deterministic,
    }


@contextlib.contextmanager
def configured(device: torch.device, deterministic: bool) -> Iterator[None]:
    """Torch's CUDA switches set for the block (:func:`job_flags`) and restored when the last job of
    this process that set them ends. They are process-wide, so concurrent jobs must agree: a job
    asking for the other mode while one runs is an error, not a silent switch under its feet. CPU
    jobs change nothing (CPU runs are deterministic either way)."""
    if device.type != "cuda":
        yield
        return
    with _flags_lock:
        if _jobs_by_mode[not deterministic]:
            raise CondenseError(
                f"a job with compute.deterministic={str(deterministic).lower()} cannot run beside jobs "
                "with the other setting in one process (torch's switches are process-wide): run them apart"
            )
        if not _jobs_by_mode[deterministic]:
            if deterministic:
                prepare_process()
            _saved_flags.update(_cuda_flags())
            _set_cuda_flags(job_flags(deterministic))
        _jobs_by_mode[deterministic] += 1
    try:
        yield
    finally:
        with _flags_lock:
            _jobs_by_mode[deterministic] -= 1
            if not _jobs_by_mode[deterministic]:
                _set_cuda_flags(_saved_flags)


_slots: dict[str, threading.Semaphore] = {}
_slots_lock = threading.Lock()


@contextlib.contextmanager
def exclusive(device: torch.device, cpu_jobs: int = 1) -> Iterator[None]:
    """Jobs of this process take turns: one at a time on a GPU, ``cpu_jobs`` at a time on the CPU
    (each already uses every core through torch's threads; more only thrash, see
    :attr:`condense.config.ComputeConfig.cpu_jobs`)."""
    # One pool per CPU limit: configs of one process with another cpu_jobs do not share a semaphore.
    name, size = (str(indexed(device)), 1) if device.type == "cuda" else (f"cpu/{cpu_jobs}", cpu_jobs)
    with _slots_lock:
        slot = _slots.setdefault(name, threading.Semaphore(size))
    with slot:
        yield


def indexed(device: torch.device) -> torch.device:
    """``cuda`` as the ``cuda:N`` it means here (the current device), so turns and counters agree."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


_ALLOCATION_FAILURES = ("CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "CUDA out of memory")


def out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is a device running out of memory: torch's OutOfMemoryError, or a cuBLAS or
    cuDNN allocation failure, which torch raises as a plain RuntimeError."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and any(s in str(err) for s in _ALLOCATION_FAILURES)


@contextlib.contextmanager
def measured(device: torch.device, stage: str, lower_memory: str = LOWER_MEMORY) -> Iterator[dict[str, Any]]:
    """Peak device memory of the block (``peak_memory_bytes``, GPUs only), and a one-line error
    naming the settings that lower memory (``lower_memory``) when the block runs out of it. The
    failed block's tensors are freed before the error travels on: the error's traceback held every
    frame of the stage (its data, its networks), so the next job on that GPU would run out too."""
    report: dict[str, Any] = {}
    device = indexed(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    message = None
    try:
        yield report
    except Exception as err:
        if not out_of_memory(err):
            raise
        traceback.clear_frames(err.__traceback__)  # the stage's frames and every tensor they hold
        err.__traceback__ = None
        message = f"stage {stage} does not fit in the memory of {device}: {lower_memory}"
    if message is not None:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        raise CondenseError(message)
    if device.type == "cuda":
        report["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))


def compile_wanted(setting: str, device: torch.device) -> bool:
    """``compute.compile``: ``on``, ``off``, or ``auto`` = on CUDA only (on a CPU, compiling these
    small networks costs more than it saves)."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


RECOMPILE_LIMIT = 64
"""Dynamo's recompiles per function before it falls back to eager for good; every job of a process
compiles the same forward code (one per network, seed group and evaluation), so its default (8) ran
out within one comparison and left later jobs silently eager."""

_compile_failure: list[str] = []
"""Why ``torch.compile`` failed in this process: decided once, so later jobs neither retry nor warn."""
_compile_lock = threading.Lock()


def compile_failure() -> str | None:
    """The reason compilation does not work in this process, once a job found out; None until then."""
    return _compile_failure[0] if _compile_failure else None


class Compiled:
    """``function`` compiled with ``torch.compile`` (CUDA graphs too on a GPU: "reduce-overhead"), or
    the function itself: when compilation fails (no C++ compiler, an unsupported operation) this call
    and every later one in the process run eagerly, after one warning. Numerically the same function.

    ``batch`` = (argument, dimension) of the batch size, which is marked dynamic so that an epoch's
    last, smaller batch does not compile a second graph; None: every shape is static."""

    def __init__(
        self,
        function: Callable[..., Any],
        enabled: bool,
        device: torch.device,
        batch: tuple[int, int] | None = (0, 0),
    ):
        self.function = function
        self.batch = batch
        self.compiled: Callable[..., Any] | None = None
        if enabled and compile_failure() is None:
            dynamo = torch._dynamo.config
            dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
            dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)
            mode = "reduce-overhead" if device.type == "cuda" else None
            self.compiled = torch.compile(function, mode=mode)

    def __call__(self, *args: Any) -> Any:
        if self.compiled is not None and compile_failure() is None:
            if self.batch is not None:
                arg, dim = self.batch
                torch._dynamo.maybe_mark_dynamic(args[arg], dim)
            try:
                return self.compiled(*args)
            except torch._dynamo.exc.TorchDynamoException as err:  # compilation, not the computation
                first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
                with _compile_lock:
                    if not _compile_failure:
                        _compile_failure.append(first)
                        warnings.warn(
                            f"torch.compile is not available here ({first}); running eagerly", stacklevel=2
                        )
        self.compiled = None
        return self.function(*args)
