"""What a distillation produces: the synthetic set, as methods return it and the store keeps it.

It sits below both: methods build one, :mod:`condense.artifacts` writes and reads it, and neither
has to import the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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
