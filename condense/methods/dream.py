"""DREAM: Efficient Dataset Distillation by Representative Matching (Liu et al., ICCV 2023).

DREAM is a matching method whose real batches are representative: per class, the real samples nearest
the k-means centroids of the current network's features, re-clustered every ``interval`` matching
steps (``condense.methods.sampling.RepresentativeSampler``); the synthetic set starts from the real images
nearest k-means centroids. Here it runs on top of DSA gradient matching (``base: dsa``, the paper's
main setting) or distribution matching (``base: dm``).

Deviation from the released code (built on IDC): the matching itself is our DSA or DM, not IDC's
multi-formation gradient matching with its network-training schedule.

``DREAMConfig`` is generated from the base methods' configs, so it never repeats their fields: a field
both bases default alike keeps that default; any other is ``None``, meaning the chosen base's default
(``lr_img``: 0.1 for DSA, 1.0 for DM), and setting a field the chosen base lacks is an error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import ValidationInfo, create_model, field_validator
from pydantic.fields import FieldInfo

from condense.config import Strict
from condense.methods import dm, dsa, register_method
from condense.methods.base import Checkpoints, DistillInputs, Progress, SyntheticSet
from condense.methods.matching import MatchingConfig


class Base(NamedTuple):
    config: type[MatchingConfig]
    distill: Callable[..., SyntheticSet]


BASES = {
    "dsa": Base(dsa.DSAMatchConfig, dsa.distill),
    "dm": Base(dm.DMConfig, dm.distill),
}
FIXED = {"sampler": "representative"}
"""What makes a matching method DREAM; not settable."""


def _field(infos: list[FieldInfo]) -> tuple[Any, Any]:
    """One base field as a DREAM field: the shared default, or None (= the base's default)."""
    first = infos[0]
    annotation = Annotated[(first.annotation, *first.metadata)] if first.metadata else first.annotation
    if len(infos) == len(BASES) and all(info.default == first.default for info in infos):
        return annotation, first.default
    return annotation | None, None


def _dream_fields() -> dict[str, Any]:
    infos: dict[str, list[FieldInfo]] = {}
    for base in BASES.values():
        for name, info in base.config.model_fields.items():
            if name not in FIXED:
                infos.setdefault(name, []).append(info)
    fields = {name: _field(group) for name, group in infos.items()}
    fields["init"] = (fields["init"][0], "kmeans")
    return fields


_DREAMFields: type[Strict] = create_model(
    "_DREAMFields",
    __base__=Strict,
    base=(Literal["dsa", "dm"], "dsa"),
    **_dream_fields(),
)


class DREAMConfig(_DREAMFields):
    """``base`` plus every field of the base methods' configs except ``sampler`` (always representative);
    ``init`` defaults to k-means."""

    @field_validator("*")
    @classmethod
    def _in_base(cls, value: Any, info: ValidationInfo) -> Any:
        # ``base`` is the first field, so it is validated (and in ``info.data``) before the others.
        base = info.data.get("base")
        name = info.field_name
        if value is not None and base in BASES and name not in BASES[base].config.model_fields:
            raise ValueError(f"not a setting of base {base!r}")
        return value

    def base_config(self) -> MatchingConfig:
        """The chosen base method's config with DREAM's settings."""
        values = {k: v for k, v in self.model_dump(exclude={"base"}).items() if v is not None}
        return BASES[self.base].config.model_validate(values | FIXED)


@register_method("dream", config=DREAMConfig, streams=True)
def distill(inputs: DistillInputs, checkpoints: Checkpoints, progress: Progress) -> SyntheticSet:
    cfg: DREAMConfig = inputs.method_cfg
    base_inputs = replace(inputs, method_cfg=cfg.base_config())
    return BASES[cfg.base].distill(base_inputs, checkpoints, progress, label=f"DREAM ({cfg.base.upper()})")
