"""The evaluation stage: one fresh network trained on one set and tested on the real test split.

It fans out over subject x model x seed: the distilled set, the same number of random real images
(``random_real``) and the whole training set (``full_data``), each under the same recipe and labels,
so the comparison is fair. Each run also reports its calibration (ECE, and ECE after temperature
scaling fitted on training images held out of that student's training: the calibration split of
:func:`condense.evaluate.calibration_indices`; the full-data students hold nothing out, so they
report the plain ECE only). ``recipe: mtt`` is MTT's evaluate_synset (SGD, DSA; hard labels, the
teacher's soft labels, or the labels the method learned), or with ``optimizer: adam`` the same with
Adam; ``recipe: kd`` the RDED/SRe2L recipe (stored labels for the distilled set when relabel is
stored, else the teacher online); ``recipe: replay`` trains the distilled set by the step schedule it
carries (DD's own evaluation) and its baselines, which have no schedule, by the mtt recipe: their
keys are the mtt recipe's, so they are shared with a run evaluated that way; ``recipe: staged`` trains
the distilled set stage by stage as PDD does (one network on its first stage, then its first two,
..., each stage by the mtt recipe at its own learned step size, the optimiser's momentum carried
over), its baselines, which have no stages, by the mtt recipe likewise.
"""

from __future__ import annotations

from typing import Any

import torch

from condense import artifacts, evaluate, labels, models, relabel
from condense.config import PipelineConfig, keyed
from condense.errors import ConfigError
from condense.evaluate import KDRecipe, Recipe
from condense.prepare import RealData
from condense.stages.base import Context, Params, Stage
from condense.stages.relabel import check_top_k

SUBJECTS = ("distilled", "random_real", "full_data")


def replays(cfg: PipelineConfig, subject: str) -> bool:
    """Whether ``subject`` is trained by its learned schedule (only the distilled set has one)."""
    return cfg.evaluate.recipe == "replay" and subject == "distilled"


def staged(cfg: PipelineConfig, subject: str) -> bool:
    """Whether ``subject`` is trained stage by stage (only the distilled set has stages)."""
    return cfg.evaluate.recipe == "staged" and subject == "distilled"


def evaluation_name(cfg: PipelineConfig, subject: str) -> str:
    """How ``subject``'s accuracies were measured: ``mtt``, ``mtt+adam``, ``kd``, ``replay`` or
    ``staged``."""
    if replays(cfg, subject):
        return "replay"
    if staged(cfg, subject):
        return "staged"
    if cfg.evaluate.recipe == "kd":
        return "kd"
    return "mtt" if cfg.evaluate.optimizer == "sgd" else f"mtt+{cfg.evaluate.optimizer}"


def subjects(cfg: PipelineConfig) -> list[str]:
    ev = cfg.evaluate
    return [s for s, on in zip(SUBJECTS, (True, ev.random_real, ev.full_data), strict=True) if on]


def seed_groups(cfg: PipelineConfig) -> list[list[int]]:
    """The seed indices each job trains together."""
    size = cfg.evaluate.seeds_per_job or cfg.evaluate.seeds
    indices = list(range(cfg.evaluate.seeds))
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def instances(cfg: PipelineConfig) -> list[dict[str, Any]]:
    return [
        {"subject": subject, "arch": arch, "indices": group}
        for subject in subjects(cfg)
        for arch in cfg.evaluate.models
        for group in seed_groups(cfg)
    ]


def eval_seed(cfg: PipelineConfig, index: int) -> int:
    return cfg.seed * 1000 + 500 + index


def uses_stored_labels(cfg: PipelineConfig) -> bool:
    return cfg.evaluate.recipe == "kd" and cfg.relabel.mode == "stored"


def _recipe_fields(cfg: PipelineConfig, subject: str) -> dict[str, Any]:
    """The MTT recipe of ``subject``; ``lr`` may still be ``"learned"``. The optimiser is named only
    when it is not SGD, so that SGD's keys stay what they were before Adam could be chosen."""
    ev = cfg.evaluate
    soft = ev.labels != "hard" and subject != "full_data"
    # Soft cross-entropy against softmax(logits) is the KD loss at temperature 1 (same gradient).
    temperature = cfg.soft_labels.temperature if ev.labels == "soft" else 1.0
    fields = {
        "epochs": ev.full_data_epochs if subject == "full_data" else ev.epochs,
        "lr": ev.lr if subject == "distilled" else ev.baseline_lr,
        "batch_size": ev.batch_size,
        "momentum": ev.momentum,
        "weight_decay": ev.weight_decay,
        "dsa": cfg.dsa if ev.dsa else None,
        "temperature": temperature if soft else None,
    }
    if ev.optimizer == "adam":  # one learning rate for every subject: no learned or baseline one
        fields.update(optimizer="adam", lr=ev.adam_lr)
    return fields


def recipe(cfg: PipelineConfig, subject: str, learned_lr: float | None) -> Recipe:
    """The recipe with its learning rate resolved (a method without a learned lr gets ``baseline_lr``)."""
    fields = _recipe_fields(cfg, subject)
    if fields["lr"] == "learned":
        fields["lr"] = learned_lr if learned_lr is not None else cfg.evaluate.baseline_lr
    return Recipe(**fields)


def kd_recipe(cfg: PipelineConfig, subject: str, factor: int) -> KDRecipe:
    kd = cfg.evaluate.kd
    return KDRecipe(
        epochs=cfg.evaluate.full_data_epochs if subject == "full_data" else cfg.evaluate.epochs,
        lr=kd.lr,
        weight_decay=kd.weight_decay,
        final_lr_fraction=kd.final_lr_fraction,
        batch_size=cfg.evaluate.batch_size,
        temperature=kd.temperature,
        augment=relabel.KDAugment.from_config(kd, factor),
    )


def _kd_fields(cfg: PipelineConfig, subject: str) -> dict[str, Any]:
    """What a KD-recipe run's result depends on; the full-data baseline is shared across IPCs."""
    stored = subject == "distilled" and uses_stored_labels(cfg)
    return {
        "recipe": "kd",
        "kd": keyed(cfg.evaluate.kd),
        "epochs": cfg.evaluate.full_data_epochs if subject == "full_data" else cfg.evaluate.epochs,
        "batch_size": cfg.evaluate.batch_size,
        "top_k": cfg.relabel.top_k,
        "fp16": cfg.relabel.fp16,
        "quantize": cfg.relabel.quantize,
        "stored_epochs": cfg.relabel.stored_epochs,
        "labels": "stored" if stored else "online",
    }


def config(cfg: PipelineConfig, params: Params) -> dict[str, Any]:
    subject, arch = params["subject"], params["arch"]
    if cfg.evaluate.recipe == "kd":
        fields = _kd_fields(cfg, subject)
    elif replays(cfg, subject):  # the rest is the set's: its schedule comes with the distill key
        fields = {"recipe": "replay"}
    else:
        fields = _recipe_fields(cfg, subject)
        fields["dsa"] = keyed(fields["dsa"]) if fields["dsa"] else None
        fields["labels"] = "hard" if subject == "full_data" else cfg.evaluate.labels
        if staged(cfg, subject):  # the mtt recipe per stage; the stages come with the distill key
            fields["recipe"] = "staged"
    return {
        "subject": subject,
        "arch": arch,
        "seeds": [eval_seed(cfg, index) for index in params["indices"]],
        "recipe": fields,
        "model": keyed(cfg.student) if arch == models.CONVNET else None,
        "ipc": cfg.ipc if subject == "random_real" else None,
        # Full data holds nothing out: nothing to calibrate on, and one baseline for any ratios.
        "mask_ratios": None if subject == "full_data" else cfg.evaluate.mask_ratios,
    }


def reads(cfg: PipelineConfig, params: Params) -> tuple[str, ...]:
    """What a run depends on (full data under the MTT recipe: only the dataset)."""
    subject = params["subject"]
    inputs = ["dataset"]
    if subject == "distilled":
        inputs.append("distill")
    if cfg.evaluate.recipe == "kd":
        inputs.append("relabel" if subject == "distilled" and uses_stored_labels(cfg) else "teacher")
    elif cfg.evaluate.labels == "soft":
        if subject == "distilled":
            inputs.append("soft_labels")
        elif subject == "random_real":
            inputs.append("teacher")
    elif cfg.evaluate.labels == "learned" and subject == "random_real":
        inputs.append("experts")
    return tuple(inputs)


def _subject_set(
    ctx: Context, subject: str, data: RealData, seed: int
) -> tuple[torch.Tensor | None, torch.Tensor, float | None]:
    """(inputs, hard labels, learned lr) of the set a run trains on, on the job's device."""
    if subject == "distilled":
        synthetic = artifacts.load_synthetic(ctx.store, str(ctx.keys["distill"]))
        return synthetic.images.to(ctx.device), synthetic.labels.to(ctx.device), synthetic.lr
    if subject == "random_real":
        x, y = evaluate.random_real_subset(data, ctx.cfg.ipc, seed)
        return x, y, None
    # A streamed training split is read epoch by epoch by the recipe itself.
    return None if data.streamed else data.train_x, data.train_y, None


def _held_out(ctx: Context, subject: str, data: RealData, seed: int) -> evaluate.HeldOut | None:
    """The calibration images a run's student never trained on (none for full data)."""
    if subject == "full_data":
        return None
    picked = evaluate.random_real_indices(data, ctx.cfg.ipc, seed) if subject == "random_real" else None
    return evaluate.held_out_split(data, ctx.cfg.seed, picked, tuple(ctx.cfg.evaluate.mask_ratios))


def _replay(
    ctx: Context, data: RealData, indices: list[int], seeds: list[int]
) -> list[dict[str, float | None]]:
    """The distilled set trained by its schedule from each seed's fresh network, or, for a set distilled
    from fixed networks, from fixed network ``index`` mod their count (seed indices, not positions in
    this job, so any grouping of seeds into jobs trains the same networks)."""
    synthetic = artifacts.load_synthetic(ctx.store, str(ctx.keys["distill"]))
    schedule = synthetic.schedule
    if schedule is None:  # a config built past methods.configure, or a set stored before schedules
        raise ConfigError(
            f"evaluate.recipe replay: the distilled set {ctx.keys['distill']} carries no learned step"
            " schedule (only dd's sets do, since schedules are stored): use evaluate.recipe mtt"
        )
    x, y = synthetic.images.to(ctx.device), synthetic.labels.to(ctx.device)
    inits = (
        seeds
        if schedule.init_seeds is None
        else [int(schedule.init_seeds[i % len(schedule.init_seeds)]) for i in indices]
    )
    arch = ctx.params["arch"]
    return [
        evaluate.train_and_test_replay(
            arch,
            data,
            x,
            y,
            schedule,
            init,
            ctx.cfg.student,
            ctx.progress,
            _held_out(ctx, "distilled", data, seed),
        )
        for init, seed in zip(inits, seeds, strict=True)
    ]


def _staged(ctx: Context, data: RealData, seeds: list[int]) -> list[dict[str, float | None]]:
    """The distilled set trained stage by stage from each seed's fresh network, each stage by the mtt
    recipe at the stage's learned step size (``evaluate.lr: learned``) or at ``evaluate.lr``."""
    synthetic = artifacts.load_synthetic(ctx.store, str(ctx.keys["distill"]))
    stages = synthetic.stages
    if stages is None:  # a config built past methods.configure, or a set stored before stages
        raise ConfigError(
            f"evaluate.recipe staged: the distilled set {ctx.keys['distill']} carries no stages (only"
            " pdd's sets do): use evaluate.recipe mtt"
        )
    x, y = synthetic.images.to(ctx.device), synthetic.labels.to(ctx.device)
    # Hard labels, or the probability rows the mtt recipe would train this set on (each stage its rows).
    (targets,) = _targets(ctx, "distilled", data, [(x, y, synthetic.lr)])
    learned = ctx.cfg.evaluate.lr == "learned"
    run_recipe = recipe(ctx.cfg, "distilled", stages.lrs[0])  # the stages' own step sizes when learned
    return [
        evaluate.train_and_test_staged(
            ctx.params["arch"],
            data,
            x,
            targets,
            stages,
            run_recipe,
            seed,
            ctx.cfg.student,
            ctx.progress,
            _held_out(ctx, "distilled", data, seed),
            learned_lr=learned,
        )
        for seed in seeds
    ]


def _train_kd(
    ctx: Context, subject: str, data: RealData, x: torch.Tensor | None, seed: int
) -> dict[str, float | None]:
    """Replay stored labels for the distilled set when relabel is stored, else run the teacher online
    (baselines always: they are drawn per seed), quantised the same way."""
    cfg = ctx.cfg
    if x is None:
        raise ConfigError(
            "the KD recipe's full-data baseline plans crops over the whole training split in memory; "
            "with a streamed dataset set evaluate.full_data: false (or dataset.load: memory)"
        )
    check_top_k(cfg, data.num_classes)
    factor = artifacts.stitch_factor(ctx.store, str(ctx.keys["distill"])) if subject == "distilled" else 1
    kd = kd_recipe(cfg, subject, factor)
    if "relabel" in ctx.keys:
        columns = artifacts.load_stored_labels(ctx.store, str(ctx.keys["relabel"]))
        stored = relabel.StoredLabels(columns, data.num_classes, kd.batch_size)
        plans, targets = stored.plan, stored.targets
    else:
        model = artifacts.load_teacher(ctx.store, str(ctx.keys["teacher"])).to(ctx.device)
        r = cfg.relabel
        plans = relabel.online_plans(len(x), kd.batch_size, kd.augment, seed, r.fp16, r.stored_epochs)
        targets = relabel.online_labels(model, kd.temperature, r.top_k, r.fp16, r.quantize)
    arch = ctx.params["arch"]
    held_out = _held_out(ctx, subject, data, seed)
    return evaluate.train_and_test_kd(
        arch, data, x, kd, seed, plans, targets, cfg.student, ctx.progress, held_out, ctx.compile_step
    )


def _targets(
    ctx: Context,
    subject: str,
    data: RealData,
    sets: list[tuple[torch.Tensor, torch.Tensor, float | None]],
) -> list[torch.Tensor]:
    """What each seed's set trains on under the MTT recipe: hard labels, or probability rows."""
    cfg, hard = ctx.cfg, [y for _, y, _ in sets]
    if cfg.evaluate.labels == "hard" or subject == "full_data":
        return hard
    if cfg.evaluate.labels == "soft":
        if subject == "distilled":
            probs = artifacts.load_soft_labels(ctx.store, str(ctx.keys["soft_labels"])).to(ctx.device)
            return [probs] * len(sets)
        model = artifacts.load_teacher(ctx.store, str(ctx.keys["teacher"])).to(ctx.device)
        return [labels.soft_labels(model, x, cfg.soft_labels.temperature) for x, _, _ in sets]
    if subject == "distilled":
        logits = artifacts.load_synthetic(ctx.store, str(ctx.keys["distill"])).label_logits
        return [torch.softmax(logits.to(ctx.device), dim=1)] * len(sets)
    # Random real images get the labels DATM would start them with: the experts' averaged logits.
    experts = labels.final_experts(
        artifacts.load_buffer(ctx.store, str(ctx.keys["experts"])), data, cfg.model
    )
    return [torch.softmax(labels.expert_logits(experts, x, y), dim=1) for x, y, _ in sets]


def _train_sets(
    ctx: Context, subject: str, data: RealData, seeds: list[int]
) -> list[dict[str, float | None]]:
    """Each seed's set (the distilled one, its random real images, the full data) trained by the
    mtt or kd recipe."""
    cfg, arch = ctx.cfg, ctx.params["arch"]
    sets = [_subject_set(ctx, subject, data, seed) for seed in seeds]
    if cfg.evaluate.recipe == "kd":
        return [_train_kd(ctx, subject, data, x, seed) for (x, _, _), seed in zip(sets, seeds, strict=True)]
    targets = _targets(ctx, subject, data, sets)
    run_recipe = recipe(cfg, subject, sets[0][2])
    xs = [x for x, _, _ in sets]
    held_out = [_held_out(ctx, subject, data, seed) for seed in seeds]
    return evaluate.train_and_test_seeds(
        arch, data, xs, targets, run_recipe, seeds, cfg.student, ctx.progress, ctx.compile_step, held_out
    )


def run(ctx: Context) -> dict[str, Any]:
    cfg, data = ctx.cfg, ctx.data()
    subject, arch, indices = ctx.params["subject"], ctx.params["arch"], ctx.params["indices"]
    seeds = [eval_seed(cfg, index) for index in indices]
    if replays(cfg, subject):
        results = _replay(ctx, data, indices, seeds)
    elif staged(cfg, subject):
        results = _staged(ctx, data, seeds)
    else:
        results = _train_sets(ctx, subject, data, seeds)
    runs = [{"index": i, "seed": s, **r} for i, s, r in zip(indices, seeds, results, strict=True)]
    return {"subject": subject, "arch": arch, "runs": runs}


STAGE = Stage(
    name="evaluate",
    run=run,
    config=config,
    reads=reads,
    instances=instances,
    label=lambda cfg, p: f"eval {p['subject']} {p['arch']} seeds {','.join(map(str, p['indices']))}",
)
