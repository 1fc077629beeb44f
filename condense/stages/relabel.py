"""The relabel stage (stored labels, FKD/SRe2L): for every evaluation epoch (or ``relabel.stored_epochs``
of them, replayed cyclically), each image's crop box and flip, the batch's CutMix and the teacher's
top-k probabilities (float16/32 or ``relabel.quantize: uint8``), so students train without the
teacher. Runs only when ``evaluate.recipe: kd`` with ``relabel.mode: stored``.

With ``compute.shards`` above 1 the stored epochs are cut into that many ranges, each a job of its
own (its teacher forwards only; the plans before its range are redrawn, cheaply, so the seeded stream
is where the whole run has it), joined along the epoch axis into the whole run's arrays, byte for
byte: the count is in no key."""

from __future__ import annotations

from typing import Any

import numpy as np

from condense import artifacts, relabel
from condense.config import PipelineConfig, keyed
from condense.errors import ConfigError
from condense.methods import Sharding
from condense.stages.base import Context, Params, Stage
from condense.store import disk_bytes

SHARD = "labels-{}.npz"


def check_top_k(cfg: PipelineConfig, num_classes: int) -> None:
    if cfg.relabel.top_k is not None and cfg.relabel.top_k > num_classes:
        raise ConfigError(f"relabel.top_k {cfg.relabel.top_k} exceeds the number of classes ({num_classes})")


def _epochs(cfg: PipelineConfig) -> int:
    return relabel.stored_epoch_count(cfg.evaluate.epochs, cfg.relabel.stored_epochs)


def shards(cfg: PipelineConfig, params: Params | None = None) -> int:
    """Jobs the stored relabeling splits into: ``compute.shards`` (0: one job, no parts)."""
    count = cfg.compute.shard_count()
    if count > _epochs(cfg):
        raise ConfigError(
            f"compute.shards {count} exceeds the {_epochs(cfg)} stored epochs relabeling splits into"
        )
    return count if count > 1 else 0


def config(cfg: PipelineConfig, params: Params) -> dict[str, Any]:
    """Everything that shapes the labels: augmentation, temperature, batches, epochs, and the whole
    ``relabel`` section (top-k, fp16, quantize, stored_epochs: a new field changes the key)."""
    return {
        "kd": keyed(cfg.evaluate.kd),
        "relabel": keyed(cfg.relabel),
        "epochs": cfg.evaluate.epochs,
        "batch_size": cfg.evaluate.batch_size,
        "seed": cfg.seed,
    }


def _labels(ctx: Context, shard: range | None = None) -> dict[str, np.ndarray]:
    cfg = ctx.cfg
    check_top_k(cfg, ctx.data().num_classes)
    distill_key = str(ctx.keys["distill"])
    return relabel.relabel(
        artifacts.load_teacher(ctx.store, str(ctx.keys["teacher"])).to(ctx.device),
        artifacts.load_synthetic(ctx.store, distill_key).images.to(ctx.device),
        relabel.KDAugment.from_config(cfg.evaluate.kd, artifacts.stitch_factor(ctx.store, distill_key)),
        cfg.evaluate.epochs,
        cfg.evaluate.batch_size,
        cfg.evaluate.kd.temperature,
        cfg.relabel.top_k,
        cfg.relabel.fp16,
        cfg.seed,
        ctx.progress,
        quantize=cfg.relabel.quantize,
        stored_epochs=cfg.relabel.stored_epochs,
        shard=shard,
    )


def run_shard(ctx: Context, index: int) -> dict[str, Any]:
    """Shard ``index``: its range of stored epochs, saved in the work folder until the merge."""
    assert ctx.part is not None
    epochs = Sharding.ranges(_epochs(ctx.cfg), shards(ctx.cfg))[index]
    name = SHARD.format(ctx.part)
    np.savez(ctx.work / name, **_labels(ctx, epochs))
    ctx.share(name)
    return {"shard": ctx.part, "epochs": [epochs.start, epochs.stop]}


def _joined(ctx: Context) -> dict[str, np.ndarray]:
    """The shards' arrays, joined along the epoch axis (their files then removed)."""
    parts = []
    for record in ctx.parts:
        with np.load(ctx.work / SHARD.format(record["shard"])) as saved:
            parts.append({name: saved[name] for name in saved.files})
    for partial in ctx.work.glob(SHARD.format("*")):  # these, and any cut another way
        partial.unlink()
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def run(ctx: Context) -> dict[str, Any]:
    cfg, data = ctx.cfg, ctx.data()
    arrays = _joined(ctx) if ctx.parts else _labels(ctx)
    artifacts.save_stored_labels(ctx.work, arrays)
    synthetic = artifacts.load_synthetic_arrays(ctx.store, str(ctx.keys["distill"]))
    return {
        "epochs": cfg.evaluate.epochs,
        "stored_epochs": int(arrays["order"].shape[0]),
        "top_k": cfg.relabel.top_k or data.num_classes,
        "quantize": cfg.relabel.quantize,
        "label_bytes": int(sum(a.nbytes for a in arrays.values())),
        "label_disk_bytes": disk_bytes(ctx.work / artifacts.STORED_LABELS),
        "image_bytes": int(synthetic["images"].size),  # uint8 pixels, as exported
    }


STAGE = Stage(
    name="relabel",
    run=run,
    config=config,
    reads=lambda cfg, params: ("dataset", "distill", "teacher"),
    parts=shards,
    run_part=run_shard,
    part_label=lambda cfg, i: f"{i + 1}of{shards(cfg)}",
)
