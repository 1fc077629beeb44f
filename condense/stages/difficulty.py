"""The difficulty stage: every training image's EL2N score and, per class, the training indices from
easy to hard (PAD's difficulty-ordered expert data; :mod:`condense.difficulty`). Planned only when
``experts.schedule`` is on: the experts stage reads it then, nothing otherwise."""

from __future__ import annotations

from typing import Any

from condense import difficulty
from condense.config import PipelineConfig, keyed
from condense.errors import ConfigError
from condense.stages.base import Context, Params, Stage


def config(cfg: PipelineConfig, params: Params) -> dict[str, Any]:
    # Only what shapes the scores: the scoring networks and the SGD recipe they train with, not the
    # experts' count, epochs, optimizer or the schedule's phases (those re-key the experts alone).
    schedule = cfg.experts.schedule
    if schedule is None:
        raise ConfigError("the difficulty stage needs experts.schedule")
    section = {
        "el2n": {"models": schedule.el2n_models, "epochs": schedule.el2n_epochs},
        "recipe": keyed(cfg.experts, include={"lr", "momentum", "weight_decay", "batch_size", "dsa"}),
        "model": keyed(cfg.model),
        "seed": cfg.seed,
    }
    if cfg.experts.dsa:
        section["dsa"] = keyed(cfg.dsa)
    return section


def run(ctx: Context) -> dict[str, Any]:
    cfg, data = ctx.cfg, ctx.data()
    schedule = cfg.experts.schedule
    assert schedule is not None  # config() refused to key it otherwise
    scores = difficulty.el2n_scores(
        data,
        cfg.model,
        cfg.experts,
        schedule,
        cfg.dsa,
        cfg.seed,
        on_model=lambda i: ctx.progress.step(i, schedule.el2n_models, "EL2N scoring network"),
    )
    order = difficulty.difficulty_order(scores, data.train_y, data.num_classes)
    difficulty.save_order(ctx.work, scores, order)
    per_class = [scores[run].mean().item() for run in order.by_class()]
    ctx.progress.note(f"EL2N: mean {scores.mean().item():.3f} over {len(scores)} training images")
    return {"mean_score": float(scores.mean()), "class_mean_scores": per_class, "class_counts": order.counts}


STAGE = Stage(name=difficulty.STAGE, run=run, config=config, reads=lambda cfg, params: ("dataset",))
