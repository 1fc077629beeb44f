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
