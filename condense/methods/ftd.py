"""FTD: Minimizing the Accumulated Trajectory Error to Improve Dataset Distillation (Du et al., CVPR 2023).

MTT's loop (:mod:`condense.methods.mtt`) with FTD's two changes:

1. the experts are trained with sharpness-aware minimisation (GSAM, ``experts.optimizer: gsam``;
   SGD lr 0.01, momentum 0 in FTD's buffer script), so their trajectories are flat and a student
   that drifts from them (the accumulated trajectory error) stays in a good neighbourhood;
2. an exponential moving average of the synthetic images (``ema_decay``, 0.9995 in FTD's scripts) is
   kept alongside the optimised images, and the average is the stored set (FTD reports it).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from condense.methods import register_method
from condense.methods.base import Checkpoints, DistillInputs, Progress, SyntheticSet
from condense.methods.mtt import SHARED_TRAJECTORY, MTTConfig, match_trajectories
from condense.methods.mtt import check as check_mtt


class FTDConfig(MTTConfig):
    ema_decay: float | None = Field(default=0.9995, gt=0, lt=1)


def check(cfg: Any) -> None:
    check_mtt(cfg)
    if cfg.experts.optimizer != "gsam":
        raise ValueError("ftd trains on flat (GSAM) expert trajectories: set experts.optimizer=gsam")
    if cfg.distill.ema_decay is None:
        raise ValueError("ftd stores the moving average of its images: set distill.ema_decay (e.g. 0.9995)")


@register_method(
    "ftd", config=FTDConfig, needs=("experts",), check=check, streams=True, shards=SHARED_TRAJECTORY
)
def distill(inputs: DistillInputs, checkpoints: Checkpoints, progress: Progress) -> SyntheticSet:
    return match_trajectories(inputs, checkpoints, progress, "FTD")
