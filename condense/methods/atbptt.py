"""AT-BPTT: Beyond Random: Automatic Inner-loop Optimization in Dataset Distillation (Li, Gou, Zhang
et al., NeurIPS 2025; official code GH209515338/AT-BPTT, built on RaT-BPTT's).

RaT-BPTT's loop (:mod:`condense.methods.ratbptt`) with the window's position and length chosen by
the stage the distillation is in. Once every ``window_every`` iterations (the official: once per
pass over the real data), with N = ``unroll``, W = ``window``, d = ``window_range``:

1. stages 1 and 3 first *probe*: a fresh network is trained N plain Adam steps on the current
   synthetic set, recording the gradient norm ||g_t|| of every step;
2. **stage 1** (early): the start p is drawn with probability softmax(||g||)_p; the window length
   is W - d + 2d * rank(|Delta_p|) / N (integer part), rank(|Delta_p|) being the place of
   |Delta_p| = | ||g_p|| - ||g_{p-1}|| | (Delta_0 = 0) among the sorted |Delta|: steps where the
   gradient changes more get longer windows; the start is cut back to N - length if the window
   would run past N;
3. **stage 2** (middle): length W + d, start uniform in [0, N - W - d] (RaT-BPTT's random window);
4. **stage 3** (late): length W - d, start N - p - (W - d) with p drawn as in stage 1, so steps
   late in the unroll are favoured (a negative start is 0, as the official loop runs no plain steps);
5. after each such pass, its mean accuracy of the trained networks on their real batches is compared
   with the previous pass's: stage 1 moves to stage 2 after ``stage2_patience`` * N passes in a row
   that gained less than ``stage2_gain`` points; stage 2 to stage 3 likewise with ``stage3_patience``
   and ``stage3_gain`` (the checks run in that order, so the pass that enters stage 2 already counts
   toward stage 3, as in the official loop).

Where the paper and the official code disagree, this follows the code: the paper's third component,
a low-rank Hessian approximation of the window's meta-gradient, is not in the official code (it
differentiates exactly through the window with ``higher``), so it is not here either; the meta-gradient
is exact (either ``memory`` mode). The stage schedule, the probe and the formulas above are the code's
(``window_start_size`` and the stage counters of ``main_worker``); the paper describes them only in
words.

Deviations from the official code, stated: the patience counts are rounded up to whole passes (the
official compares the count with 0.15 * totwindow and 0.125 * totwindow for equality, which never holds
for a fraction such as 0.125 * 300 = 37.5, so its CIFAR-100 and Tiny-ImageNet runs never reach stage 3);
a pass's accuracy is the mean over its iterations (the official averages the running averages it
prints, the same when a pass is one print interval); the probe's draws and the stage-1/3 positions
come from (seed, draw number); everything RaT-BPTT's docstring lists holds here too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import Field, model_validator

from condense.methods import register_method
from condense.methods.base import Checkpoints, DistillInputs, Progress, SyntheticSet
from condense.methods.bptt import SHARED_NETWORK, draw_generator, train_plain
from condense.methods.ratbptt import (
    InnerRuns,
    RaTBPTTConfig,
    Window,
    distill_by_windows,
)


class ATBPTTConfig(RaTBPTTConfig):
    window: int = Field(default=40, gt=0)
    """W: the middle window length (the official CIFAR-10 command's 40)."""
    window_range: int = Field(default=10, ge=0)
    """d (``-d``): window lengths run from W - d to W + d."""
    stage2_gain: float = Field(default=1.5, ge=0)
    """Accuracy points a pass must gain over the previous one to keep stage 1 going."""
    stage3_gain: float = Field(default=1.0, ge=0)
    """The same for stage 2."""
    stage2_patience: float = Field(default=0.15, gt=0)
    """Passes in a row without ``stage2_gain`` that end stage 1, as a fraction of ``unroll`` (rounded up)."""
    stage3_patience: float = Field(default=0.125, gt=0)
    """The same for the end of stage 2."""

    @model_validator(mode="after")
    def _windows_fit(self) -> ATBPTTConfig:
        if self.window + self.window_range > self.unroll:
            raise ValueError(
                f"window + window_range ({self.window} + {self.window_range}) must not exceed"
                f" unroll ({self.unroll})"
            )
        if self.window - self.window_range < 1:
            raise ValueError(
                f"window - window_range ({self.window} - {self.window_range}) must be at least 1"
            )
        return self


def sample_position(grad_norms: list[float], generator: torch.Generator) -> int:
    """A step drawn with probability softmax(gradient norms) (the official inverse-CDF draw)."""
    weights = torch.softmax(torch.tensor(grad_norms, dtype=torch.float64), dim=0)
    u = torch.rand(1, generator=generator, dtype=torch.float64)
    position = int(torch.searchsorted(weights.cumsum(0), u))
    return min(position, len(grad_norms) - 1)  # a cumulative sum that rounds below u


def adaptive_length(grad_norms: list[float], position: int, window: int, spread: int) -> int:
    """Stage 1's window length at ``position``: W - d + 2d * (rank of the gradient-norm change there
    among all the changes) / N, the first of equal changes ranking."""
    changes = [0.0] + [abs(b - a) for a, b in zip(grad_norms, grad_norms[1:], strict=False)]
    rank = sorted(changes).index(changes[position])
    return int(window - spread + 2 * spread * (rank / len(grad_norms)))


def patience(fraction: float, unroll: int) -> int:
    return math.ceil(fraction * unroll - 1e-9)  # 0.15 * 200 is 30.000000000000004 in floats


@dataclass
class AdaptiveWindow:
    """AT-BPTT's placement: the module docstring's stages, probes and counters."""

    cfg: ATBPTTConfig
    seed: int
    every: int
    runs: InnerRuns
    stage: int = 1
    calm_passes: dict[int, int] = field(default_factory=lambda: {2: 0, 3: 0})
    """Passes in a row without enough gain, counting toward stage 2 and toward stage 3."""
    previous_accuracy: float = 0.0
    pass_accuracies: list[float] = field(default_factory=list)
    current: Window | None = None
    placed_in: int = 1
    """The stage the current window was placed in."""

    def place(self, iteration: int, images: torch.Tensor, targets: torch.Tensor) -> Window:
        if iteration % self.every == 0 or self.current is None:
            self.current = self.choose(iteration // self.every, images, targets)
            self.placed_in = self.stage
        return self.current

    def choose(self, draw: int, images: torch.Tensor, targets: torch.Tensor) -> Window:
        cfg, generator = self.cfg, draw_generator(self.seed, draw)
        unroll, window, spread = cfg.unroll, cfg.window, cfg.window_range
        if self.stage == 2:
            length = window + spread
            return Window(int(torch.randint(unroll - length + 1, (1,), generator=generator)), length)
        probe = train_plain(self.runs.draw(unroll, generator), images, targets, unroll, norms=True)
        norms = torch.stack(probe.grad_norms).tolist()
        position = sample_position(norms, generator)
        if self.stage == 1:
            length = adaptive_length(norms, position, window, spread)
            return Window(min(position, unroll - length), length)
        length = window - spread
        return Window(max(0, min(unroll - position - length, unroll - length)), length)

    def observe(self, iteration: int, accuracy: float) -> None:
        self.pass_accuracies.append(accuracy)
        if (iteration + 1) % self.every == 0:
            self.end_pass(round(sum(self.pass_accuracies) / len(self.pass_accuracies), 2))
            self.pass_accuracies = []

    def end_pass(self, accuracy: float) -> None:
        """The official stage counters, after a pass of mean accuracy ``accuracy`` (%)."""
        gain = accuracy - self.previous_accuracy
        rules = {
            2: (1, self.cfg.stage2_gain, self.cfg.stage2_patience),
            3: (2, self.cfg.stage3_gain, self.cfg.stage3_patience),
        }
        for next_stage, (stage, least, fraction) in rules.items():
            if self.stage == stage:
                self.calm_passes[next_stage] = self.calm_passes[next_stage] + 1 if gain < least else 0
                if self.calm_passes[next_stage] == patience(fraction, self.cfg.unroll):
                    self.stage = next_stage
        self.previous_accuracy = accuracy

    def record(self) -> dict[str, float]:
        return {"stage": self.placed_in}

    def state(self) -> dict[str, Any]:
        window = None if self.current is None else [self.current.start, self.current.length]
        return {
            "stage": self.stage,
            "calm_passes": [self.calm_passes[2], self.calm_passes[3]],
            "previous_accuracy": self.previous_accuracy,
            "pass_accuracies": list(self.pass_accuracies),
            "window": window,
            "placed_in": self.placed_in,
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Load :meth:`state`'s values, checked: a checkpoint is read, not trusted."""
        if state["stage"] not in (1, 2, 3) or state["placed_in"] not in (1, 2, 3):
            raise ValueError(f"AT-BPTT checkpoint: stage {state['stage']!r} is not 1, 2 or 3")
        window = state["window"]
        if window is not None and not (
            window[0] >= 0 and window[1] >= 1 and window[0] + window[1] <= self.cfg.unroll
        ):
            raise ValueError(
                f"AT-BPTT checkpoint: window {window!r} does not fit an unroll of {self.cfg.unroll}"
            )
        self.stage = int(state["stage"])
        self.calm_passes = dict(zip((2, 3), map(int, state["calm_passes"]), strict=True))
        self.previous_accuracy = float(state["previous_accuracy"])
        self.pass_accuracies = [float(a) for a in state["pass_accuracies"]]
        self.current = None if window is None else Window(int(window[0]), int(window[1]))
        self.placed_in = int(state["placed_in"])


@register_method("atbptt", config=ATBPTTConfig, streams=True, shards=SHARED_NETWORK)
def distill(inputs: DistillInputs, checkpoints: Checkpoints, progress: Progress) -> SyntheticSet:
    result = distill_by_windows(inputs, checkpoints, progress, "AT-BPTT", AdaptiveWindow)
    stages = [h["stage"] for h in result.history]
    result.stats.update({f"iterations_in_stage{s}": float(stages.count(s)) for s in (1, 2, 3)})
    return result
