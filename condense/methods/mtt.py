"""MTT: Dataset Distillation by Matching Training Trajectories (Cazenavette et al., CVPR 2022), and
the one trajectory-matching loop its successors (FTD, DATM, PAD, AST: see their files) run with
options.

Each outer iteration:

1. draw an expert and a start epoch t from the window [min_start_epoch, upper]; upper is
   ``max_start_epoch`` (MTT) or grows from ``initial_max_start_epoch`` to it (DATM);
2. start a student at the expert's parameters theta*_t, with AST's ``weight_perturbation``: each
   convolution weight w moved to w + s * d * w, d unit-norm Gaussian noise (the perturbed start is
   also the loss's normaliser, as in AST's code);
3. take ``syn_steps`` SGD steps on DSA-augmented synthetic batches with the learnable step size
   alpha: theta_{i+1} = theta_i - alpha * b_i, b_i = mu * b_{i-1} + grad c * loss(theta_i; syn batch),
   mu = ``student_momentum`` (0: MTT's plain SGD; AST's heavy ball), c = 1 or AST's
   ``balanced_inner_loss`` factor of t, and loss is cross-entropy on hard labels, or DATM's soft
   cross-entropy against softmax(learned label logits);
4. loss = ||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2, with M = ``expert_epochs``,
   plus with AST's ``intermediate_matching`` the same normalised distance of theta_{(N//M)k} to
   theta*_{t+k} for k = 1..M-1, over the parameters PAD keeps (all but the shallowest
   ``shallow_fraction``; all for MTT);
5. its gradient reaches the pixels, alpha and the learned labels, through the whole unroll
   (``memory: unrolled``) or by TESLA's constant-memory walk (``memory: constant``, the same
   gradient: :mod:`condense.methods.trajectory`);
6. unless the loss exceeds ``skip_above`` (DATM's threshold), step the pixels and alpha (SGD,
   momentum 0.5) and the labels (SGD, ``lr_labels``, ``momentum_labels``); with ``ema_decay``
   (FTD), update the exponential moving average of the images, which is what is stored.

Deviation from the reference code, on purpose: alpha is clamped to ``min_lr`` > 0 after each step
(the official code lets it go negative or explode, MTT issues #6/#16/#20), and a non-finite loss
stops the run with the last good checkpoint kept instead of writing NaN images. Start epochs are
drawn with both ends inclusive (the official ``randint(low, high)`` excludes ``high``).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from condense import devices
from condense.artifacts import ExpertBuffer
from condense.config import Strict, added
from condense.labels import expert_logits, final_experts
from condense.methods import register_method
from condense.methods.base import Checkpoints, DistillInputs, Progress, Resumable, ResumableLoop, SyntheticSet
from condense.methods.initial import initial_images
from condense.methods.trajectory import (
    Segment,
    Waypoint,
    balanced_scale,
    draw_steps,
    intermediate_points,
    matched_gradient,
    perturbed_start,
    shallow_cut,
    start_window,
)
from condense.models import ConvNet, FlatParams
from condense.training import student_model

Init = Literal["real", "noise", "kmeans", "correct", "representative"]
"""Where the images start (:func:`condense.methods.initial.initial_images`)."""


class MTTConfig(Strict):
    iterations: int = Field(default=200, gt=0)
    syn_steps: int = Field(default=20, gt=0)
    """N: unrolled student steps per iteration (memory grows linearly in it)."""
    expert_epochs: int = Field(default=2, gt=0)
    """M: how many expert epochs the N student steps must cover."""
    max_start_epoch: int = Field(default=5, ge=0)
    """Start epochs are drawn uniformly from min_start_epoch..max_start_epoch."""
    min_start_epoch: int = Field(default=0, ge=0)
    initial_max_start_epoch: int | None = Field(default=None, ge=0)
    """DATM's growing window: the upper end starts here and reaches ``max_start_epoch`` after
    ``window_growth_iterations``; None keeps it at ``max_start_epoch`` (MTT)."""
    window_growth_iterations: int = Field(default=1000, gt=0)
    lr_img: float = Field(default=100.0, gt=0)
    lr_lr: float = Field(default=1e-5, gt=0)
    lr_init: float = Field(default=0.01, gt=0)
    """Initial learnable step size alpha (the paper's lr_teacher)."""
    min_lr: float = Field(default=1e-5, gt=0)
    momentum: float = Field(default=0.5, ge=0)
    batch_syn: int | None = Field(default=None, gt=0)
    """Synthetic images per student step; None = the whole set (the paper's default)."""
    init: Init = "real"
    """Random real images, noise, the real images nearest k-means centroids of an expert's features,
    (DATM) random real images the first expert's final weights classify correctly, or (AST) the real
    images nearest k-means centroids of those final weights' logits."""
    labels: Literal["hard", "learned"] = "hard"
    """``learned`` (DATM): one logit vector per image, initialised from the experts' logits and
    optimised with the images; stored with them and trained on by ``evaluate.labels: learned``."""
    lr_labels: float = Field(default=2.0, gt=0)
    momentum_labels: float = Field(default=0.9, ge=0)
    skip_above: float | None = Field(default=None, gt=0)
    """DATM's threshold: an iteration whose loss exceeds it updates nothing."""
    ema_decay: float | None = Field(default=None, gt=0, lt=1)
    """FTD: keep an exponential moving average of the images; the average is what is stored."""
    shallow_fraction: float = Field(default=0.0, ge=0, lt=1)
    """PAD: this leading fraction of the parameters (shallow layers first) is left out of the loss."""
    student_momentum: float = added(0.0, ge=0, lt=1)
    """AST: the student's heavy-ball momentum mu in the unroll (0.9 in AST's code); 0: plain SGD."""
    balanced_inner_loss: bool = added(False)
    """AST: scale the inner loss by log_5(t - T/2 + 8) for starts t >= T/2, by its inverse
    1 / log_5(T/2 - t + 8) before (T/2 = ``max_start_epoch // 2``)."""
    intermediate_matching: bool = added(False)
    """AST: also match the student after (N // M) * k steps to expert epoch t + k, k = 1..M-1,
    each normalised by its own segment length, added with weight 1."""
    weight_perturbation: float = added(0.0, ge=0)
    """AST: strength s of the start point's perturbation (1 in AST's code; 0: none)."""
    mask_ratio: float = added(0.0, ge=0, lt=1)
    """MDT, masked distillation training (Zhu et al., "Rethinking Data Distillation: Do Not Overlook
    Calibration", ICCV 2023): every synthetic batch the student steps on is multiplied, after DSA, by
    a fresh Bernoulli mask zeroing this share t of its input values (masked temperature scaling's
    mask, no rescaling), so the images cannot concentrate the class evidence in a few pixels. Our
    reading: the paper's code is not public. The mask is seeded by the step's DSA seed (resume and
    both ``memory`` modes see the same one); 0: off."""
    memory: Literal["unrolled", "constant"] = "unrolled"
    """How the gradient through the unroll is computed; ``constant`` (TESLA) gives the same gradient
    in memory that does not grow with ``syn_steps`` (about twice the compute)."""
    checkpoint_every: int = Field(default=50, gt=0)

    @model_validator(mode="after")
    def _window_in_order(self) -> MTTConfig:
        top = self.initial_max_start_epoch
        if self.min_start_epoch > (self.max_start_epoch if top is None else top):
            raise ValueError("min_start_epoch must not exceed initial_max_start_epoch or max_start_epoch")
        if top is not None and top > self.max_start_epoch:
            raise ValueError(f"initial_max_start_epoch ({top}) must not exceed max_start_epoch")
        return self


def check(cfg: Any) -> None:
    """Cross-field checks against the pipeline config (expert length)."""
    needed = cfg.distill.max_start_epoch + cfg.distill.expert_epochs
    if needed > cfg.experts.epochs:
        raise ValueError(
            f"distill.max_start_epoch + distill.expert_epochs = {needed} needs experts.epochs >= {needed}"
            f" (got {cfg.experts.epochs})"
        )


SHARED_TRAJECTORY = "each iteration matches one expert trajectory with the whole set, every class at once"
"""Why MTT's family does not shard (``compute.shards``)."""


@register_method(
    "mtt", config=MTTConfig, needs=("experts",), check=check, streams=True, shards=SHARED_TRAJECTORY
)
def distill(inputs: DistillInputs, checkpoints: Checkpoints, progress: Progress) -> SyntheticSet:
    return match_trajectories(inputs, checkpoints, progress, "MTT")


def match_trajectories(
    inputs: DistillInputs, checkpoints: Checkpoints, progress: Progress, name: str
) -> SyntheticSet:
    """The loop of the module docstring, configured by ``inputs.method_cfg`` (an :class:`MTTConfig`)."""
    cfg: MTTConfig = inputs.method_cfg
    data = inputs.data
    # On a GPU the trajectories are read once, not two snapshots from the store every iteration.
    buffer: ExpertBuffer = inputs.experts.resident(data.device, devices.resident_budget(data.device))
    generator = torch.Generator().manual_seed(inputs.seed)

    def trained_expert(seed: int) -> ConvNet:
        # k-means and DATM's init need a trained classifier: an expert's final weights.
        net = FlatParams(student_model(data, inputs.model_cfg, seed))
        return net.load_into(buffer.snapshot(0, buffer.num_snapshots - 1).to(data.device))

    images = initial_images(data, inputs.ipc, cfg.init, generator, trained_expert)
    device = images.device
    labels = torch.arange(data.num_classes, device=device).repeat_interleave(inputs.ipc)
    frozen = inputs.frozen
    held = 0 if frozen is None else len(frozen.images)
    if frozen is not None:  # PDD: the earlier stages lead the set; their gradient is zeroed each step
        images = torch.cat([frozen.images.to(device), images])
        labels = torch.cat([frozen.labels.to(device), labels])
    images.requires_grad_(True)
    syn_lr = torch.tensor(cfg.lr_init, device=device, requires_grad=True)
    tensors = {"images": images, "syn_lr": syn_lr}
    optimizers = {
        "opt_img": torch.optim.SGD([images], lr=cfg.lr_img, momentum=cfg.momentum),
        "opt_lr": torch.optim.SGD([syn_lr], lr=cfg.lr_lr, momentum=cfg.momentum),
    }
    targets = labels
    if cfg.labels == "learned":
        targets = expert_logits(final_experts(buffer, data, inputs.model_cfg), images.detach(), labels)
        if frozen is not None and frozen.label_logits is not None:
            targets[:held] = frozen.label_logits.to(device)
        initial_logits = targets.clone()  # recomputed identically on resume, before the restore
        tensors["label_logits"] = targets.requires_grad_(True)
        optimizers["opt_labels"] = torch.optim.SGD([targets], lr=cfg.lr_labels, momentum=cfg.momentum_labels)
    if cfg.ema_decay is not None:
        tensors["ema"] = images.detach().clone()
    resumable = Resumable(tensors, optimizers, generator)
    loop = ResumableLoop(
        name,
        cfg.iterations,
        cfg.checkpoint_every,
        checkpoints.save,
        resumable,
        "lower distill.lr_img or distill.lr_lr",
    )
    start_it, history = loop.resume(checkpoints.load(), progress)

    net = FlatParams(student_model(data, inputs.model_cfg, inputs.seed))
    matched_from = shallow_cut(net, cfg.shallow_fraction)
    batch = cfg.batch_syn or len(images)
    waypoints = intermediate_points(cfg.syn_steps, cfg.expert_epochs) if cfg.intermediate_matching else []
    for it in range(start_it, cfg.iterations):
        expert = int(torch.randint(buffer.num_experts, (1,), generator=generator))
        low, high = start_window(
            it,
            cfg.min_start_epoch,
            cfg.max_start_epoch,
            cfg.initial_max_start_epoch,
            cfg.window_growth_iterations,
        )
        t = low + int(torch.randint(high - low + 1, (1,), generator=generator))
        start = devices.upload(buffer.snapshot(expert, t), device)
        if cfg.weight_perturbation > 0:
            start = perturbed_start(net, start, cfg.weight_perturbation, generator)
        segment = Segment(
            net,
            start,
            devices.upload(buffer.snapshot(expert, t + cfg.expert_epochs), device),
            draw_steps(len(images), cfg.syn_steps, batch, generator),
            inputs.dsa_cfg,
            matched_from,
            cfg.student_momentum,
            balanced_scale(t, cfg.max_start_epoch) if cfg.balanced_inner_loss else 1.0,
            tuple(Waypoint(m, devices.upload(buffer.snapshot(expert, t + k), device)) for m, k in waypoints),
            cfg.mask_ratio,
        )
        for optimizer in optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        loss_tensor = matched_gradient(segment, images, targets, syn_lr, cfg.memory)
        # The iteration's one read from the device: the loss decides what happens next (divergence,
        # DATM's skip), so it is read before the step, together with the step size it reports.
        loss, lr = torch.stack([loss_tensor.detach(), syn_lr.detach()]).tolist()
        loop.check(it, loss)
        skipped = cfg.skip_above is not None and loss > cfg.skip_above
        if held:
            for leaf in (images, targets):
                if leaf.grad is not None:
                    leaf.grad[:held] = 0
        if not skipped:
            for optimizer in optimizers.values():
                optimizer.step()
            with torch.no_grad():
                syn_lr.clamp_(min=cfg.min_lr)
                if cfg.ema_decay is not None:
                    tensors["ema"].mul_(cfg.ema_decay).add_(images.detach(), alpha=1 - cfg.ema_decay)
        # ``lr``: the step size this iteration's unroll used (the update above moves it for the next).
        history.append({"iteration": it + 1, "loss": loss, "lr": lr, "start_epoch": t, "skipped": skipped})
        progress.step(it + 1, cfg.iterations, f"loss {loss:.4f} lr {lr:.4g} start {t} of {low}..{high}")
        loop.checkpoint(it, history)

    kept_images = tensors["ema"] if cfg.ema_decay is not None else images
    if frozen is not None:  # exactly as given: FTD's average of a constant need not round to it
        kept_images = torch.cat([frozen.images.to(device), kept_images.detach()[held:]])
    # What each option did, measurably: how far the labels moved, how far the average trails.
    stats = {
        "skipped_iterations": sum(h["skipped"] for h in history),
        "matched_parameters": net.numel - matched_from,
    }
    if cfg.labels == "learned":
        stats["label_logits_moved"] = (targets.detach() - initial_logits).abs().mean().item()
    if cfg.ema_decay is not None:
        stats["ema_gap"] = (images.detach() - kept_images).abs().mean().item()
    return SyntheticSet(
        images=kept_images.detach().clone(),
        labels=labels,
        lr=syn_lr.item(),
        history=history,
        label_logits=targets.detach().clone() if cfg.labels == "learned" else None,
        stats=stats,
    )
