"""Evaluation: train a fresh network only on a (distilled or real) set, test on the real test split.

Three recipes, each measured once at the end of training (no picking of a best test epoch):

- ``train_and_test``, MTT's ``evaluate_synset``: SGD with momentum 0.9 and weight decay 5e-4, DSA on
  every batch, the learning rate divided by 10 halfway. Evaluating distilled images without DSA, or
  with another architecture's norm, is the classic way to under-report them (MTT issue #29). Its
  optimiser may be Adam instead (``Recipe.optimizer``): RaT-BPTT's and AT-BPTT's evaluations train
  with the Adam they distil with.
- ``train_and_test_kd``, the RDED/SRe2L recipe: AdamW, cosine schedule, crops + flips + CutMix
  (+ patch shuffling for stitched images), KL divergence to the teacher's probabilities on every
  augmented batch (online or replayed from storage, see ``condense.relabel``).
- ``train_and_test_replay``, DD's own evaluation: exactly the step schedule the set was distilled for
  (:class:`condense.synthetic.StepSchedule`), each step plain gradient descent with its learned size.
- ``train_and_test_staged``, PDD's: one network trained on the set's first stage, then its first two,
  ... (:class:`condense.synthetic.Stages`), each stage by the MTT recipe with a new SGD at the
  stage's learned step size that goes on from the previous one's momentum.

Every run reports the final network's test accuracy and its calibration (:mod:`condense.scores`):
the ECE of its test predictions, and the ECE after temperature scaling fitted on ``held_out``
training images it did not train on (:func:`calibration_indices`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from condense.augment import dsa
from condense.config import DSAConfig, ModelConfig
from condense.datasets.common import sample_per_class
from condense.devices import Compiled
from condense.labels import kd_loss
from condense.models import build_model
from condense.prepare import RealData
from condense.progress import SILENT, Progress
from condense.relabel import KDAugment, Plans, Targets, num_batches, plan_inputs
from condense.scores import calibration, masked_temperature
from condense.synthetic import Stages, StepSchedule
from condense.training import (
    batches,
    cosine_factor,
    predict,
    random_seed,
    shuffled,
    split_logits,
    train_on,
)


@dataclass(frozen=True)
class HeldOut:
    """Training images (and labels) a student did not train on: where its temperature is fitted,
    plainly and, with ``mask_ratios``, by masked temperature scaling (:func:`masked_temperature`)."""

    x: torch.Tensor
    y: torch.Tensor
    mask_ratios: tuple[float, ...] = ()


CALIBRATION_FRACTION = 10
"""The calibration split is 1/10 of the smallest class per class (at least 1, at most 100)."""
CALIBRATION_MAX_PER_CLASS = 100


@dataclass(frozen=True)
class Recipe:
    epochs: int
    lr: float
    batch_size: int
    momentum: float
    """SGD's; Adam has none."""
    weight_decay: float
    dsa: DSAConfig | None
    temperature: float | None = None
    """Set when training on soft labels (KD loss at this temperature)."""
    optimizer: Literal["sgd", "adam"] = "sgd"


def optimizer_of(recipe: Recipe, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """The recipe's optimiser over ``params`` (L2 weight decay either way): SGD with momentum, or Adam
    at torch's betas 0.9/0.999 and eps 1e-8, RaT-BPTT's inner optimiser. Both act on each element
    alone, so on stacked seeds (:func:`train_and_test_seeds`) each seed's slice steps as its own."""
    if recipe.optimizer == "adam":
        return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)


def lr_schedule(recipe: Recipe, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.MultiStepLR:
    """The learning rate divided by 10 after half the epochs (stepped once an epoch)."""
    half = recipe.epochs // 2
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[half] if half else [], gamma=0.1)


def fit(
    model: nn.Module,
    x: torch.Tensor | None,
    targets: torch.Tensor | None,
    recipe: Recipe,
    generator: torch.Generator,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: Progress = SILENT,
    state: dict[torch.Tensor, dict[str, Any]] | None = None,
    data: RealData | None = None,
) -> tuple[float, torch.optim.Optimizer]:
    """Train ``model`` as it is (its weights, its device) on (x, targets) by ``recipe``: a new optimiser
    at ``recipe.lr`` (:func:`optimizer_of`), ``recipe.epochs`` epochs whose batch orders and DSA seeds
    are drawn from ``generator`` (which goes on from wherever it is), the learning rate /10 after half
    the epochs. Returns the last epoch's mean loss and the optimiser.

    ``targets`` are class indices, or probability rows when ``recipe.temperature`` is set. ``forward``
    (default: the model) computes the logits, e.g. :class:`Compiled`. ``state``: the ``state`` of an
    earlier optimiser over the same parameters (e.g. of the one a previous call returned), from which
    this one's momentum buffers (Adam's moments) go on, as PDD carries them from stage to stage; the
    buffers are the earlier optimiser's own tensors, updated in place as in PDD's code. ``x`` None:
    epochs over ``data``'s whole training split (the full-data baseline of a streamed dataset)."""
    params = list(model.parameters())
    optimizer = optimizer_of(recipe, params)
    if state is not None:
        if not set(state) <= set(params):
            raise ValueError("the optimiser state carried over is not over this model's parameters")
        optimizer.state.update({param: dict(entry) for param, entry in state.items()})
    scheduler = lr_schedule(recipe, optimizer)
    if recipe.temperature is None:
        loss_fn = F.cross_entropy
    else:
        temperature = recipe.temperature

        def loss_fn(logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
            return kd_loss(logits, probs, temperature)

    loss = float("nan")
    for epoch in range(recipe.epochs):
        if x is None:  # the whole training split, streamed
            if data is None:
                raise ValueError("fit without x trains on data's training split: pass data")
            batches_of_epoch = data.batches("train", recipe.batch_size, generator)
        else:
            assert targets is not None
            batches_of_epoch = shuffled(x, targets, recipe.batch_size, generator)
        loss = float(train_on(model, batches_of_epoch, loss_fn, optimizer, generator, recipe.dsa, forward))
        scheduler.step()
        progress.step(epoch + 1, recipe.epochs, f"loss {loss:.4f}")
    return loss, optimizer


def train_mtt(
    arch: str,
    data: RealData,
    x: torch.Tensor | None,
    targets: torch.Tensor | None,
    recipe: Recipe,
    seed: int,
    model_cfg: ModelConfig | None = None,
    progress: Progress = SILENT,
    compile_step: bool = False,
) -> tuple[nn.Module, float]:
    """Train ``arch`` from a seeded initialisation on (x, targets) by ``recipe`` (:func:`fit`, its
    generator seeded by ``seed`` too); returns the model and the last epoch's mean loss.

    ``targets`` are class indices, or probability rows when ``recipe.temperature`` is set. ``x``
    None: epochs over the data's whole training split (the full-data baseline of a streamed dataset).
    """
    device = data.device if x is None else x.device
    model = build_model(arch, data.channels, data.num_classes, data.resolution, model_cfg, seed).to(
        device, non_blocking=True
    )
    forward = Compiled(model, compile_step, device)
    generator = torch.Generator().manual_seed(seed)
    loss, _ = fit(model, x, targets, recipe, generator, forward, progress, data=data)
    return model, loss


def train_and_test(
    arch: str,
    data: RealData,
    x: torch.Tensor | None,
    targets: torch.Tensor | None,
    recipe: Recipe,
    seed: int,
    model_cfg: ModelConfig | None = None,
    progress: Progress = SILENT,
    compile_step: bool = False,
    held_out: HeldOut | None = None,
) -> dict[str, float | None]:
    """:func:`train_mtt`, then the final network's test accuracy (%), its calibration (:func:`tested`)
    and time."""
    started = time.perf_counter()
    model, loss = train_mtt(arch, data, x, targets, recipe, seed, model_cfg, progress, compile_step)
    return {**tested(model, data, held_out), "train_loss": loss, "seconds": time.perf_counter() - started}


def _scored(
    test_logits: torch.Tensor,
    test_y: torch.Tensor,
    held_out: HeldOut | None,
    network: Callable[[torch.Tensor], torch.Tensor],
) -> dict[str, float | None]:
    """Test accuracy (%) and calibration of a network (``network``: its logits of a batch), from its
    logits on the test split (labels ``test_y``); its temperatures are fitted on ``held_out`` alone."""
    test_y = test_y.to(test_logits.device)
    held = masked = None
    if held_out is not None and len(held_out.y) > 0:
        held = (network(held_out.x), held_out.y)
        if held_out.mask_ratios:
            masked = masked_temperature(network, held_out.x, held_out.y, held_out.mask_ratios, clean=held[0])
    return {
        "accuracy": float((test_logits.argmax(1) == test_y).float().mean() * 100),
        **calibration(test_logits, test_y, held, masked),
    }


def tested(model: nn.Module, data: RealData, held_out: HeldOut | None = None) -> dict[str, float | None]:
    """The final network's test accuracy (%), ECE, and ECE after temperature scaling and after masked
    temperature scaling (both fitted on ``held_out``, never on the test split)."""
    return _scored(*split_logits(model, data, "test"), held_out, functools.partial(predict, model))


def batchable(model: nn.Module) -> bool:
    """Seeds of this network can train together (no batch norm: its running statistics do not vmap)."""
    return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def train_and_test_seeds(
    arch: str,
    data: RealData,
    xs: list[torch.Tensor | None],
    targets: list[torch.Tensor | None],
    recipe: Recipe,
    seeds: list[int],
    model_cfg: ModelConfig | None = None,
    progress: Progress = SILENT,
    compile_step: bool = False,
    held_out: list[HeldOut | None] | None = None,
) -> list[dict[str, float | None]]:
    """:func:`train_and_test` for several seeds at once: their networks are stacked
    (``torch.func.stack_module_state``) and every step is one vmapped forward and backward for all of
    them, so a GPU runs K small trainings as one instead of K launch-bound ones.

    Each seed keeps what it has alone: its initialisation, its generator (batch order, then one DSA
    seed per batch, drawn in the same order), its set (``xs[k]``, e.g. its random real images) and
    the recipe's SGD (momentum, weight decay, learning rate /10 halfway), which acts on each seed's
    slice of the stacked parameters exactly as on its own (or Adam, elementwise too: its step count is
    every seed's, all take the same number of steps). The result equals the one-at-a-time
    training up to floating-point rounding (batched convolutions sum in another order).
    ``held_out[k]``: seed ``k``'s calibration images (see :func:`tested`)."""
    started = time.perf_counter()
    held_out = held_out or [None] * len(seeds)
    models = [
        build_model(arch, data.channels, data.num_classes, data.resolution, model_cfg, s) for s in seeds
    ]
    if len(seeds) == 1 or not batchable(models[0]) or xs[0] is None:
        return [
            train_and_test(arch, data, x, t, recipe, seed, model_cfg, progress, compile_step, held)
            for x, t, seed, held in zip(xs, targets, seeds, held_out, strict=True)
        ]
    device = xs[0].device
    params, buffers = stack_module_state([m.to(device) for m in models])
    shape = copy.deepcopy(models[0]).to("meta")

    def forward(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(shape, (p, b), (x,))

    # Dropout and stochastic depth draw a mask per seed ("different"), as K separate networks would.
    stacked = Compiled(vmap(forward, randomness="different"), compile_step, device, batch=(2, 1))
    optimizer = optimizer_of(recipe, list(params.values()))
    scheduler = lr_schedule(recipe, optimizer)
    temperature = recipe.temperature
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    n, k = len(xs[0]), len(seeds)
    losses = torch.zeros(k, dtype=torch.float64, device=device)
    for epoch in range(recipe.epochs):
        orders = [batches(n, recipe.batch_size, g, device) for g in generators]
        losses.zero_()
        for picks in zip(*orders, strict=True):
            inputs, labels = [], []
            for seed_index, idx in enumerate(picks):
                batch = xs[seed_index][idx]
                if recipe.dsa is not None:
                    batch = dsa(batch, recipe.dsa, random_seed(generators[seed_index]))
                inputs.append(batch)
                labels.append(targets[seed_index][idx])
            logits = stacked(params, buffers, torch.stack(inputs))
            per_seed = torch.stack(
                [
                    F.cross_entropy(logits[i], labels[i])
                    if temperature is None
                    else kd_loss(logits[i], labels[i], temperature)
                    for i in range(k)
                ]
            )
            optimizer.zero_grad(set_to_none=True)
            per_seed.sum().backward()  # seeds share no parameter: each gets its own gradient
            optimizer.step()
            losses += per_seed.detach().double() * len(picks[0])
        scheduler.step()
        progress.step(epoch + 1, recipe.epochs, f"{k} seeds, loss {float(losses.mean()) / n:.4f}")
    shape.eval()  # dropout and stochastic depth off for testing, as predict() does
    with torch.no_grad():
        test_batches = list(data.batches("test", 1024))
        test_logits = torch.cat(
            [vmap(forward, in_dims=(0, 0, None))(params, buffers, c.to(device)) for c, _ in test_batches],
            dim=1,
        )
        test_y = torch.cat([y for _, y in test_batches])

        def network(i: int) -> Callable[[torch.Tensor], torch.Tensor]:
            """Seed ``i``'s network alone, for its calibration."""
            mine = ({n: p[i] for n, p in params.items()}, {n: b[i] for n, b in buffers.items()})
            return lambda x: functional_call(shape, mine, (x,))

        scored = [_scored(test_logits[i], test_y, held_out[i], network(i)) for i in range(k)]
    seconds = (time.perf_counter() - started) / k
    return [
        {
            **scored[i],
            "train_loss": float(losses[i]) / n,
            "seconds": seconds,
        }
        for i in range(k)
    ]


def train_replay(
    arch: str,
    data: RealData,
    x: torch.Tensor,
    labels: torch.Tensor,
    schedule: StepSchedule,
    seed: int,
    model_cfg: ModelConfig | None = None,
    progress: Progress = SILENT,
) -> tuple[nn.Module, float]:
    """``arch`` built with ``seed`` and trained by exactly ``schedule``: step i is
    theta <- theta - step_sizes[i] * grad CE(f(theta; x[indices[i]]), labels[indices[i]]), in order,
    with no augmentation, momentum or weight decay (DD's ``train_distilled_image`` evaluation). Returns
    the model and the last step's loss."""
    model = build_model(arch, data.channels, data.num_classes, data.resolution, model_cfg, seed).to(
        x.device, non_blocking=True
    )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    step_sizes = schedule.step_sizes.tolist()  # one read, not one wait a step
    loss = torch.tensor(float("nan"))
    for i, idx in enumerate(schedule.indices.to(x.device)):
        loss = F.cross_entropy(model(x[idx]), labels[idx])
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for param, grad in zip(params, grads, strict=True):
                param -= step_sizes[i] * grad
        progress.step(i + 1, len(step_sizes), f"step size {step_sizes[i]:.4g}")
    return model, loss.item()


def train_and_test_replay(
    arch: str,
    data: RealData,
    x: torch.Tensor,
    labels: torch.Tensor,
    schedule: StepSchedule,
    seed: int,
    model_cfg: ModelConfig | None = None,
    progress: Progress = SILENT,
    held_out: HeldOut | None = None,
) -> dict[str, float | None]:
    """:func:`train_replay`, then the test accuracy (%) and calibration of the final model."""
    started = time.perf_counter()
    model, loss = train_replay(arch, data, x, labels, schedule, seed, model_cfg, progress)
    return {**tested(model, data, held_out), "train_loss": loss, "seconds": time.perf_counter() - started}


def train_staged(
    arch: str,
    data: RealData,
    x: torch.Tensor,
    labels: torch.Tensor,
    stages: Stages,
    recipe: Recipe,
    seed: int,
    model_cfg: ModelConfig | None = None,
    progress: Progress = SILENT,
    learned_lr: bool = True,
) -> tuple[nn.Module, float]:
    """``arch`` built with ``seed`` and trained stage by stage as PDD evaluates (its
    ``evaluate_synset`` per stage): for stage k = 1..P, :func:`fit` on the images of stages 1..k
    (:meth:`Stages.upto`; ``x`` class-major; ``labels`` class indices, or probability rows when
    ``recipe.temperature`` is set, as for :func:`fit`) for ``recipe.epochs`` epochs with a new
    optimiser at stage k's learned step size (``recipe.lr`` for every stage when not
    ``learned_lr``), the learning rate /10 halfway through the stage, its momentum buffers carried
    over from stage k-1's optimiser. One generator, seeded by ``seed``, draws every stage's batches
    and DSA seeds in turn. Returns the model and the last stage's last epoch's mean loss."""
    expected = stages.total * data.num_classes
    if len(x) != expected:
        raise ValueError(
            f"a set of {len(x)} images cannot be {data.num_classes} classes of the stages' {stages.total}"
        )
    model = build_model(arch, data.channels, data.num_classes, data.resolution, model_cfg, seed).to(
        x.device, non_blocking=True
    )
    generator = torch.Generator().manual_seed(seed)
    loss, state = float("nan"), None
    for stage, lr in enumerate(stages.lrs, start=1):
        idx = stages.upto(stage, data.num_classes).to(x.device)
        stage_recipe = dataclasses.replace(recipe, lr=lr) if learned_lr else recipe
        progress.note(f"stage {stage}/{len(stages)}: {len(idx)} images, lr {stage_recipe.lr:.4g}")
        loss, optimizer = fit(
            model, x[idx], labels[idx], stage_recipe, generator, progress=progress, state=state
        )
        state = optimizer.state
    return model, loss


def train_and_test_staged(
    arch: str,
    data: RealData,
    x: torch.Tensor,
    labels: torch.Tensor,
    stages: Stages,
    recipe: Recipe,
    seed: int,
    model_cfg: ModelConfig | None = None,
    progress: Progress = SILENT,
    held_out: HeldOut | None = None,
    learned_lr: bool = True,
) -> dict[str, float | None]:
    """:func:`train_staged`, then the test accuracy (%) and calibration of the final model (tested
    once, after the last stage)."""
    started = time.perf_counter()
    model, loss = train_staged(arch, data, x, labels, stages, recipe, seed, model_cfg, progress, learned_lr)
    return {**tested(model, data, held_out), "train_loss": loss, "seconds": time.perf_counter() - started}


@dataclass(frozen=True)
class KDRecipe:
    epochs: int
    lr: float
    weight_decay: float
    final_lr_fraction: float
    batch_size: int
    temperature: float
    augment: KDAugment


def adamw_without_decay_on_norms(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices/kernels only, not on biases or norm scales."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))


def train_kd(
    arch: str,
    data: RealData,
    x: torch.Tensor,
    recipe: KDRecipe,
    seed: int,
    plans: Plans,
    targets: Targets,
    model_cfg: ModelConfig | None = None,
    progress: Progress = SILENT,
    compile_step: bool = False,
) -> tuple[nn.Module, float]:
    """Train ``arch`` by KD: each epoch follows ``plans(epoch)``, each batch learns ``targets``.
    Returns the model and the last epoch's mean loss. ``compile_step``: the student's forward pass
    through ``torch.compile`` (:class:`Compiled`)."""
    model = build_model(arch, data.channels, data.num_classes, data.resolution, model_cfg, seed).to(
        x.device, non_blocking=True
    )
    forward = Compiled(model, compile_step, x.device)
    optimizer = adamw_without_decay_on_norms(model, recipe.lr, recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda epoch: cosine_factor(epoch, recipe.epochs, recipe.final_lr_fraction)
    )
    loss = float("nan")
    for epoch in range(recipe.epochs):
        plan = plans(epoch).to(x.device)
        total = torch.zeros((), dtype=torch.float64, device=x.device)  # no host round trip per batch
        count = num_batches(len(x), recipe.batch_size)
        for batch in range(count):
            inputs = plan_inputs(x, plan, batch, recipe.batch_size, recipe.augment.factor)
            probs = targets(epoch, batch, inputs).to(inputs.device)
            model.train()
            step_loss = kd_loss(forward(inputs), probs, recipe.temperature)
            optimizer.zero_grad(set_to_none=True)
            step_loss.backward()
            optimizer.step()
            total += step_loss.detach().double()
        scheduler.step()
        loss = float(total) / count
        progress.step(epoch + 1, recipe.epochs, f"kd loss {loss:.4f}")
    return model.eval(), loss


def train_and_test_kd(
    arch: str,
    data: RealData,
    x: torch.Tensor,
    recipe: KDRecipe,
    seed: int,
    plans: Plans,
    targets: Targets,
    model_cfg: ModelConfig | None = None,
    progress: Progress = SILENT,
    held_out: HeldOut | None = None,
    compile_step: bool = False,
) -> dict[str, float | None]:
    """:func:`train_kd`, then the test accuracy (%) and calibration of the final model."""
    started = time.perf_counter()
    model, loss = train_kd(arch, data, x, recipe, seed, plans, targets, model_cfg, progress, compile_step)
    return {**tested(model, data, held_out), "train_loss": loss, "seconds": time.perf_counter() - started}


def random_real_indices(data: RealData, ipc: int, seed: int) -> torch.Tensor:
    """Indices of ``ipc`` random real training images per class: the baseline every distilled set
    must beat."""
    generator = torch.Generator().manual_seed(seed)
    return sample_per_class(data.train_y.cpu(), data.num_classes, ipc, generator).to(data.train_y.device)


def random_real_subset(data: RealData, ipc: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and labels of :func:`random_real_indices`."""
    idx = random_real_indices(data, ipc, seed)
    return data.images(idx), data.train_y[idx]


def calibration_indices(data: RealData, seed: int) -> torch.Tensor:
    """A fixed per-class sample of the training images on which students' temperatures are fitted:
    1/10 of the smallest class per class (at least 1, at most 100), drawn from ``seed``."""
    smallest = int(torch.bincount(data.train_y.cpu(), minlength=data.num_classes).min())
    per_class = min(max(1, smallest // CALIBRATION_FRACTION), CALIBRATION_MAX_PER_CLASS)
    generator = torch.Generator().manual_seed(seed)
    return sample_per_class(data.train_y.cpu(), data.num_classes, per_class, generator).to(
        data.train_y.device
    )


def held_out_split(
    data: RealData,
    seed: int,
    trained_on: torch.Tensor | None = None,
    mask_ratios: tuple[float, ...] = (),
) -> HeldOut:
    """The calibration split without the training images a student trained on (``trained_on``)."""
    idx = calibration_indices(data, seed)
    if trained_on is not None:
        idx = idx[~torch.isin(idx, trained_on.to(idx.device))]
    return HeldOut(data.images(idx), data.train_y[idx], tuple(mask_ratios))
