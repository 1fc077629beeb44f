"""PAD: Prioritize Alignment in Dataset Distillation (Li et al., arXiv 2408.03360).

DATM (:mod:`condense.methods.datm`) with PAD's two filters of misaligned information:

1. information extraction: the experts train on data ordered by difficulty (EL2N scores, the
   ``difficulty`` stage): they start from the easiest ``init_ratio`` of each class, add harder
   images until ``add_end_epoch``, then drop the easiest (``experts.schedule``);
2. information embedding: the matching loss leaves out the shallow layers' parameters, the leading
   ``shallow_fraction`` of them in network order (PAD's ``depth_ratio``: 0.5 at CIFAR-10 IPC 10,
   0.25 at IPC 50, 0 at IPC 1).

Stated reading: PAD's released distillation code does not contain step 2 (its configs carry
``depth_ratio`` unused), so the cut is ours as the paper describes it: whole parameter tensors,
shallowest first, up to the fraction of the parameter count.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from condense.methods import register_method
from condense.methods.base import Checkpoints, DistillInputs, Progress, SyntheticSet
from condense.methods.datm import DATMConfig
from condense.methods.mtt import SHARED_TRAJECTORY, match_trajectories
from condense.methods.mtt import check as check_mtt


class PADConfig(DATMConfig):
    shallow_fraction: float = Field(default=0.5, ge=0, lt=1)


def check(cfg: Any) -> None:
    check_mtt(cfg)
    if cfg.experts.schedule is None:
        raise ValueError("pad trains its experts on difficulty-ordered data: set experts.schedule=true")


@register_method(
    "pad", config=PADConfig, needs=("experts",), check=check, streams=True, shards=SHARED_TRAJECTORY
)
def distill(inputs: DistillInputs, checkpoints: Checkpoints, progress: Progress) -> SyntheticSet:
    return match_trajectories(inputs, checkpoints, progress, "PAD")
