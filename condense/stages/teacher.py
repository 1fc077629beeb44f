"""The teacher stage: train the teacher (on several processes with ``compute.data_parallel``), take
the best expert, or load a user's state_dict (of a ConvNet, a timm model or a ``torchvision:`` model;
the architecture's name is part of the key).

The stored meta describes the network (architecture, shape, classes), so readers rebuild it without
any of the code here (:func:`condense.artifacts.load_teacher`).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

from condense import artifacts, devices, models, prepare, teacher, training
from condense.config import ModelConfig, PipelineConfig, keyed
from condense.errors import ConfigError
from condense.stages.base import Context, Params, Stage


def architecture(cfg: PipelineConfig) -> tuple[str, ModelConfig]:
    """(arch, ConvNet config) of the teacher: the experts' ConvNet, or the teacher section's."""
    if cfg.teacher.source == "best_expert":
        return models.CONVNET, cfg.model
    return cfg.teacher.arch, teacher.teacher_model_config(cfg.teacher, cfg.model)


def _file_digest(path: str) -> str:
    target = Path(path).expanduser()
    if not target.is_file():
        raise ConfigError(f"teacher file not found: {target}")
    return hashlib.sha256(target.read_bytes()).hexdigest()


def config(cfg: PipelineConfig, params: Params) -> dict[str, Any]:
    t = cfg.teacher
    arch, model_cfg = architecture(cfg)
    section: dict[str, Any] = {"source": t.source, "arch": arch, "model": keyed(model_cfg)}
    if t.source == "train":
        section.update(keyed(t, exclude={"path", "source"}), seed=cfg.seed)
        if t.dsa:
            section["dsa"] = keyed(cfg.dsa)
    elif t.source == "file":
        section["file"] = _file_digest(t.path or "")  # the weights' content, not where they are
    return section


def reads(cfg: PipelineConfig, params: Params) -> tuple[str, ...]:
    return ("dataset", "experts") if cfg.teacher.source == "best_expert" else ("dataset",)


def run(ctx: Context) -> dict[str, Any]:
    cfg, data = ctx.cfg, ctx.data()
    arch, model_cfg = architecture(cfg)
    meta: dict[str, Any] = {"source": cfg.teacher.source, "arch": arch}
    if cfg.teacher.source == "best_expert":
        best = ctx.meta("experts")["teacher"]
        final = artifacts.load_buffer(ctx.store, str(ctx.keys["experts"])).snapshot(best, cfg.experts.epochs)
        net = models.build_model(models.CONVNET, data.channels, data.num_classes, data.resolution, cfg.model)
        model = models.FlatParams(net).load_into(final).to(ctx.device)
        meta["expert"] = best
    elif cfg.teacher.source == "train":
        ranks = devices.data_parallel(cfg.compute.data_parallel, cfg.compute.devices, ctx.device)
        if len(ranks) > 1:
            ctx.progress.note(f"training the teacher data-parallel on {', '.join(ranks)}")
            load_data = functools.partial(prepare.load_once, ctx.store, str(ctx.keys["dataset"]), cfg.dataset)
            trained = teacher.train_teacher_data_parallel(
                load_data, cfg.teacher, cfg.model, cfg.dsa, cfg.seed, ranks, ctx.progress
            )
        else:
            trained = teacher.train_teacher(
                data, cfg.teacher, cfg.model, cfg.dsa, cfg.seed, ctx.progress, ctx.compile_step
            )
        model = trained.model
    else:
        built = models.build_model(arch, data.channels, data.num_classes, data.resolution, model_cfg)
        model = teacher.load_teacher_file(cfg.teacher.path or "", built, arch).to(ctx.device)
    meta["network"] = artifacts.teacher_description(arch, model_cfg, data.card)
    meta["train_accuracy"] = training.split_accuracy(model, data, "train")
    meta["test_accuracy"] = training.split_accuracy(model, data, "test")
    ctx.progress.note(f"teacher ({arch}, {meta['source']}): test {meta['test_accuracy']:.1f}%")
    artifacts.save_teacher(ctx.work, model)
    return meta


STAGE = Stage(name="teacher", run=run, config=config, reads=reads)
