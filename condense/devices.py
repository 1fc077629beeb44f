"""Where the arithmetic runs: the device setting, what it names, its fast-math and determinism
switches, peak-memory accounting, and one clear error when a stage does not fit.

``compute.device`` is ``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``.
The device is in no cache key: a set distilled on a GPU and one distilled on the CPU differ by
floating-point rounding, not in kind, so either serves a later run.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from condense.errors import CondenseError, ConfigError

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
LOWER_MEMORY = "lower distill.batch_syn, distill.syn_steps or evaluate.batch_size, or use a larger device"


def resolve(setting: str) -> torch.device:
    """The torch device a setting names; a one-line error when it names a device that is not here."""
    if not DEVICE_PATTERN.fullmatch(setting):
        raise ConfigError(f"unknown device {setting!r}: use auto, cpu, cuda or cuda:N")
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {setting} was asked for, but this machine has no usable CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {setting}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def fan_out(setting: str, devices: list[str] | None) -> list[str]:
    """The devices fanned-out jobs (experts, evaluation runs) are spread over, in turn: the given list,
    else every visible GPU when the device is ``auto`` or ``cuda`` on a machine with several, else
    the one device."""
    if devices:
        for name in devices:
            resolve(name)
        return list(devices)
    device = resolve(setting)
    if device.type == "cuda" and device.index is None and torch.cuda.device_count() > 1:
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return [str(device)]


def upload(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device`` without making the host wait: from pinned memory, asynchronously, on
    CUDA (a plain ``.to(device)`` synchronises the stream after its copy)."""
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def describe(device: torch.device) -> dict[str, Any]:
    """What ran a stage, for the summary: the device and its name (and memory on a GPU)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        memory = round(props.total_memory / 2**30, 1)
        return {"device": f"cuda:{index}", "name": props.name, "memory_gib": memory}
    name = platform.processor() or platform.machine()
    return {"device": "cpu", "name": name, "threads": torch.get_num_threads()}


def configure(device: torch.device, deterministic: bool) -> None:
    """TF32 matrix multiplies and convolutions on CUDA (a large speed-up for these small ConvNets at
    a precision distillation does not notice), unless deterministic. Deterministic mode asks torch
    for deterministic kernels (and cuBLAS for a fixed workspace), so a CUDA run repeats bit for bit
    on the same GPU and software; CPU runs are deterministic either way."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = not deterministic
    torch.backends.cudnn.allow_tf32 = not deterministic
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


_slots: dict[str, threading.Semaphore] = {}
_slots_lock = threading.Lock()


@contextlib.contextmanager
def exclusive(device: torch.device, cpu_jobs: int = 1) -> Iterator[None]:
    """Jobs of this process take turns: one at a time on a GPU, ``cpu_jobs`` at a time on the CPU
    (each already uses every core through torch's threads; more only thrash, see
    :attr:`condense.config.ComputeConfig.cpu_jobs`)."""
    # One pool per CPU limit: configs of one process with another cpu_jobs do not share a semaphore.
    name, size = (str(device), 1) if device.type == "cuda" else (f"cpu/{cpu_jobs}", cpu_jobs)
    with _slots_lock:
        slot = _slots.setdefault(name, threading.Semaphore(size))
    with slot:
        yield


@contextlib.contextmanager
def measured(device: torch.device, stage: str) -> Iterator[dict[str, Any]]:
    """Peak device memory of the block (``peak_memory_bytes``, GPUs only), and a one-line error
    naming the settings that lower memory when the block runs out of it."""
    report: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield report
    except torch.cuda.OutOfMemoryError:
        raise CondenseError(f"stage {stage} does not fit in the memory of {device}: {LOWER_MEMORY}") from None
    if device.type == "cuda":
        report["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))


def compile_wanted(setting: str, device: torch.device) -> bool:
    """``compute.compile``: ``on``, ``off``, or ``auto`` = on CUDA only (on a CPU, compiling these
    small networks costs more than it saves)."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


class Compiled:
    """``function`` compiled with ``torch.compile`` (CUDA graphs too on a GPU: "reduce-overhead"), or
    the function itself: when compilation fails (no C++ compiler, an unsupported operation) the call
    falls back to eager for good, with a warning. Numerically the same function."""

    def __init__(self, function: Callable[..., Any], enabled: bool, device: torch.device):
        self.function = function
        self.compiled: Callable[..., Any] | None = None
        if enabled:
            mode = "reduce-overhead" if device.type == "cuda" else None
            self.compiled = torch.compile(function, mode=mode, dynamic=False)

    def __call__(self, *args: Any) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except torch._dynamo.exc.TorchDynamoException as err:  # compilation, not the computation
                first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
                warnings.warn(f"torch.compile is not available here ({first}); running eagerly", stacklevel=2)
                self.compiled = None
        return self.function(*args)
