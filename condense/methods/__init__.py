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
from dataclasses import dataclass
from importlib.metadata import entry_points
from types import MappingProxyType
from typing import Any

from pydantic import BaseModel, ValidationError

from condense.config import PipelineConfig, explain
from condense.errors import ConfigError
from condense.methods.base import Checkpoints, DistillInputs, SyntheticSet

INPUTS = ("experts", "teacher")
"""What a method may need besides the real data: expert trajectories, a trained teacher."""


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
class Method:
    name: str
    config_cls: type[BaseModel] | Variants
    distill: Callable[..., SyntheticSet]
    check: Callable[[PipelineConfig], None]
    """Cross-field validation against the whole pipeline config; raises ValueError."""
    needs: frozenset[str]
    module: str
    """Where the method is defined: its import closure is the method's code version in cache keys."""
    streams: bool = False
    """Reads real data only through draws by index and epochs, so it runs on a streamed dataset."""


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
) -> Callable[[Callable[..., SyntheticSet]], Callable[..., SyntheticSet]]:
    """Register the decorated ``distill(inputs, checkpoints, progress)`` as method ``name``;
    ``streams``: it reads the real data only by :meth:`images` draws and :meth:`batches` epochs
    (:mod:`condense.streaming`), never the whole training split."""
    unknown = set(needs) - set(INPUTS)
    if unknown:
        raise ValueError(f"method {name!r} needs {sorted(unknown)}; a method may need {list(INPUTS)}")

    def decorate(distill: Callable[..., SyntheticSet]) -> Callable[..., SyntheticSet]:
        method = Method(name, config, distill, check, frozenset(needs), distill.__module__, streams)
        known = _registry.get(name)
        if known is not None and known.module != method.module:
            raise ValueError(f"method {name!r} is registered twice: in {known.module} and {method.module}")
        _registry[name] = method
        return distill

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
    "SyntheticSet",
    "Variants",
    "configure",
    "get_method",
    "method_names",
    "register_method",
]
