"""The distill stage: run the configured method, resuming from its checkpoint after a crash.

The method is looked up in the registry; its module (and everything that module imports) is this
stage's code beyond its own, so an edit to one method re-keys that method's sets and no other's.
"""

from __future__ import annotations

from typing import Any

from condense import artifacts
from condense.config import PipelineConfig, keyed
from condense.methods import get_method
from condense.methods.base import DistillInputs
from condense.prepare import input_std
from condense.stages.base import Context, Params, Stage


def config(cfg: PipelineConfig, params: Params) -> dict[str, Any]:
    return {
        "method": cfg.method,
        "distill": keyed(cfg.distill),
        "ipc": cfg.ipc,
        "seed": cfg.seed,
        "model": keyed(cfg.model),
        "dsa": keyed(cfg.dsa),
    }


def reads(cfg: PipelineConfig, params: Params) -> tuple[str, ...]:
    method = get_method(cfg.method)
    return ("dataset", *(name for name in ("experts", "teacher") if name in method.needs))


def run(ctx: Context) -> dict[str, Any]:
    cfg, data = ctx.cfg, ctx.data()
    method = get_method(cfg.method)
    keys = ctx.keys
    result = method.distill(
        DistillInputs(
            data=data,
            ipc=cfg.ipc,
            seed=cfg.seed,
            method_cfg=cfg.distill,
            model_cfg=cfg.model,
            dsa_cfg=cfg.dsa,
            experts=artifacts.load_buffer(ctx.store, str(keys["experts"])) if "experts" in keys else None,
            teacher=artifacts.load_teacher(ctx.store, str(keys["teacher"])).to(ctx.device)
            if "teacher" in keys
            else None,
        ),
        ctx.checkpoints(),
        ctx.progress,
    )
    artifacts.save_synthetic(ctx.work, result, data.to_pixels(result.images))
    return {
        "lr": result.lr,
        "method": cfg.method,
        "ipc": cfg.ipc,
        "stats": result.stats,
        # A set far from the data's scale trains BatchNorm statistics that test images do not have.
        "input_std": input_std(data, result.images),
    }


STAGE = Stage(
    name="distill",
    run=run,
    config=config,
    reads=reads,
    code=lambda cfg: (get_method(cfg.method).module,),
    resumable=True,
    label=lambda cfg, params: cfg.method,
)
