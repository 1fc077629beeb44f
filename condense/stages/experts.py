"""The experts stage: MTT's buffer of expert training trajectories, one part (job) per expert.

Each part trains one expert and writes its trajectory into the shared buffer (a zarr array chunked
per snapshot), so experts can train in parallel, on several machines, and a killed run keeps every
expert it finished. Sealing names the teacher candidate: the expert that fits the train set best.
With ``experts.schedule`` on the stage also reads the difficulty stage (PAD's easy-to-hard order).
"""

from __future__ import annotations

import os
import shutil
import uuid
from typing import Any

import zarr

from condense import difficulty, models
from condense.artifacts import BUFFER, create_buffer, expert_chunks
from condense.config import PipelineConfig, keyed
from condense.experts import expert_seed, train_expert
from condense.stages.base import Context, Params, Stage

BUFFER_META = f"{BUFFER}/zarr.json"
GSAM_FIELDS = {"rho", "gsam_alpha", "adaptive"}


def config(cfg: PipelineConfig, params: Params) -> dict[str, Any]:
    # GSAM's settings shape plain-SGD experts not at all: they stay out of an SGD expert's key.
    unused = GSAM_FIELDS if cfg.experts.optimizer == "sgd" else set()
    experts = keyed(cfg.experts, exclude=unused)
    section = {"experts": experts, "model": keyed(cfg.model), "seed": cfg.seed}
    if cfg.experts.dsa:
        section["dsa"] = keyed(cfg.dsa)
    return section


def reads(cfg: PipelineConfig, params: Params) -> tuple[str, ...]:
    return ("dataset", difficulty.STAGE) if cfg.experts.schedule is not None else ("dataset",)


def open_buffer(ctx: Context, snapshots: int) -> zarr.Array:
    """The shared buffer of ``snapshots`` per expert, created by whichever part gets there first (on
    any machine)."""
    ctx.pull(BUFFER_META)
    path = ctx.work / BUFFER
    if not path.exists():
        data = ctx.data()
        net = models.build_model(
            models.CONVNET, data.channels, data.num_classes, data.resolution, ctx.cfg.model
        )
        tmp = path.with_name(f".{uuid.uuid4().hex}.tmp")
        create_buffer(tmp, ctx.cfg.experts.num_experts, snapshots, models.FlatParams(net).numel)
        try:
            os.rename(tmp, path)
        except OSError:  # another part created it first
            shutil.rmtree(tmp, ignore_errors=True)
        ctx.share(BUFFER_META)
    return zarr.open_array(str(path), mode="r+", zarr_format=3)


def record_expert(ctx: Context, index: int) -> dict[str, Any]:
    """Train expert ``index`` and write its trajectory into the buffer."""
    cfg = ctx.cfg
    buffer = open_buffer(ctx, cfg.experts.epochs + 1)
    order = None
    if cfg.experts.schedule is not None:
        order = difficulty.load_order(ctx.store, str(ctx.keys[difficulty.STAGE]), ctx.device)
    trajectory = train_expert(
        ctx.data(),
        cfg.model,
        cfg.experts,
        cfg.dsa,
        expert_seed(cfg.seed, index),
        on_epoch=lambda e, loss: ctx.progress.step(e, cfg.experts.epochs, f"expert {index} loss {loss:.4f}"),
        compile_step=ctx.compile_step,
        order=order,
    )
    buffer[index] = trajectory.params
    ctx.share(expert_chunks(index))
    ctx.progress.note(
        f"expert {index}: train {trajectory.train_accuracy:.1f}% test {trajectory.test_accuracy:.1f}%"
    )
    return {
        "index": index,
        "train_loss": trajectory.train_loss,
        "epoch_sizes": trajectory.epoch_sizes,
        "train_accuracy": trajectory.train_accuracy,
        "test_accuracy": trajectory.test_accuracy,
    }


def seal(ctx: Context) -> dict[str, Any]:
    """Every expert is in the buffer; the teacher candidate is the best fit to the train set."""
    return {"teacher": max(ctx.parts, key=lambda r: r["train_accuracy"])["index"]}


STAGE = Stage(
    name="experts",
    run=seal,
    config=config,
    reads=reads,
    parts=lambda cfg, params: cfg.experts.num_experts,
    run_part=record_expert,
    resumable=True,
)
