"""CDA: Curriculum Data Augmentation (Yin & Shen, TMLR 2024), SRe2L's recover with a crop curriculum.

Identical to SRe2L (:mod:`condense.methods.sre2l`) except step 1: the random resized crop's minimum
area scale follows a curriculum from 1.0 (the whole image, easy) down to ``crop_min_scale`` (local,
hard) over the first ``milestone`` fraction of the iterations, by a ``step``, ``linear`` or
``cosine`` schedule (:func:`condense.methods.recover.crop_min_scale`); CDA's runs use cosine over the whole
run.
"""

from __future__ import annotations

from typing import Literal

from condense.methods import register_method
from condense.methods.base import Checkpoints, DistillInputs, SyntheticSet
from condense.methods.recover import RECOVERED, RecoverConfig, check_teacher_settings, recover_set
from condense.progress import SILENT, Progress


class CDAConfig(RecoverConfig):
    crop_curriculum: Literal["none", "step", "linear", "cosine"] = "cosine"
    """CDA's README runs: cosine over the whole run (milestone 1)."""


@register_method(
    "cda", config=CDAConfig, needs=("teacher",), check=check_teacher_settings, streams=True, shards=RECOVERED
)
def distill(inputs: DistillInputs, checkpoints: Checkpoints, progress: Progress = SILENT) -> SyntheticSet:
    return recover_set(inputs, checkpoints, progress)
