"""The teacher: a network trained on the full real data ("squeeze" in SRe2L, the "observer" in RDED).

It labels synthetic images, scores RDED's candidate patches and supervises students under the KD
recipe. Trained here (SGD with momentum, cosine to 0, DSA), taken from the best expert, or loaded
from a state_dict. Whatever its origin, :func:`check_class_order` guards the classic failure of
decoupled methods: a teacher whose class indices are not the dataset's (RDED issues #3, #4, #6).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from condense.config import DSAConfig, ModelConfig, TeacherConfig
from condense.devices import Compiled
from condense.errors import ConfigError, DatasetError
from condense.models import build_model
from condense.prepare import PreparedDataset
from condense.progress import SILENT, Progress
from condense.training import accuracy, cosine_factor, predict, sample_per_class, train_epoch


def teacher_model_config(cfg: TeacherConfig, model_cfg: ModelConfig) -> ModelConfig:
    """The ConvNet shape of the pipeline's model with the teacher's own norm."""
    return model_cfg.model_copy(update={"norm": cfg.norm})


def build_teacher(
    cfg: TeacherConfig, model_cfg: ModelConfig, data: PreparedDataset, seed: int = 0
) -> nn.Module:
    model_cfg = teacher_model_config(cfg, model_cfg)
    model = build_model(cfg.arch, data.channels, data.num_classes, data.resolution, model_cfg, seed)
    return model.to(data.train_x.device)


@dataclass
class TrainedTeacher:
    model: nn.Module
    train_accuracy: float
    test_accuracy: float
    train_loss: float


def train_teacher(
    data: PreparedDataset,
    cfg: TeacherConfig,
    model_cfg: ModelConfig,
    dsa_cfg: DSAConfig,
    seed: int,
    progress: Progress = SILENT,
    compile_step: bool = False,
) -> TrainedTeacher:
    """Train ``cfg.arch`` on all real training images: SGD + momentum, cosine to 0, DSA per batch."""
    model = build_teacher(cfg, model_cfg, data, seed)
    forward = Compiled(model, compile_step, data.train_x.device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: cosine_factor(epoch, cfg.epochs))
    generator = torch.Generator().manual_seed(seed)
    loss = float("nan")
    for epoch in range(cfg.epochs):
        loss = train_epoch(
            model,
            data.train_x,
            data.train_y,
            F.cross_entropy,
            optimizer,
            cfg.batch_size,
            generator,
            dsa_cfg if cfg.dsa else None,
            forward,
        )
        scheduler.step()
        progress.step(epoch + 1, cfg.epochs, f"teacher loss {loss:.4f}")
    return TrainedTeacher(
        model=model.eval(),
        train_accuracy=accuracy(model, data.train_x, data.train_y),
        test_accuracy=accuracy(model, data.test_x, data.test_y),
        train_loss=loss,
    )


def load_teacher_file(path: str | Path, model: nn.Module) -> nn.Module:
    """Load a state_dict saved with ``torch.save(model.state_dict(), path)`` into ``model``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"teacher file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, ValueError, EOFError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"teacher file {path} is not a readable state_dict (loaded weights only): {first}"
        ) from None
    try:
        model.load_state_dict(state)
    except (RuntimeError, OSError, ValueError, TypeError, AttributeError) as err:
        first = str(err).strip().splitlines()[0]
        raise ConfigError(f"teacher file {path} does not fit the teacher architecture: {first}") from None
    return model.eval()


def class_order_accuracy(
    teacher: nn.Module, data: PreparedDataset, images_per_class: int, generator: torch.Generator
) -> float:
    """The teacher's accuracy (%) on a class-balanced batch of real training images."""
    idx = sample_per_class(data.train_y, data.num_classes, images_per_class, generator)
    return float((predict(teacher, data.train_x[idx]).argmax(1) == data.train_y[idx]).float().mean() * 100)


def default_min_accuracy(num_classes: int) -> float:
    """Three times chance, at most 50 %: a teacher below it does not know these classes."""
    return min(50.0, 300.0 / num_classes)


def check_class_order(
    teacher: nn.Module,
    data: PreparedDataset,
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
