"""A checking device for CPU runs: code run on it fails where it would fail on a GPU, and counts
what it would make a GPU wait for.

Inside :func:`simulated`, ``torch.device("meta")`` is a device whose tensors hold real CPU data (so
the arithmetic, ``.item()`` and data-dependent shapes all work) but report ``meta`` as their device.
A CUDA run differs from a CPU run in two ways that matter to this code, and both show up here:

- **Device mixing.** An operation that meets a device tensor and a CPU tensor of one or more
  dimensions raises ``Expected all tensors to be on the same device``, as CUDA does (a zero-dim CPU
  tensor is a scalar and allowed, CPU indices into a device tensor are allowed and counted as a
  copy, as CUDA moves them); a random draw on the device from a CPU generator raises too.
- **Host synchronisation.** Each point where the host would wait for the GPU is counted, by kind:
  ``scalar`` (``.item()``, ``float()``, ``bool()``, ``torch.equal``: a value read back), ``to_host``
  (a device-to-host copy: ``.cpu()``, ``.tolist()``), ``to_device`` (a blocking host-to-device copy:
  ``.to(device)`` without ``non_blocking``, CPU indices into a device tensor) and ``shape``
  (an output whose size depends on the data: ``nonzero``, boolean masks, ``unique``, ...).
  Non-blocking host-to-device copies are counted as ``async_copies``, not as waits.

Nothing here is used by a pipeline run; tests and ``bench/host_syncs.py`` use it.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

DEVICE = torch.device("meta")
SYNC_KINDS = ("scalar", "to_host", "to_device", "shape")

aten = torch.ops.aten
_COPIES = {aten._to_copy.default, aten.copy_.default}
_INDEXING = {
    aten.index.Tensor,
    aten.index_put_.default,
    aten.index_put.default,
    aten._index_put_impl_.default,
}
_DATA_DEPENDENT = {
    "nonzero",
    "nonzero_static",
    "masked_select",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "unique_dim_consecutive",
    "bincount",
    "repeat_interleave",
    "argwhere",
}


class DeviceMixingError(RuntimeError):
    """A CPU tensor met a device tensor where CUDA would refuse."""


class _OnDevice(torch.Tensor):
    """A real CPU tensor that reports the checking device."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> _OnDevice:
        wrapper = torch.Tensor._make_wrapper_subclass(
            cls,
            elem.size(),
            strides=elem.stride(),
            storage_offset=elem.storage_offset(),
            dtype=elem.dtype,
            layout=elem.layout,
            device=DEVICE,
            requires_grad=elem.requires_grad,
        )
        wrapper.elem = elem
        return wrapper

    def __repr__(self) -> str:
        return f"OnCheckingDevice({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        raise RuntimeError("a checking-device tensor was used outside devicecheck.simulated()")


def _is_device(value: Any) -> bool:
    return value is not None and torch.device(value).type == DEVICE.type


_FROM_HOST_DATA = {torch.tensor, torch.as_tensor, torch.asarray}
"""Constructors that copy host data to the device without passing the dispatcher with a device."""


class _HostData(TorchFunctionMode):
    """What never reaches the dispatcher as an operation on the device: ``torch.tensor(data,
    device=...)`` (host data, so a blocking upload) and ``.tolist()`` (one copy to the host)."""

    def __init__(self, counts: Counter[str]):
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.tolist and isinstance(args[0], _OnDevice):
            self.counts["to_host"] += 1  # one copy of the whole tensor, as CUDA makes it
            return args[0].elem.tolist()
        if func in _FROM_HOST_DATA and _is_device(kwargs.get("device")):
            requires_grad = kwargs.get("requires_grad", False)
            host = func(*args, **{**kwargs, "device": torch.device("cpu"), "requires_grad": False})
            self.counts["to_device"] += 1
            return _OnDevice(host).requires_grad_(requires_grad)
        return func(*args, **kwargs)


class _Checking(TorchDispatchMode):
    def __init__(self, counts: Counter[str]):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        on_device = any(isinstance(t, _OnDevice) for t in tensors)
        creates_on_device = _is_device(kwargs.get("device"))
        name = func.overloadpacket.__name__
        if creates_on_device and kwargs.get("generator") is not None:
            raise DeviceMixingError(f"{func}: a CPU generator draws for a device tensor (CUDA refuses)")
        if func in _COPIES:
            self._count_copy(func, args, kwargs)
        elif on_device:
            cpu = [t for t in tensors if not isinstance(t, _OnDevice) and t.dim() > 0]
            if cpu and func in _INDEXING:
                self.counts["to_device"] += 1  # CUDA copies CPU indices over, blocking
            elif cpu:
                shapes = ", ".join(str(tuple(t.shape)) for t in cpu)
                raise DeviceMixingError(
                    f"{func}: Expected all tensors to be on the same device, but found the device and "
                    f"CPU tensors of shape {shapes}"
                )
            if name in _DATA_DEPENDENT or (func in _INDEXING and _has_mask(args)):
                self.counts["shape"] += 1
        unwrapped_kwargs = tree_map(_unwrap, kwargs)
        if creates_on_device:
            unwrapped_kwargs["device"] = torch.device("cpu")
        out = func(*tree_map(_unwrap, args), **unwrapped_kwargs)
        if on_device and isinstance(out, bool | int | float):
            self.counts["scalar"] += 1  # .item(), float(), bool(), torch.equal: the host waits
        to_cpu = func in _COPIES and func is aten._to_copy.default and _lands_on_cpu(args, kwargs)
        if (on_device or creates_on_device) and not to_cpu:
            if func is aten.copy_.default and not isinstance(args[0], _OnDevice):
                return args[0]  # a copy into a CPU tensor stays a CPU tensor
            return tree_map(_wrap, out)
        return out

    def _count_copy(self, func: Any, args: Any, kwargs: dict[str, Any]) -> None:
        if func is aten._to_copy.default:
            source, to_device = args[0], _is_device(kwargs.get("device"))
            from_device = isinstance(source, _OnDevice)
            if from_device and _lands_on_cpu(args, kwargs):
                self.counts["to_host"] += 1
            elif to_device and not from_device:
                self._count_upload(kwargs.get("non_blocking", False))
            return
        dst, src = args[0], args[1]
        if isinstance(dst, _OnDevice) and not isinstance(src, _OnDevice) and src.dim() > 0:
            self._count_upload(len(args) > 2 and args[2] or kwargs.get("non_blocking", False))
        elif isinstance(src, _OnDevice) and not isinstance(dst, _OnDevice):
            self.counts["to_host"] += 1

    def _count_upload(self, non_blocking: bool) -> None:
        self.counts["async_copies" if non_blocking else "to_device"] += 1


def _lands_on_cpu(args: Any, kwargs: dict[str, Any]) -> bool:
    target = kwargs.get("device")
    return isinstance(args[0], _OnDevice) and target is not None and torch.device(target).type == "cpu"


def _has_mask(args: Any) -> bool:
    indices = args[1] if len(args) > 1 else []
    return any(
        isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in tree_leaves(indices)
    )


def _unwrap(value: Any) -> Any:
    return value.elem if isinstance(value, _OnDevice) else value


def _wrap(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and not isinstance(value, _OnDevice):
        return _OnDevice(value)
    return value


class Syncs:
    """What a checked block counted: host waits by kind, and non-blocking copies."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    @property
    def total(self) -> int:
        """Every point where the host would wait for the device."""
        return sum(self.counts[kind] for kind in SYNC_KINDS)

    def as_dict(self) -> dict[str, int]:
        return {kind: self.counts[kind] for kind in (*SYNC_KINDS, "async_copies")}

    def reset(self) -> None:
        self.counts.clear()


_one_at_a_time = threading.Lock()


@contextlib.contextmanager
def simulated() -> Iterator[Syncs]:
    """Run the block with :data:`DEVICE` as a checking device (see the module docstring); yields the
    counts, which keep growing until the block ends (call ``reset`` between measured sections).
    ``torch.compile`` is not checked (its kernels do not dispatch through here): leave it off."""
    syncs = Syncs()
    with _one_at_a_time, _HostData(syncs.counts), _Checking(syncs.counts):
        yield syncs
