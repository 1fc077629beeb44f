"""The registry of distillation methods: each method file registers itself, the way timm's
``register_model`` does::

    @register_method("mtt", config=MTTConfig, needs=("experts",), check=check)
    def distill(inputs: DistillInputs, checkpoints: Checkpoints, progress: Progress) -> SyntheticSet:
        ...

Nothing else is edited to add a method: the modules of this package are imported on the first
lookup, so is any module named by a ``condense.methods`` entry point (a method in another package),
and a method defined anywhere else (a notebook, a test) is registered once its module is imported.
The registry is read-only from outside (:data:`METHODS` is a mapping proxy).
"""

from __future__ import annotations

import importlib
import pkgutil
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from importlib.metadata import entry_points
from types import MappingProxyType
from typing import Any

from pydantic import BaseModel, ValidationError

from condense.config import PipelineConfig, explain
from condense.errors import ConfigError
from condense.methods.base import Checkpoints, DistillInputs, SyntheticSet
from condense.progress import SILENT, Progress

INPUTS = ("experts", "teacher", "progressive")
"""What a method may need besides the real data: expert trajectories, a trained teacher, the sets of
its stages (PDD's, :mod:`condense.stages.progressive`)."""


@dataclass(frozen=True)
class Variants:
    """The config of a method that runs on one of several base methods, picked by one setting
    (DREAM's ``base``): each variant is a config class of its own, typically its base's with a few
    fields fixed. Called with settings, it builds the variant they pick."""

    field: str
    classes: Mapping[str, type[BaseModel]]
    default: str

    def pick(self, values: Mapping[str, Any]) -> type[BaseModel]:
        choice = values.get(self.field, self.default)
        if choice not in self.classes:
            raise ConfigError(f"distill.{self.field}: {choice!r} is not one of {', '.join(self.classes)}")
        return self.classes[choice]

    def __call__(self, **values: Any) -> BaseModel:
        return self.pick(values)(**values)


@dataclass(frozen=True)
class Sharding:
    """How one distillation splits into independent shards, each its own job (``compute.shards``).

    ``unit`` is what a shard takes a contiguous range of: ``class`` (RDED: each class picked apart
    from the others; DM: each class matched apart) or ``ipc`` (SRe2L, CDA: each batch of one image
    per class recovered apart). The function it registers then computes only ``inputs.units`` and
    returns that part of the set (:attr:`Method.compute`); ``merge(inputs, parts)`` joins the parts
    (in unit order) into the whole set and its statistics; :meth:`Method.distill` makes the whole set
    as one shard of every unit. Each unit's randomness derives from (seed, unit), never from the
    units before it, so the merged set is the unsharded one, byte for byte, whatever the shard count.

    A method whose leading units alone are independent (CUDD's first curriculum) names their count,
    ``prefix(method_cfg, ipc)``, and what follows them, ``finish(inputs, merged, checkpoints,
    progress)``: the merge job runs it on the merged prefix, resumable like any distillation."""

    unit: str
    merge: Callable[[DistillInputs, list[SyntheticSet]], SyntheticSet]
    prefix: Callable[[Any, int], int] | None = None
    finish: Callable[[DistillInputs, SyntheticSet, Checkpoints, Progress], SyntheticSet] | None = None

    def units(self, num_classes: int, ipc: int, method_cfg: Any) -> int:
        """How many units the shards divide."""
        if self.prefix is not None:
            return self.prefix(method_cfg, ipc)
        return num_classes if self.unit == "class" else ipc

    def join(
        self, inputs: DistillInputs, parts: list[SyntheticSet], checkpoints: Checkpoints, progress: Progress
    ) -> SyntheticSet:
        """The parts merged, and finished where the method has work after its shardable prefix."""
        merged = self.merge(inputs, parts)
        return merged if self.finish is None else self.finish(inputs, merged, checkpoints, progress)

    @staticmethod
    def ranges(count: int, shards: int) -> list[range]:
        """``count`` units cut into ``shards`` contiguous ranges whose sizes differ by at most one."""
        bounds = [count * i // shards for i in range(shards + 1)]
        return [range(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


NOT_SHARDABLE = "it does not declare how its work splits: register_method(..., shards=Sharding(...))"


@dataclass(frozen=True)
class Method:
    name: str
    config_cls: type[BaseModel] | Variants
    compute: Callable[..., SyntheticSet]
    """The registered function: the whole set, or for a sharded method the set of ``inputs.units``."""
    check: Callable[[PipelineConfig], None]
    """Cross-field validation against the whole pipeline config; raises ValueError."""
    needs: frozenset[str]
    module: str
    """Where the method is defined: its import closure is the method's code version in cache keys."""
    streams: bool = False
    """Reads real data only through draws by index and epochs, so it runs on a streamed dataset."""
    shards: Sharding | str = NOT_SHARDABLE
    """How the method splits into shards, or why it does not (one line, for the refusal)."""

    def distill(
        self, inputs: DistillInputs, checkpoints: Checkpoints, progress: Progress = SILENT, **options: Any
    ) -> SyntheticSet:
        """The whole set in one job: a shardable method's one shard of every unit, merged, so the
        unsharded set is made by exactly the code that makes a sharded one. ``options`` go to the
        registered function (DM's ``label``, which DREAM sets)."""
        if isinstance(self.shards, str):
            return self.compute(inputs, checkpoints, progress, **options)
        count = self.shards.units(inputs.data.num_classes, inputs.ipc, inputs.method_cfg)
        whole = replace(inputs, units=range(count))
        parts = [self.compute(whole, checkpoints, progress, **options)]
        return self.shards.join(whole, parts, checkpoints, progress)


_registry: dict[str, Method] = {}
METHODS = MappingProxyType(_registry)
"""Every registered method by name (read-only; call :func:`method_names` to discover them first)."""
_discovered = False
_lock = threading.Lock()


def _no_check(cfg: PipelineConfig) -> None:
    """No constraints beyond the method config's own fields."""


def register_method(
    name: str,
    *,
    config: type[BaseModel] | Variants,
    needs: Iterable[str] = (),
    check: Callable[[PipelineConfig], None] = _no_check,
    streams: bool = False,
    shards: Sharding | str = NOT_SHARDABLE,
) -> Callable[[Callable[..., SyntheticSet]], Callable[..., SyntheticSet]]:
    """Register the decorated ``distill(inputs, checkpoints, progress)`` as method ``name``;
    ``streams``: it reads the real data only by :meth:`images` draws and :meth:`batches` epochs
    (:mod:`condense.streaming`), never the whole training split; ``shards``: how it splits across
    jobs (:class:`Sharding`), or why it cannot."""
    unknown = set(needs) - set(INPUTS)
    if unknown:
        raise ValueError(f"method {name!r} needs {sorted(unknown)}; a method may need {list(INPUTS)}")

    def decorate(distill: Callable[..., SyntheticSet]) -> Callable[..., SyntheticSet]:
        method = Method(name, config, distill, check, frozenset(needs), distill.__module__, streams, shards)
        # A sharded method's module-level ``distill`` makes the whole set too, like every other's.
        whole = distill if isinstance(shards, str) else method.distill
        known = _registry.get(name)
        if known is not None and known.module != method.module:
            raise ValueError(f"method {name!r} is registered twice: in {known.module} and {method.module}")
        _registry[name] = method
        return whole

    return decorate


def _discover() -> None:
    """Import every method module of this package and of ``condense.methods`` entry points, once."""
    global _discovered
    with _lock:
        if _discovered:
            return
        for info in pkgutil.iter_modules(__path__, f"{__name__}."):
            importlib.import_module(info.name)
        for entry in entry_points(group="condense.methods"):
            entry.load()
        _discovered = True


def method_names() -> list[str]:
    _discover()
    return sorted(_registry)


def get_method(name: str) -> Method:
    _discover()
    try:
        return _registry[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; methods: {', '.join(sorted(_registry))}") from None


def configure(cfg: PipelineConfig) -> PipelineConfig:
    """``cfg`` with its ``distill`` section typed by the method's config class and the method's
    cross-field checks passed; every error is one :class:`ConfigError` line."""
    method = get_method(cfg.method)
    raw = (cfg.distill.model_dump() if isinstance(cfg.distill, BaseModel) else cfg.distill) or {}
    config_cls = method.config_cls
    if isinstance(config_cls, Variants):
        config_cls = config_cls.pick(raw)
    try:
        section = config_cls.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(explain(err, config_cls, "distill.")) from None
    typed = cfg.model_copy(update={"distill": section})
    if cfg.evaluate.labels == "learned" and getattr(section, "labels", "hard") != "learned":
        raise ConfigError(
            f"evaluate.labels 'learned' trains on labels the method learned, and {cfg.method} learns none"
            f" here: use datm or pad, or set distill.labels=learned where the method has it"
        )
    if cfg.evaluate.recipe == "replay" and not getattr(section, "learns_schedule", False):
        raise ConfigError(
            f"evaluate.recipe replay trains a set by the step schedule it learned, and {cfg.method}'s"
            " sets carry none: use it with dd, or evaluate.recipe mtt"
        )
    if cfg.evaluate.recipe == "staged" and not getattr(section, "learns_stages", False):
        raise ConfigError(
            f"evaluate.recipe staged trains a set stage by stage and {cfg.method}'s sets carry no stages:"
            " use it with pdd, or evaluate.recipe mtt"
        )
    if isinstance(method.shards, str) and cfg.compute.shard_count() > 1:
        raise ConfigError(f"method {cfg.method} cannot be sharded ({method.shards}): set compute.shards=1")
    try:
        method.check(typed)
    except ValueError as err:
        raise ConfigError(f"invalid config: {err}") from None
    return typed


__all__ = [
    "METHODS",
    "Checkpoints",
    "DistillInputs",
    "Method",
    "Sharding",
    "SyntheticSet",
    "Variants",
    "configure",
    "get_method",
    "method_names",
    "register_method",
]
