"""SRe2L: Squeeze, Recover and Relabel (Yin, Xing & Shen, NeurIPS 2023), the recover step.

Per IPC index, a batch of one image per class starts from N(0, 1) noise and, for ``iterations`` steps:

1. one random resized crop (area scale in [``crop_min_scale``, 1]), one flip and one random shift
   for the whole batch;
2. the frozen batch-norm teacher, in eval mode, on the augmented batch;
3. loss = CE(teacher(x), y) + r_bn * sum_l s_l (||mu_l(x) - mu_l^running||_2
   + ||var_l(x) - var_l^running||_2), s_1 = ``first_bn_multiplier``, the others 1;
4. an Adam step (betas 0.5/0.9, cosine learning rate to 0), then pixels clipped to the valid range.

The loop is :func:`condense.methods.recover.recover_batch`; the squeeze (teacher) and relabel steps are the
pipeline's teacher and relabel stages.
"""

from __future__ import annotations

from condense.methods import register_method
from condense.methods.base import Checkpoints, DistillInputs, SyntheticSet
from condense.methods.recover import RECOVERED, RecoverConfig, check_teacher_settings, recover_set
from condense.progress import SILENT, Progress


@register_method(
    "sre2l",
    config=RecoverConfig,
    needs=("teacher",),
    check=check_teacher_settings,
    streams=True,
    shards=RECOVERED,
)
def distill(inputs: DistillInputs, checkpoints: Checkpoints, progress: Progress = SILENT) -> SyntheticSet:
    return recover_set(inputs, checkpoints, progress)
