"""The teacher: a network trained on the full real data ("squeeze" in SRe2L, the "observer" in RDED).

It labels synthetic images, scores RDED's candidate patches and supervises students under the KD
recipe. Trained here (SGD with momentum, cosine to 0, DSA), taken from the best expert, or loaded
from a state_dict of any ConvNet, timm or torchvision architecture. Whatever its origin,
:func:`check_class_order` guards the classic failure of decoupled methods: a teacher whose class
indices are not the dataset's (RDED issues #3, #4, #6).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import pickle
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from condense.augment import dsa
from condense.config import DSAConfig, ModelConfig, TeacherConfig
from condense.datasets.common import sample_per_class
from condense.devices import Compiled
from condense.errors import ConfigError, DatasetError
from condense.models import build_model
from condense.prepare import RealData
from condense.progress import SILENT, Progress
from condense.training import cosine_factor, predict, random_seed, split_accuracy, train_on


def teacher_model_config(cfg: TeacherConfig, model_cfg: ModelConfig) -> ModelConfig:
    """The ConvNet shape of the pipeline's model with the teacher's own norm."""
    return model_cfg.model_copy(update={"norm": cfg.norm})


def build_teacher(cfg: TeacherConfig, model_cfg: ModelConfig, data: RealData, seed: int = 0) -> nn.Module:
    model_cfg = teacher_model_config(cfg, model_cfg)
    model = build_model(cfg.arch, data.channels, data.num_classes, data.resolution, model_cfg, seed)
    return model.to(data.device, non_blocking=True)  # built on the CPU (its seeded init); no wait


def teacher_optimizer(
    model: nn.Module, cfg: TeacherConfig
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR]:
    """SGD with momentum and weight decay, its learning rate cosine to 0 over the epochs."""
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: cosine_factor(e, cfg.epochs))


@dataclass
class TrainedTeacher:
    model: nn.Module
    train_accuracy: float
    test_accuracy: float
    train_loss: float


def train_teacher(
    data: RealData,
    cfg: TeacherConfig,
    model_cfg: ModelConfig,
    dsa_cfg: DSAConfig,
    seed: int,
    progress: Progress = SILENT,
    compile_step: bool = False,
) -> TrainedTeacher:
    """Train ``cfg.arch`` on all real training images: SGD + momentum, cosine to 0, DSA per batch."""
    model = build_teacher(cfg, model_cfg, data, seed)
    forward = Compiled(model, compile_step, data.device)
    optimizer, scheduler = teacher_optimizer(model, cfg)
    generator = torch.Generator().manual_seed(seed)
    loss = float("nan")
    for epoch in range(cfg.epochs):
        batches = data.batches("train", cfg.batch_size, generator)
        loss = float(
            train_on(
                model, batches, F.cross_entropy, optimizer, generator, dsa_cfg if cfg.dsa else None, forward
            )
        )
        scheduler.step()
        progress.step(epoch + 1, cfg.epochs, f"teacher loss {loss:.4f}")
    return TrainedTeacher(
        model=model.eval(),
        train_accuracy=split_accuracy(model, data, "train"),
        test_accuracy=split_accuracy(model, data, "test"),
        train_loss=loss,
    )


def data_parallel_share(
    epoch: Iterator[tuple[torch.Tensor, torch.Tensor]],
    generator: torch.Generator,
    augment: DSAConfig | None,
    rank: int,
    world: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """Rank ``rank``'s contiguous share of each batch, as (inputs, targets, whole batch size). Every
    rank draws the batch's DSA seed and augments the whole batch, so each image gets the transform it
    gets in one process (DSA draws per-image parameters for the batch as a whole)."""
    for inputs, targets in epoch:
        if augment is not None:
            inputs = dsa(inputs, augment, random_seed(generator))
        lo, hi = len(targets) * rank // world, len(targets) * (rank + 1) // world
        yield inputs[lo:hi], targets[lo:hi], len(targets)


def _train_rank(
    rank: int,
    world: int,
    devices: list[str],
    rendezvous: str,
    load_data: Callable[[torch.device], RealData],
    cfg: TeacherConfig,
    model_cfg: ModelConfig,
    dsa_cfg: DSAConfig,
    seed: int,
    out: str,
    losses: Any,
) -> None:
    """One process of :func:`train_teacher_data_parallel`: the single-process recipe, with each
    batch's loss taken over this rank's share and the gradients averaged by DistributedDataParallel."""
    device = torch.device(devices[rank])
    if device.type == "cpu":  # the ranks share the machine's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    else:
        torch.cuda.set_device(device)
    # CPU convolutions hand back weight gradients in another memory layout than DDP's buckets: DDP
    # copies them (correct, a little slower) and would warn once per process about it.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        data = load_data(device)
        model = build_teacher(cfg, model_cfg, data, seed)
        if device.type == "cuda":  # one set of BatchNorm statistics over the whole batch, as in one process
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        parallel = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        optimizer, scheduler = teacher_optimizer(model, cfg)
        generator = torch.Generator().manual_seed(seed)
        augment = dsa_cfg if cfg.dsa else None
        for _ in range(cfg.epochs):
            parallel.train()
            total = torch.zeros((), dtype=torch.float64, device=device)
            epoch = data.batches("train", cfg.batch_size, generator)
            for inputs, targets, whole in data_parallel_share(epoch, generator, augment, rank, world):
                # DDP averages over ranks: sum / whole * world makes that the whole batch's mean loss.
                loss = F.cross_entropy(parallel(inputs), targets, reduction="sum") / whole * world
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.detach().double() * whole / world
            scheduler.step()
            dist.all_reduce(total)
            if rank == 0:
                losses.put(float(total) / len(data.train_y))
        if rank == 0:
            torch.save(model.state_dict(), out)
    finally:
        dist.destroy_process_group()


def train_teacher_data_parallel(
    load_data: Callable[[torch.device], RealData],
    cfg: TeacherConfig,
    model_cfg: ModelConfig,
    dsa_cfg: DSAConfig,
    seed: int,
    devices: list[str],
    progress: Progress = SILENT,
) -> TrainedTeacher:
    """:func:`train_teacher` on ``len(devices)`` processes (torch.distributed: NCCL on GPUs, Gloo on
    CPUs), meeting through a file in a temporary folder: each batch is split across them and their
    gradients averaged, so the result is the one-process teacher up to the order of floating-point
    reductions (tests/test_data_parallel.py bounds the difference). ``load_data(device)`` gives each
    process the prepared data (it must pickle). BatchNorm is synchronised on GPUs; on CPUs, where
    PyTorch cannot synchronise it, a teacher with BatchNorm is refused (its statistics would be each
    share's)."""
    world = len(devices)
    data = load_data(torch.device(devices[0]))
    model = build_teacher(cfg, model_cfg, data, seed)
    if any(torch.device(d).type == "cpu" for d in devices) and any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()
    ):
        raise ConfigError(
            "compute.data_parallel on CPUs needs a teacher without BatchNorm (PyTorch synchronises it "
            "on GPUs only): set teacher.norm=instancenorm, or run on GPUs"
        )
    losses = multiprocessing.get_context("spawn").SimpleQueue()
    epoch, loss = 0, float("nan")
    with tempfile.TemporaryDirectory(prefix="condense-ddp-") as folder:
        rendezvous, out = str(Path(folder) / "rendezvous"), Path(folder) / "rank0.pt"
        args = (world, devices, rendezvous, load_data, cfg, model_cfg, dsa_cfg, seed, str(out), losses)
        processes = torch.multiprocessing.start_processes(
            _train_rank, args=args, nprocs=world, join=False, start_method="spawn"
        )
        finished = False
        while not finished:
            finished = processes.join(timeout=1)  # a failed process raises here, with its traceback
            while not losses.empty():
                epoch, loss = epoch + 1, losses.get()
                progress.step(epoch, cfg.epochs, f"teacher loss {loss:.4f} ({world} processes)")
        model.load_state_dict(torch.load(out, map_location=devices[0], weights_only=True))
    return TrainedTeacher(
        model=model.eval(),
        train_accuracy=split_accuracy(model, data, "train"),
        test_accuracy=split_accuracy(model, data, "test"),
        train_loss=loss,
    )


def load_teacher_file(path: str | Path, model: nn.Module, arch: str | None = None) -> nn.Module:
    """Load the weights saved at ``path`` into ``model`` (``arch`` names it in errors).

    The file is read weights-only. It holds a state_dict (``torch.save(model.state_dict(), path)``),
    or a training checkpoint that keeps one under ``"state_dict"`` or ``"model"`` (the PyTorch and
    torchvision reference scripts, SRe2L's and RDED's observers); a ``module.`` (DataParallel) or
    ``_orig_mod.`` (torch.compile) prefix on every name is dropped. A file that does not fit is one
    ConfigError line: the head's class count, or the missing, unexpected or reshaped tensors.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"teacher file not found: {path}")
    expected = model.state_dict()
    state = _state_dict(_read_weights(path), path, list(expected))
    problem = _mismatch(state, expected, path, arch)
    if problem:
        raise ConfigError(problem)
    try:
        model.load_state_dict(state)
    except (RuntimeError, OSError, ValueError, TypeError, AttributeError) as err:
        first = str(err).strip().splitlines()[0]
        raise ConfigError(f"teacher file {path} does not fit {_fits(arch)}: {first}") from None
    return model.eval()


# Checkpoints of the torchvision reference scripts (and so SRe2L's) keep their argparse arguments.
_CHECKPOINT_GLOBALS = [argparse.Namespace]
_WRAPPERS = ("state_dict", "model")
_PREFIXES = ("module.", "_orig_mod.")


def _read_weights(path: Path) -> object:
    allow = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    try:
        with allow(_CHECKPOINT_GLOBALS) if allow else contextlib.nullcontext():
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, ValueError, EOFError) as err:
        text = str(err).strip()
        foreign = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        refused = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
        if foreign:
            first = f"it holds a {foreign.group(1)} object, which a weights-only load refuses"
        elif refused:
            first = f"a weights-only load refuses it ({refused.group(1).strip()})"
        else:
            first = text.splitlines()[0] if text else type(err).__name__
        raise ConfigError(
            f"teacher file {path} is not a readable state_dict (loaded weights only): {first}"
        ) from None


def _state_dict(loaded: object, path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The parameters in ``loaded``: a state_dict itself, or one wrapped in a checkpoint dict, with
    a prefix that every name has but the model's ``names`` do not removed."""
    if isinstance(loaded, Mapping):
        for wrapper in _WRAPPERS:
            if isinstance(loaded.get(wrapper), Mapping):
                loaded = loaded[wrapper]
                break
    if not isinstance(loaded, Mapping) or not any(isinstance(v, torch.Tensor) for v in loaded.values()):
        what = (
            f"a dict with keys {', '.join(map(str, list(loaded)[:5]))}"
            if isinstance(loaded, Mapping) and loaded
            else f"a {type(loaded).__name__}"
        )
        raise ConfigError(
            f"teacher file {path} holds {what}, not a state_dict (tensors by parameter name, "
            f"at the top or under {' or '.join(map(repr, _WRAPPERS))})"
        )
    state = {str(k): v for k, v in loaded.items()}
    for prefix in _PREFIXES:
        if (
            state
            and all(k.startswith(prefix) for k in state)
            and not all(n.startswith(prefix) for n in names)
        ):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _fits(arch: str | None) -> str:
    return f"the teacher architecture ({arch})" if arch else "the teacher architecture"


def _names(keys: list[str], what: str) -> str:
    shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
    return f"{len(keys)} {what} ({shown})"


def _count(keys: list[str], one: str, many: str) -> str:
    return f"{len(keys)} {one if len(keys) == 1 else many}"


def _shape(t: torch.Tensor) -> str:
    return "x".join(map(str, t.shape)) or "scalar"


def _examples(keys: list[str], state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{k} ({_shape(state[k])} in the file, {_shape(expected[k])} here)" for k in keys[:2])


def _mismatch(
    state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: Path, arch: str | None
) -> str | None:
    """One line on why ``state`` does not fit a model with state_dict ``expected``; None if it does."""
    # BatchNorm fills a missing step counter itself (files saved by older PyTorch versions lack it).
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = [_names(missing, "missing keys")] if missing else []
        parts += [_names(unexpected, "unexpected keys")] if unexpected else []
        return f"teacher file {path} does not fit {_fits(arch)}: {'; '.join(parts)}"
    tensors = [
        k for k in expected if isinstance(expected[k], torch.Tensor) and isinstance(state[k], torch.Tensor)
    ]
    reshaped = [k for k in tensors if state[k].shape != expected[k].shape]
    if not reshaped:
        return None
    # The classifier: the model's last weight of two or more dimensions (one row per class).
    head = next((k for k in reversed(tensors) if expected[k].dim() >= 2), "")
    classes = head in reshaped and state[head].shape[1:] == expected[head].shape[1:]
    others = [k for k in reshaped if k.rpartition(".")[0] != head.rpartition(".")[0]] if classes else reshaped
    # A file of a 7x7 ImageNet stem read for small images, which get the 3x3 stride-1 stem.
    stem = next((k for k in tensors if expected[k].dim() == 4), "")
    small = stem in others and expected[stem].shape[2:] == (3, 3) and state[stem].shape[2:] != (3, 3)
    hint = "; images up to 64 px get a 3x3 stride-1 stem without max-pool (SRe2L/RDED's ResNets)"
    if classes:
        line = (
            f"teacher file {path} has a {state[head].shape[0]}-class head ({head} {_shape(state[head])}) "
            f"but the dataset has {expected[head].shape[0]} classes"
        )
        if others:
            line += f"; {_count(others, 'other tensor differs', 'other tensors differ')} too, e.g. "
            line += _examples(others, state, expected)
    else:
        line = (
            f"teacher file {path} does not fit {_fits(arch)}: "
            f"{_count(others, 'tensor differs', 'tensors differ')} in shape, "
            f"e.g. {_examples(others, state, expected)}"
        )
    return line + (hint if small else "")


def class_order_accuracy(
    teacher: nn.Module, data: RealData, images_per_class: int, generator: torch.Generator
) -> float:
    """The teacher's accuracy (%) on a class-balanced batch of real training images."""
    idx = sample_per_class(data.train_y, data.num_classes, images_per_class, generator)
    predicted = predict(teacher, data.images(idx)).argmax(1)
    return float((predicted == data.train_y[idx.to(data.device)].to(predicted.device)).float().mean() * 100)


def default_min_accuracy(num_classes: int) -> float:
    """Three times chance, at most 50 %: a teacher below it does not know these classes."""
    return min(50.0, 300.0 / num_classes)


def check_class_order(
    teacher: nn.Module,
    data: RealData,
    minimum: float | None,
    images_per_class: int,
    generator: torch.Generator,
) -> float:
    """Fail clearly when the teacher does not recognise the dataset's classes in the dataset's order.

    A teacher trained with another class order (folder names sorted differently, a published
    observer for another label map) scores near chance here; methods that trust its labels would
    then silently distil the wrong classes. Returns the measured accuracy.
    """
    measured = class_order_accuracy(teacher, data, images_per_class, generator)
    floor = default_min_accuracy(data.num_classes) if minimum is None else minimum
    if measured < floor:
        raise DatasetError(
            f"the teacher classifies only {measured:.1f}% of real training images correctly "
            f"(need {floor:.1f}%): its class order does not match the dataset's "
            f"({', '.join(map(str, data.card['classes'][:5]))}, ...) or it is undertrained; "
            "fix the label map, train it longer (teacher.epochs) or lower distill.min_teacher_accuracy"
        )
    return measured
