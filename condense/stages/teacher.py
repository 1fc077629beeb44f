"""The teacher stage: train the teacher (on several processes with ``compute.data_parallel``), take
the best expert, or load a user's state_dict (of a ConvNet, a timm model or a ``torchvision:`` model;
the architecture's name is part of the key).

With ``teacher.ensemble`` each further architecture is a part of the stage, one job each (cached and
kept across a kill like an expert, on the devices in turn), trained with the section's recipe; the
stage's own job makes the first teacher as above and stores all of them as one
:class:`condense.artifacts.Ensemble` (the mean of their logits), which every reader gets as the
teacher. Without it the stage has no parts and stores one network, as it always did.

The stored meta describes the network (architecture, shape, classes; an ensemble's members), so
readers rebuild it without any of the code here (:func:`condense.artifacts.load_teacher`).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from condense import artifacts, devices, models, prepare, teacher, training
from condense.config import ModelConfig, PipelineConfig, TeacherConfig, keyed
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


MEMBER = "member-{}.pt"


def config(cfg: PipelineConfig, params: Params) -> dict[str, Any]:
    t = cfg.teacher
    arch, model_cfg = architecture(cfg)
    section: dict[str, Any] = {"source": t.source, "arch": arch, "model": keyed(model_cfg)}
    if t.source == "train" or t.ensemble:  # the recipe of whatever is trained here
        section.update(keyed(t, exclude={"path", "source", "arch"}), seed=cfg.seed)
        if t.dsa:
            section["dsa"] = keyed(cfg.dsa)
    if t.source == "file":
        section["file"] = _file_digest(t.path or "")  # the weights' content, not where they are
    return section


def reads(cfg: PipelineConfig, params: Params) -> tuple[str, ...]:
    return ("dataset", "experts") if cfg.teacher.source == "best_expert" else ("dataset",)


def _trained(ctx: Context, section: TeacherConfig, seed: int) -> nn.Module:
    """A network trained on all real training images with ``section``'s recipe (data-parallel when
    ``compute.data_parallel`` asks for it)."""
    cfg = ctx.cfg
    ranks = devices.data_parallel(cfg.compute.data_parallel, cfg.compute.devices, ctx.device)
    if len(ranks) > 1:
        ctx.progress.note(f"training {section.arch} data-parallel on {', '.join(ranks)}")
        load_data = functools.partial(prepare.load_once, ctx.store, str(ctx.keys["dataset"]), cfg.dataset)
        trained = teacher.train_teacher_data_parallel(
            load_data, section, cfg.model, cfg.dsa, seed, ranks, ctx.progress
        )
    else:
        trained = teacher.train_teacher(
            ctx.data(), section, cfg.model, cfg.dsa, seed, ctx.progress, ctx.compile_step
        )
    return trained.model


def member_section(cfg: PipelineConfig, index: int) -> TeacherConfig:
    """The recipe of ensemble member ``index``: the teacher section's, with the member's architecture."""
    return cfg.teacher.model_copy(
        update={"source": "train", "arch": cfg.teacher.ensemble[index], "ensemble": []}
    )


def member_seed(seed: int, index: int) -> int:
    """Member ``index``'s initialisation and draws: never the first teacher's (``seed``), so two
    members of one architecture are two networks."""
    return seed * 1000 + 1 + index


def _member_network(cfg: PipelineConfig, index: int, card: dict[str, Any]) -> dict[str, Any]:
    section = member_section(cfg, index)
    return artifacts.teacher_description(section.arch, teacher.teacher_model_config(section, cfg.model), card)


def train_member(ctx: Context, index: int) -> dict[str, Any]:
    """Part ``index``: ensemble member ``index`` trained, its weights left in the work folder."""
    cfg, data = ctx.cfg, ctx.data()
    section = member_section(cfg, index)
    model = _trained(ctx, section, member_seed(cfg.seed, index))
    name = MEMBER.format(ctx.part)
    torch.save({k: t.detach().cpu() for k, t in model.state_dict().items()}, ctx.work / name)
    ctx.share(name)
    record = {
        "arch": section.arch,
        "train_accuracy": training.split_accuracy(model, data, "train"),
        "test_accuracy": training.split_accuracy(model, data, "test"),
    }
    ctx.progress.note(
        f"teacher ensemble member {index + 1} ({section.arch}): test {record['test_accuracy']:.1f}%"
    )
    return record


def member_label(cfg: PipelineConfig, index: int) -> str:
    return f"{index + 1}of{len(cfg.teacher.ensemble)}"


def _ensemble(ctx: Context, first: nn.Module, meta: dict[str, Any]) -> nn.Module:
    """The first teacher and the parts' members as one :class:`artifacts.Ensemble`, its description
    and each member's accuracies in ``meta``; the members' files then removed."""
    cfg, data = ctx.cfg, ctx.data()
    descriptions, nets, members = [meta["network"]], [first], [{"arch": meta["arch"]}]
    for index, record in enumerate(ctx.parts):
        description = _member_network(cfg, index, data.card)
        net = artifacts.teacher_network(description)
        path = ctx.work / MEMBER.format(member_label(cfg, index))
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        descriptions.append(description)
        nets.append(net.to(ctx.device).eval())
        members.append(record)
    members[0].update(
        train_accuracy=training.split_accuracy(first, data, "train"),
        test_accuracy=training.split_accuracy(first, data, "test"),
    )
    for leftover in ctx.work.glob(MEMBER.format("*")):  # these, and any of another ensemble
        leftover.unlink()
    meta["network"] = artifacts.ensemble_description(descriptions)
    meta["members"] = members
    return artifacts.Ensemble(nets)


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
        model = _trained(ctx, cfg.teacher, cfg.seed)
    else:
        built = models.build_model(arch, data.channels, data.num_classes, data.resolution, model_cfg)
        model = teacher.load_teacher_file(cfg.teacher.path or "", built, arch).to(ctx.device)
    meta["network"] = artifacts.teacher_description(arch, model_cfg, data.card)
    if ctx.parts:
        model = _ensemble(ctx, model, meta)
    meta["train_accuracy"] = training.split_accuracy(model, data, "train")
    meta["test_accuracy"] = training.split_accuracy(model, data, "test")
    what = f"ensemble of {len(ctx.parts) + 1}" if ctx.parts else arch
    ctx.progress.note(f"teacher ({what}, {meta['source']}): test {meta['test_accuracy']:.1f}%")
    artifacts.save_teacher(ctx.work, model)
    return meta


STAGE = Stage(
    name="teacher",
    run=run,
    config=config,
    reads=reads,
    parts=lambda cfg, params: len(cfg.teacher.ensemble),
    run_part=train_member,
    part_label=member_label,
)
