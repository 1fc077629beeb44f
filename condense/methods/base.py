"""What every distillation method receives and returns, and the resumable state of its loop."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from condense.config import DSAConfig, ModelConfig
from condense.errors import DivergenceError
from condense.prepare import RealData
from condense.progress import Progress
from condense.synthetic import SyntheticSet


@dataclass
class DistillInputs:
    data: RealData
    ipc: int
    seed: int
    method_cfg: Any
    model_cfg: ModelConfig
    dsa_cfg: DSAConfig
    experts: Any = None
    """An ``ExpertBuffer`` for trajectory methods, None otherwise."""
    teacher: torch.nn.Module | None = None
    """The trained teacher, for methods that distil against one (RDED, SRe2L); None otherwise."""
    units: range | None = None
    """A sharded method's share of the work (classes or IPC indices, :class:`condense.methods.Sharding`):
    it computes these units only; set by whoever runs it (every unit when the set is made whole)."""
    frozen: SyntheticSet | None = None
    """Images distilled before, which lead the set: trained on, never moved (PDD's earlier stages;
    the trajectory and matching loops honour it); None: every image is optimised."""


class Checkpoints(Protocol):
    """Where a long optimisation keeps its resumable state."""

    def load(self) -> dict[str, Any] | None: ...

    def save(self, state: dict[str, Any]) -> None: ...


__all__ = ["Checkpoints", "DistillInputs", "Progress", "Resumable", "ResumableLoop", "SyntheticSet"]


class Resumable:
    """What a long optimisation checkpoints: named tensors, their optimizers, the RNG, the history.

    ``snapshot`` and ``restore`` are inverse, so a run killed after a checkpoint and resumed from it
    continues exactly as the uninterrupted run would have.
    """

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        optimizers: dict[str, torch.optim.Optimizer],
        generator: torch.Generator,
    ):
        self.tensors, self.optimizers, self.generator = tensors, optimizers, generator

    def snapshot(self, iteration: int, history: list[dict[str, float]], **extra: Any) -> dict[str, Any]:
        return {
            "iteration": iteration,
            "history": history,
            "rng": self.generator.get_state(),
            **{name: t.detach().clone() for name, t in self.tensors.items()},
            **{name: opt.state_dict() for name, opt in self.optimizers.items()},
            **extra,
        }

    def restore(self, state: dict[str, Any]) -> tuple[int, list[dict[str, float]]]:
        """Load a snapshot in place; returns (iteration reached, history so far)."""
        with torch.no_grad():
            for name, tensor in self.tensors.items():
                tensor.copy_(state[name])
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])
        self.generator.set_state(state["rng"])
        return state["iteration"], state["history"]


@dataclass
class ResumableLoop:
    """The machinery around an iterative optimisation, written once: where it starts (a snapshot of
    :class:`Resumable` state, or iteration 0), when it checkpoints (every ``checkpoint_every``
    iterations but the last, whose result is the artifact), and the one line a non-finite loss
    raises, naming the last good checkpoint and what to lower::

        loop = ResumableLoop("MTT", cfg.iterations, cfg.checkpoint_every, checkpoints.save, resumable,
                             "lower distill.lr_img")
        start, history = loop.resume(checkpoints.load(), progress)
        for it in range(start, cfg.iterations):
            loss = ...
            loop.check(it, loss)
            ...
            loop.checkpoint(it, history)

    Loops whose unit of work is not an iteration (RDED's classes, the recover set's batches, CUDD's
    curricula) checkpoint their finished units themselves; a batch inside them uses this loop."""

    label: str
    iterations: int
    checkpoint_every: int
    save: Callable[[dict[str, Any]], None]
    state: Resumable
    remedy: str
    saved_at: int | None = None
    """The iteration of the last checkpoint this run saved or resumed from."""

    def resume(
        self, snapshot: dict[str, Any] | None, progress: Progress
    ) -> tuple[int, list[dict[str, float]]]:
        """(first iteration to run, history so far): ``snapshot`` restored in place, or a fresh start."""
        if snapshot is None:
            return 0, []
        start, history = self.state.restore(snapshot)
        self.saved_at = start
        progress.note(f"resuming {self.label} from checkpoint at iteration {start}/{self.iterations}")
        return start, history

    def check(self, it: int, loss: float) -> None:
        """Raise :class:`DivergenceError` when iteration ``it`` (0-based) produced a non-finite loss."""
        if not math.isfinite(loss):
            kept = f"iteration {self.saved_at}" if self.saved_at else "none yet"
            raise DivergenceError(
                f"{self.label} diverged at iteration {it + 1} (loss={loss}); last good checkpoint: {kept};"
                f" {self.remedy}"
            )

    def checkpoint(self, it: int, history: list[dict[str, float]], **extra: Any) -> None:
        """Save a snapshot after iteration ``it`` (0-based) when one is due."""
        done = it + 1
        if done % self.checkpoint_every == 0 and done < self.iterations:
            self.save(self.state.snapshot(done, history, **extra))
            self.saved_at = done
