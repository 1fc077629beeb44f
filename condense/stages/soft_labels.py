"""The soft-labels stage: the teacher's softmax at temperature T on every synthetic image (exported
with the set; MTT-recipe evaluation with ``labels: soft`` trains on them)."""

from __future__ import annotations

from typing import Any

from condense import artifacts, labels
from condense.config import PipelineConfig, keyed
from condense.stages.base import Context, Params, Stage


def run(ctx: Context) -> dict[str, Any]:
    model = artifacts.load_teacher(ctx.store, str(ctx.keys["teacher"])).to(ctx.device)
    synthetic = artifacts.load_synthetic(ctx.store, str(ctx.keys["distill"]))
    probs = labels.soft_labels(model, synthetic.images, ctx.cfg.soft_labels.temperature).cpu()
    artifacts.save_soft_labels(ctx.work, probs)
    # The teacher's agreement with the hard labels is a sanity check of the set.
    return {"teacher_agreement": float((probs.argmax(1) == synthetic.labels).float().mean() * 100)}


def config(cfg: PipelineConfig, params: Params) -> dict[str, Any]:
    return keyed(cfg.soft_labels)


STAGE = Stage(name="soft_labels", run=run, config=config, reads=lambda cfg, params: ("distill", "teacher"))
