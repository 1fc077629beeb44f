"""What every distillation method receives and returns, and the resumable state of its loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from condense.config import DSAConfig, ModelConfig
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


class Checkpoints(Protocol):
    """Where a long optimisation keeps its resumable state."""

    def load(self) -> dict[str, Any] | None: ...

    def save(self, state: dict[str, Any]) -> None: ...


__all__ = ["Checkpoints", "DistillInputs", "Progress", "Resumable", "SyntheticSet"]


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
