"""Registry of distillation methods, by name (the way timm's ``create_model`` finds architectures)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from condense.methods import mtt
from condense.methods.base import Checkpoints, DistillInputs, SyntheticSet


@dataclass(frozen=True)
class Method:
    name: str
    config_cls: type
    distill: Callable[..., SyntheticSet]
    check: Callable[[Any], None]
    """Cross-field validation against the whole pipeline config; raises ValueError."""
    needs_experts: bool
    module: Any
    """The module implementing it: its source is the method's code version in cache keys."""


METHODS: dict[str, Method] = {
    "mtt": Method("mtt", mtt.MTTConfig, mtt.distill, mtt.check, needs_experts=True, module=mtt),
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; methods: {', '.join(sorted(METHODS))}") from None


__all__ = ["METHODS", "Checkpoints", "DistillInputs", "Method", "SyntheticSet", "get_method"]
