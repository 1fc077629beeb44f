"""The progressive stage: PDD's stages (:mod:`condense.methods.pdd`) as a chain of jobs.

Its instances alternate: stage 1's set, the experts regenerated from it, stage 2's set, ..., stage
P's set. A stage's set reads the set before it and the experts regenerated from that set; the
regenerated experts read the set they trained on and the buffer whose first snapshots they start
from. Each link is its own artifact, keyed by the links it reads, so changing stage 3's settings
reuses stages 1 and 2, and each regenerated expert is a part job of its own (on the devices in turn,
resumable, in parallel on a cluster). The distill job of a ``pdd`` run reads the last link.

Over a base without experts (an IDC-style matching base: dm, dsa, datadam) the chain is the sets alone:
stage k's set reads stage k-1's, no link reads or regenerates experts, and the experts stage is not
planned (:func:`condense.methods.pdd.regenerates`).
"""

from __future__ import annotations

from typing import Any

from condense import artifacts
from condense.config import PipelineConfig, keyed
from condense.methods import get_method, pdd
from condense.methods.base import DistillInputs
from condense.prepare import input_std
from condense.stages.base import Context, Params, Stage
from condense.stages.experts import open_buffer
from condense.training import derived_seed

NAME = "progressive"
SET, EXPERTS = "set", "experts"


def instances(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """[stage 1's set, its regenerated experts, stage 2's set, ..., stage P's set], or the sets alone
    over a base without experts; none unless pdd."""
    if cfg.method != "pdd":
        return []
    links = []
    for stage in range(1, cfg.distill.stages + 1):
        links.append({"stage": stage, "link": SET})
        if stage < cfg.distill.stages and pdd.regenerates(cfg.distill):
            links.append({"stage": stage, "link": EXPERTS})
    return links


def position(cfg: PipelineConfig, stage: int, link: str) -> int:
    """Where a link is in :func:`instances`."""
    per_stage = 2 if pdd.regenerates(cfg.distill) else 1
    return per_stage * (stage - 1) + (link == EXPERTS)


def earlier(cfg: PipelineConfig, params: Params) -> list[int]:
    """A set reads [the set before it, the experts regenerated from that] (only the set before it over
    a base without experts); regenerated experts read [the set they train on, and after stage 1 the
    regenerated buffer they start from]."""
    stage = params["stage"]
    if params["link"] == SET:
        if stage == 1:
            return []
        regenerated = [position(cfg, stage - 1, EXPERTS)] if pdd.regenerates(cfg.distill) else []
        return [position(cfg, stage - 1, SET), *regenerated]
    return [position(cfg, stage, SET)] + ([position(cfg, stage - 1, EXPERTS)] if stage > 1 else [])


def reads(cfg: PipelineConfig, params: Params) -> tuple[str, ...]:
    """The dataset, and the experts' buffer when the base matches (and regenerates) trajectories."""
    return ("dataset", "experts") if pdd.regenerates(cfg.distill) else ("dataset",)


def config(cfg: PipelineConfig, params: Params) -> dict[str, Any]:
    # A stage's set is shaped by the experts it matched (an input key), not by how long they trained
    # on the earlier images: changing that regenerates the experts and what follows, not stage 1.
    # Without experts to regenerate, the setting shapes nothing.
    unused = {"synthetic_epochs"} if params["link"] == SET else set()
    section = {
        "distill": keyed(cfg.distill, exclude=unused),
        "ipc": cfg.ipc,
        "seed": cfg.seed,
        "model": keyed(cfg.model),
        "dsa": keyed(cfg.dsa),
        **params,
    }
    if params["link"] == EXPERTS:
        section["experts"] = keyed(cfg.experts)
    return section


def _links(ctx: Context) -> list[str]:
    keys = ctx.keys.get(NAME, [])
    return [keys] if isinstance(keys, str) else list(keys)


def _start_buffer(ctx: Context) -> artifacts.ExpertBuffer | None:
    """The trajectories this link matches or starts from: the experts', or the last regenerated ones;
    None over a base without experts."""
    if not pdd.regenerates(ctx.cfg.distill):
        return None
    if ctx.params["stage"] > 1:  # both kinds of link list the last regenerated buffer last
        return artifacts.load_buffer(ctx.store, _links(ctx)[-1], NAME)
    return artifacts.load_buffer(ctx.store, str(ctx.keys["experts"]))


def run_set(ctx: Context) -> dict[str, Any]:
    cfg, stage = ctx.cfg, ctx.params["stage"]
    links = _links(ctx)
    frozen = artifacts.load_synthetic(ctx.store, links[0], NAME) if stage > 1 else None
    data = ctx.data()
    inputs = DistillInputs(
        data=data,
        ipc=cfg.ipc,
        seed=cfg.seed,
        method_cfg=cfg.distill,
        model_cfg=cfg.model,
        dsa_cfg=cfg.dsa,
        experts=_start_buffer(ctx),
        frozen=frozen,
    )
    result = pdd.distill_stage(inputs, stage, ctx.checkpoints(), ctx.progress)
    artifacts.save_synthetic(ctx.work, result, data.to_pixels(result.images))
    return {
        "stage": stage,
        "lr": result.lr,
        "stats": result.stats,
        "input_std": input_std(data, result.images),
    }


def run_expert(ctx: Context, index: int) -> dict[str, Any]:
    """Regenerate expert ``index`` from the stage's set, into the shared buffer."""
    cfg, stage = ctx.cfg, ctx.params["stage"]
    real_epochs = pdd.regenerated_epochs(cfg.distill)
    buffer = open_buffer(ctx, real_epochs + 1)
    union = artifacts.load_synthetic(ctx.store, _links(ctx)[0], NAME)
    start = _start_buffer(ctx)
    assert start is not None, "experts are regenerated only over a base that has them"
    trajectory = pdd.regenerate_expert(
        ctx.data(),
        cfg.model,
        cfg.experts,
        cfg.dsa,
        start.snapshot(index, 0),
        union,
        cfg.distill.synthetic_epochs,
        real_epochs,
        derived_seed(cfg.seed, stage, index),
        on_epoch=lambda e, loss: ctx.progress.step(e, real_epochs, f"expert {index} loss {loss:.4f}"),
    )
    buffer[index] = trajectory.params
    ctx.share(artifacts.expert_chunks(index))
    return {"index": index, "train_loss": trajectory.train_loss, "test_accuracy": trajectory.test_accuracy}


def run(ctx: Context) -> dict[str, Any]:
    if ctx.params["link"] == SET:
        return run_set(ctx)
    return {"stage": ctx.params["stage"]}  # the experts are in the buffer, written by the parts


def parts(cfg: PipelineConfig, params: Params) -> int:
    return cfg.experts.num_experts if params["link"] == EXPERTS else 0


STAGE = Stage(
    name=NAME,
    run=run,
    config=config,
    reads=reads,
    code=lambda cfg: (get_method(cfg.method).module,),
    instances=instances,
    earlier=earlier,
    parts=parts,
    run_part=run_expert,
    resumable=True,
    label=lambda cfg, p: f"pdd stage {p['stage']} {'set' if p['link'] == SET else 'experts'}",
)
