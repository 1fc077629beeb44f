"""The distill stage: run the configured method, resuming from its checkpoint after a crash.

The method is looked up in the registry; its module (and everything that module imports) is this
stage's code beyond its own, so an edit to one method re-keys that method's sets and no other's.

With ``compute.shards`` above 1 a shardable method's work is cut into that many parts (ranges of
classes or IPC indices, :class:`condense.methods.Sharding`): each is a job of its own (cached,
resumable from its own checkpoint, on the devices in turn), saved in the work folder as a partial
set, and the stage's own job merges them into the one set the next stages read (and does what
follows a method's shardable prefix, CUDD's later curricula). The merge equals
the unsharded set byte for byte, so the shard count is in no key: a set distilled with 4 shards is
found by a run asking for 1. Parts cut another way (the count changed between a kill and the rerun)
carry other labels and are not mistaken for these.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from condense import artifacts
from condense.config import PipelineConfig, keyed
from condense.errors import ConfigError
from condense.methods import Sharding, get_method
from condense.methods.base import DistillInputs
from condense.prepare import input_std
from condense.stages.base import Context, Params, Stage
from condense.synthetic import SyntheticSet

SHARD = "shard-{}.pt"


def sharding(cfg: PipelineConfig) -> Sharding | None:
    """How this run's distillation splits, or None when it runs as one job; refuses, in one line and
    before any work, a shard count the method cannot take."""
    method = get_method(cfg.method)
    if cfg.compute.shard_count() == 1:
        return None
    if isinstance(method.shards, str):  # refused when the config was built; here for a hand-made one
        raise ConfigError(f"method {cfg.method} cannot be sharded ({method.shards}): set compute.shards=1")
    return method.shards


def check_shards(cfg: PipelineConfig, num_classes: int) -> None:
    """More shards than units of work would leave a shard nothing to do: refused before any work."""
    split = sharding(cfg)
    if split is None:
        return
    units = split.units(num_classes, cfg.ipc, cfg.distill)
    if cfg.compute.shard_count() > units:
        what = f"{num_classes} classes" if split.unit == "class" else f"IPC {cfg.ipc}"
        if split.prefix is not None:
            what = f"the first {units} IPC indices; the rest follows the merge"
        raise ConfigError(
            f"compute.shards {cfg.compute.shard_count()} exceeds the {cfg.method} distillation's units "
            f"({what}, split by {split.unit}): use at most {units}"
        )


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
    return ("dataset", *(name for name in ("experts", "teacher", "progressive") if name in method.needs))


def _inputs(ctx: Context) -> DistillInputs:
    cfg, keys = ctx.cfg, ctx.keys
    return DistillInputs(
        data=ctx.data(),
        ipc=cfg.ipc,
        seed=cfg.seed,
        method_cfg=cfg.distill,
        model_cfg=cfg.model,
        dsa_cfg=cfg.dsa,
        experts=artifacts.load_buffer(ctx.store, str(keys["experts"])) if "experts" in keys else None,
        teacher=artifacts.load_teacher(ctx.store, str(keys["teacher"])).to(ctx.device)
        if "teacher" in keys
        else None,
        # PDD: the last stage's set, which the stages before it made (the progressive stage).
        frozen=artifacts.load_synthetic(ctx.store, _last(keys["progressive"]), "progressive")
        if "progressive" in keys
        else None,
    )


def _last(keys: str | list[str]) -> str:
    return keys if isinstance(keys, str) else keys[-1]


def run_shard(ctx: Context, index: int) -> dict[str, Any]:
    """Shard ``index``: the method on its range of units, saved as a partial set in the work folder."""
    split = sharding(ctx.cfg)
    assert split is not None and ctx.part is not None  # parts exist only for a sharded run
    inputs = _inputs(ctx)
    count = split.units(inputs.data.num_classes, inputs.ipc, inputs.method_cfg)
    units = split.ranges(count, ctx.cfg.compute.shard_count())[index]
    part = get_method(ctx.cfg.method).compute(replace(inputs, units=units), ctx.checkpoints(), ctx.progress)
    name = SHARD.format(ctx.part)
    fields = {"images": part.images.detach().cpu(), "labels": part.labels.cpu()}
    torch.save({**fields, "history": part.history, "stats": part.stats}, ctx.work / name)
    ctx.share(name)
    return {"shard": ctx.part, "units": [units.start, units.stop], "unit": split.unit}


def _load_shard(ctx: Context, record: dict[str, Any]) -> SyntheticSet:
    saved = torch.load(ctx.work / SHARD.format(record["shard"]), map_location="cpu", weights_only=True)
    return SyntheticSet(
        images=saved["images"], labels=saved["labels"], history=saved["history"], stats=saved["stats"]
    )


def run(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    inputs = _inputs(ctx)
    method = get_method(cfg.method)
    if ctx.parts:  # the shards' partial sets, merged in unit order
        split = sharding(cfg)
        assert split is not None
        parts = [_load_shard(ctx, record) for record in ctx.parts]
        result = split.join(inputs, parts, ctx.checkpoints(), ctx.progress)
        for partial in ctx.work.glob(SHARD.format("*")):  # these, and any cut another way
            partial.unlink()
    else:
        result = method.distill(inputs, ctx.checkpoints(), ctx.progress)
    data = inputs.data
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
    parts=lambda cfg, params: cfg.compute.shard_count() if sharding(cfg) is not None else 0,
    run_part=run_shard,
    part_label=lambda cfg, i: f"{i + 1}of{cfg.compute.shard_count()}",
    label=lambda cfg, params: cfg.method,
)
