"""What a distillation produces: the synthetic set, as methods return it and the store keeps it.

It sits below both: methods build one, :mod:`condense.artifacts` writes and reads it, and neither
has to import the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class StepSchedule:
    """The training a set was distilled for, step by step (DD's): step i is one plain gradient-descent
    step of size ``step_sizes[i]`` on the cross-entropy of the images ``indices[i]`` with their hard
    labels, no augmentation, from a fresh network or, with ``init_seeds``, a fixed one. What
    ``evaluate.recipe: replay`` trains fresh networks by."""

    indices: torch.Tensor
    """(T, b) indices into the set's images, one row a step, in the order the steps run (every pass
    over the batches included)."""
    step_sizes: torch.Tensor
    """(T,) the learned step sizes."""
    init_seeds: torch.Tensor | None = None
    """The seeds of the fixed networks the set was distilled from (DD's ``init: known``): the
    distillation's ConvNet built with each seed; None: any fresh network."""


@dataclass(frozen=True)
class Stages:
    """The stages a set was distilled in (PDD's): stage k added ``ipc[k]`` images per class, learned
    with the step size ``lrs[k]``. The set stays class-major; within class c's block of images the
    first ``ipc[0]`` are stage 1's, the next ``ipc[1]`` stage 2's, and so on. What
    ``evaluate.recipe: staged`` trains by: one network on S_1, then S_1 + S_2, ..., each stage with
    its own step size (:meth:`upto` gives each stage's images)."""

    ipc: tuple[int, ...]
    """Images per class each stage added, in order (their sum is the set's IPC)."""
    lrs: tuple[float, ...]
    """Each stage's learned step size (one per stage)."""

    def __post_init__(self) -> None:
        # Plain ints and floats whatever came in (lists, numpy or tensor elements): stored, exported
        # to JSON and compared as such.
        object.__setattr__(self, "ipc", tuple(int(n) for n in self.ipc))
        object.__setattr__(self, "lrs", tuple(float(lr) for lr in self.lrs))
        if len(self.ipc) != len(self.lrs) or not self.ipc:
            raise ValueError(f"stages need one step size per stage: ipc {self.ipc}, lrs {self.lrs}")
        if any(n <= 0 for n in self.ipc):
            raise ValueError(f"every stage adds images: ipc {self.ipc}")

    def __len__(self) -> int:
        return len(self.ipc)

    @property
    def total(self) -> int:
        """The set's IPC."""
        return sum(self.ipc)

    def upto(self, stage: int, num_classes: int) -> torch.Tensor:
        """Indices of the set's images in S_1 + ... + S_stage (``stage`` counts from 1), class by
        class, in the set's order."""
        if not 1 <= stage <= len(self.ipc):
            raise ValueError(f"stage {stage} of {len(self.ipc)}")
        within = torch.arange(sum(self.ipc[:stage]))
        return (torch.arange(num_classes)[:, None] * self.total + within).reshape(-1)


@dataclass
class SyntheticSet:
    images: torch.Tensor
    """(n, C, H, W) network inputs (normalised or whitened like the real data)."""
    labels: torch.Tensor
    """(n,) hard labels, class-major: ipc images of class 0, then class 1, ..."""
    label_logits: torch.Tensor | None = None
    """(n, classes) learned label logits (DATM), trained on with soft cross-entropy; None: hard labels."""
    lr: float | None = None
    """A learned training step size (MTT's alpha), used by evaluation when ``evaluate.lr: learned``."""
    history: list[dict[str, float]] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)
    """Cost accounting the run summary reports (e.g. feature-extraction and k-means seconds)."""
    arrays: dict[str, torch.Tensor] = field(default_factory=dict)
    """Further arrays the method stores with the set, by name (INFER's compensators and the indices
    of its real images, from which ``images`` are materialised)."""
    schedule: StepSchedule | None = None
    """The learned step schedule the set is trained by under ``evaluate.recipe: replay`` (DD); None:
    the set has none."""
    stages: Stages | None = None
    """The stages the set is trained by, in order, under ``evaluate.recipe: staged`` (PDD); None:
    the set has none."""
