"""Registry of distillation methods, by name (the way timm's ``create_model`` finds architectures)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from condense import crops, evaluate, relabel, sampling, teacher
from condense.methods import cudd, dm, dream, dsa, matching, mtt, rded, sre2l
from condense.methods.base import Checkpoints, DistillInputs, SyntheticSet


@dataclass(frozen=True)
class Method:
    name: str
    config_cls: type
    distill: Callable[..., SyntheticSet]
    check: Callable[[Any], None]
    """Cross-field validation against the whole pipeline config; raises ValueError."""
    needs_experts: bool
    modules: tuple[ModuleType, ...]
    """The modules implementing it: their source is the method's code version in cache keys."""
    needs_teacher: bool = False


MATCHING = (matching, sampling)
RECOVER = (sre2l, crops, teacher)
METHODS: dict[str, Method] = {
    "mtt": Method("mtt", mtt.MTTConfig, mtt.distill, mtt.check, needs_experts=True, modules=(mtt, sampling)),
    "dsa": Method("dsa", dsa.DSAMatchConfig, dsa.distill, dsa.check, False, (dsa, *MATCHING)),
    "dm": Method("dm", dm.DMConfig, dm.distill, dm.check, False, (dm, *MATCHING)),
    "dream": Method(
        "dream", dream.DREAMConfig, dream.distill, dream.check, False, (dream, dsa, dm, *MATCHING)
    ),
    "rded": Method(
        "rded", rded.RDEDConfig, rded.distill, rded.check, False, (rded, crops, teacher), needs_teacher=True
    ),
    "sre2l": Method(
        "sre2l", sre2l.RecoverConfig, sre2l.distill, sre2l.check, False, RECOVER, needs_teacher=True
    ),
    "cda": Method("cda", sre2l.CDAConfig, sre2l.distill, sre2l.check, False, RECOVER, needs_teacher=True),
    "cudd": Method(
        "cudd",
        cudd.CUDDConfig,
        cudd.distill,
        cudd.check,
        False,
        (cudd, *RECOVER, relabel, evaluate),
        needs_teacher=True,
    ),
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; methods: {', '.join(sorted(METHODS))}") from None


__all__ = ["METHODS", "Checkpoints", "DistillInputs", "Method", "SyntheticSet", "get_method"]
