"""DREAM: Efficient Dataset Distillation by Representative Matching (Liu et al., ICCV 2023).

DREAM is a matching method whose real batches are representative: per class, the real samples nearest
the k-means centroids of the current network's features, re-clustered every ``interval`` matching
steps (``condense.methods.sampling.RepresentativeSampler``); the synthetic set starts from the real images
nearest k-means centroids. Here it runs on top of DSA gradient matching (``base: dsa``, the paper's
main setting) or distribution matching (``base: dm``).

Deviation from the released code (built on IDC): the matching itself is our DSA or DM, not IDC's
multi-formation gradient matching with its network-training schedule.

DREAM is a variant of its base, not a method of its own: its config is the base method's (DSA's or
DM's, with their defaults) plus ``base``, with the sampler fixed to ``representative`` and the
initialisation defaulting to ``kmeans``; its loop is the base's loop. A setting the chosen base lacks
is an unknown setting, as it would be for the base itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

from pydantic import BaseModel

from condense.methods import Variants, dm, dsa, register_method
from condense.methods.base import Checkpoints, DistillInputs, Progress, SyntheticSet
from condense.methods.matching import SHARED_NETWORK


class _Representative(BaseModel):
    """What makes a matching method DREAM: representative real batches, k-means initialisation."""

    sampler: Literal["representative"] = "representative"
    init: Literal["real", "noise", "kmeans"] = "kmeans"


class DREAMOnDSA(_Representative, dsa.DSAMatchConfig):
    """DREAM on DSA's gradient matching (the paper's main setting)."""

    base: Literal["dsa"] = "dsa"


class DREAMOnDM(_Representative, dm.DMConfig):
    """DREAM on distribution matching."""

    base: Literal["dm"] = "dm"


class Base(NamedTuple):
    config: type[BaseModel]
    distill: Callable[..., SyntheticSet]


BASES = {"dsa": Base(DREAMOnDSA, dsa.distill), "dm": Base(DREAMOnDM, dm.distill)}
CONFIG = Variants("base", {name: base.config for name, base in BASES.items()}, default="dsa")
"""DREAM's settings: those of the base that ``base`` names."""


@register_method("dream", config=CONFIG, streams=True, shards=SHARED_NETWORK)
def distill(inputs: DistillInputs, checkpoints: Checkpoints, progress: Progress) -> SyntheticSet:
    base = inputs.method_cfg.base
    return BASES[base].distill(inputs, checkpoints, progress, label=f"DREAM ({base.upper()})")
