"""PDD: Data Distillation Can Be Like Vodka: Distilling More Times For Better Quality (Chen, Yang,
Wang, Mirzasoleiman, ICLR 2024), over the trajectory-matching methods (``base``: MTT, FTD, DATM, AST)
and, IDC-style, over the matching methods (``base``: DM, DSA, DataDAM).

The IPC budget is distilled in P = ``stages`` stages of IPC / P images per class:

1. stage 1 is the base method on the experts' trajectories, for IPC / P images per class;
2. after stage k < P every expert is regenerated (:func:`regenerate_expert`): a network starts at
   the expert's first snapshot (of the buffer stage k matched), trains ``synthetic_epochs`` epochs on
   S_1 u ... u S_k by the evaluation recipe (SGD at stage k's learned step size, momentum 0.9, weight
   decay 5e-4, /10 halfway, DSA), then on the real data by the experts' recipe for
   ``max_start_epoch + expert_epochs`` epochs, one snapshot per epoch; the snapshot after the
   synthetic training is epoch 0 of the new trajectory;
3. stage k + 1 is the base method on the regenerated trajectories, with S_1..S_k leading the set:
   trained on in every student step, never moved (their gradient is zeroed, ``image_syn.grad[:n] = 0``
   in the official code), and a new step size learned from ``lr_init``;
4. the set is S_1 u ... u S_P with its stage boundaries and each stage's learned step size
   (:class:`condense.synthetic.Stages`); ``evaluate.recipe: staged`` trains on it as PDD evaluates:
   stage 1, then 1 + 2, ..., carrying the optimiser's momentum.

Over a matching method (``dm``, ``dsa``, ``datadam``) there are no experts, so nothing is regenerated
(the official PDD+IDC, ``distill_idc.py``, has none either): stage k + 1 is the base method for
IPC / P new images per class with S_1..S_k in each class's synthetic batch, matched (embedded,
trained on) with the new images and never moved (:mod:`condense.methods.matching`), and the set is
S_1 u ... u S_P with its stages. These bases learn no step size: each stage records
:data:`UNLEARNED_LR`, and ``synthetic_epochs`` does nothing.

In the pipeline each stage is a job and each regenerated expert a job of its own (the ``progressive``
stage), cached by the images it trained on; over a matching base the chain is the stage sets alone
and no experts are trained. The distill job publishes the last stage's set.

Deviations from the official code (VITA-Group/ProgressiveDD, ``distill_mtt.py``):
- the regenerated experts train ``max_start_epoch + expert_epochs`` real epochs; the code trains one
  more, whose snapshot no stage reads;
- a stage keeps its final images; the code keeps the ones its periodic test-set evaluation scored best;
- over DATM the earlier stages' learned label logits are frozen with their images, and the synthetic
  phase of a regeneration trains on hard labels (the code has no learned labels);
- IPC must split evenly into the stages (the code takes the per-stage IPC and the stage count);
- PAD is not wrapped: its experts' difficulty schedule runs by epoch from the initialisation, where a
  regenerated expert does not start.

Deviations from the official PDD+IDC (``distill_idc.py``), over the matching bases:
- the matching is this project's DM, DSA or DataDAM, not IDC's multi-formation gradient matching (as
  DREAM's, :mod:`condense.methods.dream`);
- each iteration's network is the base method's fresh one; the code first trains it on each earlier
  stage's set (``train_only``, ``epochs / 5``) before matching.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from pydantic import BaseModel, Field

from condense.config import DSAConfig, ExpertsConfig, ModelConfig
from condense.evaluate import Recipe, fit
from condense.experts import Trajectory, train_expert
from condense.methods import Variants, ast, datadam, datm, dm, dsa, ftd, mtt, register_method
from condense.methods.base import Checkpoints, DistillInputs, Progress, SyntheticSet
from condense.models import FlatParams
from condense.prepare import RealData
from condense.synthetic import Stages
from condense.training import derived_seed, student_model

SYNTHETIC_BATCH = 256
"""The official code's ``batch_train`` for the synthetic phase of a regenerated expert."""


class _Progressive(BaseModel):
    """What makes a trajectory method PDD: the stage count and the regenerated experts' synthetic phase."""

    learns_stages: ClassVar[bool] = True
    """Its sets carry the stages ``evaluate.recipe: staged`` trains by."""

    stages: int = Field(default=5, ge=1)
    """P: IPC / P images per class are distilled per stage (PDD: 5)."""
    synthetic_epochs: int = Field(default=1000, gt=0)
    """Epochs a regenerated expert trains on the stages so far before the real data (PDD's
    ``override_epoch_eval_train``: 1000). Meaningless over a matching base (dm, dsa, datadam): it has
    no experts to regenerate, and the setting keys none of its stages."""


class PDDOnMTT(_Progressive, mtt.MTTConfig):
    base: Literal["mtt"] = "mtt"


class PDDOnFTD(_Progressive, ftd.FTDConfig):
    base: Literal["ftd"] = "ftd"


class PDDOnDATM(_Progressive, datm.DATMConfig):
    base: Literal["datm"] = "datm"


class PDDOnAST(_Progressive, ast.ASTConfig):
    base: Literal["ast"] = "ast"


class PDDOnDM(_Progressive, dm.DMConfig):
    base: Literal["dm"] = "dm"


class PDDOnDSA(_Progressive, dsa.DSAMatchConfig):
    base: Literal["dsa"] = "dsa"


class PDDOnDataDAM(_Progressive, datadam.DataDAMConfig):
    base: Literal["datadam"] = "datadam"


def _no_check(cfg: Any) -> None:
    """The base has no cross-field checks."""


class Base(NamedTuple):
    config: type[BaseModel]
    distill: Callable[..., SyntheticSet]
    check: Callable[[Any], None]
    experts: bool
    """It matches expert trajectories, which are regenerated between stages; False: an IDC-style
    (matching) base, whose stages are the whole chain."""
    class_major: bool
    """It returns the union class-major already (the matching loop puts each class's frozen images
    first in its block); False: [earlier stages; this stage's images], reordered here."""


BASES = {
    "mtt": Base(PDDOnMTT, mtt.distill, mtt.check, experts=True, class_major=False),
    "ftd": Base(PDDOnFTD, ftd.distill, ftd.check, experts=True, class_major=False),
    "datm": Base(PDDOnDATM, datm.distill, datm.check, experts=True, class_major=False),
    "ast": Base(PDDOnAST, ast.distill, ast.check, experts=True, class_major=False),
    "dm": Base(PDDOnDM, dm.distill, dm.check, experts=False, class_major=True),
    "dsa": Base(PDDOnDSA, dsa.distill, _no_check, experts=False, class_major=True),
    "datadam": Base(PDDOnDataDAM, datadam.distill, _no_check, experts=False, class_major=True),
}
CONFIG = Variants("base", {name: base.config for name, base in BASES.items()}, default="mtt")
"""PDD's settings: those of the base that ``base`` names, plus ``stages`` and ``synthetic_epochs``."""

UNLEARNED_LR = 0.01
"""The step size a stage records (:class:`Stages` holds one float per stage) when its base learns none
(the matching bases): the one DC, DSA, DM and IDC evaluate their sets at (``lr_net`` 0.01), and
``evaluate.baseline_lr``'s default, which ``evaluate.lr: learned`` gives a set without a learned step
size under the mtt recipe. ``evaluate.recipe: staged`` trains each such stage at it under
``evaluate.lr: learned``; a fixed ``evaluate.lr`` trains every stage at that instead."""

SEQUENTIAL = (
    "its stages run as a chain of jobs (the progressive stage), each distilled with the stages before"
    " it; its distill job only publishes the last one's set"
)
"""Why PDD does not shard (``compute.shards``)."""


def regenerates(method_cfg: Any) -> bool:
    """Whether PDD over this base regenerates experts between stages (a trajectory base), and so
    reads the experts' buffer; an IDC-style base reads none."""
    return BASES[method_cfg.base].experts


def stage_ipc(ipc: int, stages: int) -> int:
    """Images per class each stage adds."""
    return ipc // stages


def regenerated_epochs(cfg: Any) -> int:
    """Real-data epochs of a regenerated expert: as many as the next stage's matching reads."""
    return cfg.max_start_epoch + cfg.expert_epochs


def check(cfg: Any) -> None:
    """The base method's checks, and an IPC that splits evenly into the stages."""
    BASES[cfg.distill.base].check(cfg)
    if cfg.ipc % cfg.distill.stages:
        raise ValueError(
            f"ipc {cfg.ipc} does not split into distill.stages={cfg.distill.stages} equal stages: pick a"
            f" stage count that divides it"
        )


def class_major(images: torch.Tensor, num_classes: int, held_ipc: int, new_ipc: int) -> torch.Tensor:
    """The order that turns [earlier stages (class-major, ``held_ipc`` a class), this stage (class-major,
    ``new_ipc`` a class)] into one class-major set, each class's earlier images first."""
    held = torch.arange(num_classes * held_ipc).view(num_classes, held_ipc)
    new = num_classes * held_ipc + torch.arange(num_classes * new_ipc).view(num_classes, new_ipc)
    return torch.cat([held, new], dim=1).reshape(-1).to(images.device)


def distill_stage(
    inputs: DistillInputs, stage: int, checkpoints: Checkpoints, progress: Progress
) -> SyntheticSet:
    """Stage ``stage`` (1-based): the base method for IPC / P new images per class, the earlier stages
    (``inputs.frozen``, carrying their :class:`Stages`) leading the set (a trajectory base) or each
    class's block (a matching base); returns the union, class-major, with the stages so far, this one
    recorded at its learned step size or, for a base that learns none, :data:`UNLEARNED_LR`."""
    cfg = inputs.method_cfg
    base = BASES[cfg.base]
    new_ipc = stage_ipc(inputs.ipc, cfg.stages)
    frozen = inputs.frozen
    assert frozen is None or frozen.stages is not None, "an earlier stage's set carries its stages"
    held_ipc = 0 if frozen is None else frozen.stages.total
    run = replace(inputs, ipc=new_ipc, seed=derived_seed(inputs.seed, stage))
    result = base.distill(run, checkpoints, progress)
    if base.class_major:
        order = torch.arange(len(result.images), device=result.images.device)
    else:
        order = class_major(result.images, inputs.data.num_classes, held_ipc, new_ipc)
    ipcs, lrs = ((), ()) if frozen is None else (frozen.stages.ipc, frozen.stages.lrs)
    lr = UNLEARNED_LR if result.lr is None else float(result.lr)
    history = [] if frozen is None else list(frozen.history)
    return SyntheticSet(
        images=result.images[order],
        labels=result.labels[order],
        label_logits=None if result.label_logits is None else result.label_logits[order],
        lr=result.lr,
        history=history + [{**h, "stage": stage} for h in result.history],
        stats={**result.stats, "stage": stage},
        stages=Stages((*ipcs, new_ipc), (*lrs, lr)),
    )


def regenerate_expert(
    data: RealData,
    model_cfg: ModelConfig,
    experts_cfg: ExpertsConfig,
    dsa_cfg: DSAConfig,
    start: torch.Tensor,
    union: SyntheticSet,
    synthetic_epochs: int,
    real_epochs: int,
    seed: int,
    on_epoch: Callable[[int, float], None] | None = None,
) -> Trajectory:
    """Step 2 of the module docstring: from ``start`` (flat parameters), ``synthetic_epochs`` on the
    union by the evaluation recipe at its last stage's learned step size, then ``real_epochs`` on the
    real data by the experts' recipe; the trajectory's epoch 0 is the network after the union."""
    assert union.stages is not None, "a PDD stage's set carries its stages"
    model = student_model(data, model_cfg, seed)
    flat = FlatParams(model)
    flat.load_into(start.to(data.device))
    recipe = Recipe(
        epochs=synthetic_epochs,
        lr=union.stages.lrs[-1],
        batch_size=SYNTHETIC_BATCH,
        momentum=0.9,
        weight_decay=5e-4,
        dsa=dsa_cfg,
    )
    generator = torch.Generator().manual_seed(seed)
    fit(model, union.images.to(data.device), union.labels.to(data.device), recipe, generator)
    real = experts_cfg.model_copy(update={"epochs": real_epochs, "schedule": None})
    return train_expert(data, model_cfg, real, dsa_cfg, seed, on_epoch, start=flat.flatten())


@register_method("pdd", config=CONFIG, needs=("progressive",), check=check, shards=SEQUENTIAL)
def distill(inputs: DistillInputs, checkpoints: Checkpoints, progress: Progress) -> SyntheticSet:
    """The distill job's part: the stages ran as jobs of their own (the ``progressive`` stage), and
    the last one's set, handed over as ``inputs.frozen``, is the distilled set. It reads no experts
    itself: the stages that match or regenerate them read them (:func:`regenerates`)."""
    if inputs.frozen is None or inputs.frozen.stages is None:
        raise ValueError("pdd's stages run in the progressive stage: run pdd through the pipeline")
    return inputs.frozen
