"""The relabel stage (stored labels, FKD/SRe2L): for every evaluation epoch (or ``relabel.stored_epochs``
of them, replayed cyclically), each image's crop box and flip, the batch's CutMix and the teacher's
top-k probabilities (float16/32 or ``relabel.quantize: uint8``), so students train without the
teacher. Runs only when ``evaluate.recipe: kd`` with ``relabel.mode: stored``."""

from __future__ import annotations

from typing import Any

from condense import artifacts, relabel
from condense.config import PipelineConfig, keyed
from condense.errors import ConfigError
from condense.stages.base import Context, Params, Stage
from condense.store import disk_bytes


def check_top_k(cfg: PipelineConfig, num_classes: int) -> None:
    if cfg.relabel.top_k is not None and cfg.relabel.top_k > num_classes:
        raise ConfigError(f"relabel.top_k {cfg.relabel.top_k} exceeds the number of classes ({num_classes})")


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


def run(ctx: Context) -> dict[str, Any]:
    cfg, data = ctx.cfg, ctx.data()
    check_top_k(cfg, data.num_classes)
    distill_key = str(ctx.keys["distill"])
    synthetic = artifacts.load_synthetic(ctx.store, distill_key)
    arrays = relabel.relabel(
        artifacts.load_teacher(ctx.store, str(ctx.keys["teacher"])).to(ctx.device),
        synthetic.images.to(ctx.device),
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
    )
    artifacts.save_stored_labels(ctx.work, arrays)
    return {
        "epochs": cfg.evaluate.epochs,
        "stored_epochs": int(arrays["order"].shape[0]),
        "top_k": cfg.relabel.top_k or data.num_classes,
        "quantize": cfg.relabel.quantize,
        "label_bytes": int(sum(a.nbytes for a in arrays.values())),
        "label_disk_bytes": disk_bytes(ctx.work / artifacts.STORED_LABELS),
        "image_bytes": int(synthetic.images.numel()),  # uint8 pixels, as exported
    }


STAGE = Stage(
    name="relabel",
    run=run,
    config=config,
    reads=lambda cfg, params: ("dataset", "distill", "teacher"),
)
