"""Typed configuration of a pipeline run.

A preset is just a YAML file of these fields (``condense/presets/*.yaml``); a run's config is a
preset plus ``key=value`` overrides. Every model forbids unknown keys, so a typo is an error, never
a silently ignored setting.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from condense.errors import ConfigError

PRESET_DIR = Path(__file__).parent / "presets"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatasetConfig(Strict):
    """Where the real data comes from and how it is prepared."""

    source: Literal["digits", "webdataset", "folder", "torchvision"] = "digits"
    name: str = "digits"
    """Display name; for ``source: torchvision`` the dataset class, e.g. ``CIFAR10``."""
    path: str | None = None
    """Shard directory (webdataset), image-folder root (folder) or download root (torchvision)."""
    train_urls: str | None = None
    """WebDataset URL/brace pattern for the train split; overrides ``path`` (local or remote)."""
    test_urls: str | None = None
    resolution: int | None = Field(default=None, gt=0)
    """Resize images to this square side; None keeps the native size."""
    train_per_class: int | None = Field(default=None, gt=0)
    """Keep only the first N training images of each class (CPU budgets); None keeps all."""
    zca: bool = False
    """ZCA-whiten train and test (fitted on train), as MTT does for some settings."""


class DSAConfig(Strict):
    """Differentiable siamese augmentation (Zhao & Bilen 2021), the defaults MTT uses."""

    strategy: str = "color_crop_cutout_flip_scale_rotate"
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5
    crop: float = 0.125
    cutout: float = 0.5
    scale: float = 1.2
    rotate: float = 15.0
    flip: float = 0.5

    @field_validator("strategy")
    @classmethod
    def _known_families(cls, value: str) -> str:
        known = {"color", "crop", "cutout", "flip", "scale", "rotate"}
        unknown = [f for f in value.split("_") if f not in known]
        if unknown or not value:
            raise ValueError(f"unknown DSA families {unknown}; choose from {sorted(known)} joined by '_'")
        return value


class ModelConfig(Strict):
    """ConvNet-D: D blocks of conv3x3(width) -> norm -> ReLU -> avgpool2, then a linear head."""

    width: int = Field(default=128, gt=0)
    depth: int | None = Field(default=None, gt=0)
    """None: chosen from the resolution so the last feature map is 4x4 (3 for 32 px, 4 for 64 px)."""
    norm: Literal["instancenorm", "batchnorm", "none"] = "instancenorm"


class ExpertsConfig(Strict):
    """Expert trajectories, MTT's buffer.py recipe: plain SGD, constant LR, DSA, a snapshot per epoch."""

    num_experts: int = Field(default=5, gt=0)
    epochs: int = Field(default=20, gt=0)
    lr: float = Field(default=0.01, gt=0)
    momentum: float = Field(default=0.0, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    batch_size: int = Field(default=256, gt=0)
    dsa: bool = True


class SoftLabelsConfig(Strict):
    """Teacher soft labels for the synthetic set."""

    teacher: Literal["best_expert"] = "best_expert"
    """The expert whose final weights fit the training data best (highest train accuracy)."""
    temperature: float = Field(default=4.0, gt=0)


class EvaluateConfig(Strict):
    """Train fresh networks on a set, test on the real test split (MTT's evaluate_synset recipe)."""

    models: list[str] = Field(default_factory=lambda: ["convnet"], min_length=1)
    """``convnet`` (the distillation architecture) and/or timm names such as ``resnet18``."""
    seeds: int = Field(default=3, gt=0)
    epochs: int = Field(default=300, gt=0)
    batch_size: int = Field(default=256, gt=0)
    lr: float | Literal["learned"] = "learned"
    """``learned``: the synthetic learning rate the method learned (MTT); else a fixed value."""
    momentum: float = Field(default=0.9, ge=0)
    weight_decay: float = Field(default=5e-4, ge=0)
    dsa: bool = True
    labels: Literal["hard", "soft"] = "hard"
    """``soft``: KD loss (KL at ``temperature``) against the stored teacher soft labels."""
    temperature: float = Field(default=4.0, gt=0)
    random_real: bool = True
    """Baseline: the same number of randomly chosen real images, same recipe, lr ``baseline_lr``."""
    full_data: bool = True
    """Baseline: the whole training set, ``full_data_epochs`` epochs."""
    baseline_lr: float = Field(default=0.01, gt=0)
    full_data_epochs: int = Field(default=30, gt=0)

    @field_validator("lr")
    @classmethod
    def _positive_lr(cls, value: float | str) -> float | str:
        if not isinstance(value, str) and value <= 0:
            raise ValueError("lr must be > 0 or 'learned'")
        return value


class PipelineConfig(Strict):
    """One pipeline run: dataset -> experts -> distill -> soft labels -> evaluate."""

    name: str = "custom"
    budget: str | None = None
    """The named budget (from the config's ``budgets`` section) applied on top of the preset."""
    method: str = "mtt"
    ipc: int = Field(default=1, gt=0)
    """Images per class of the distilled set."""
    seed: int = 0
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    dsa: DSAConfig = Field(default_factory=DSAConfig)
    experts: ExpertsConfig = Field(default_factory=ExpertsConfig)
    distill: Any = None
    """The method's own config (see ``condense.methods``); validated against ``method``."""
    soft_labels: SoftLabelsConfig = Field(default_factory=SoftLabelsConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    @model_validator(mode="after")
    def _method_config(self) -> PipelineConfig:
        from condense.methods import get_method

        method = get_method(self.method)
        raw = self.distill
        if isinstance(raw, BaseModel):
            raw = raw.model_dump()
        self.distill = method.config_cls.model_validate(raw or {})
        method.check(self)
        return self


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{key}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"distill.iterations=300"`` -> ``("distill.iterations", 300)``; values are parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _read_yaml(source: str) -> dict[str, Any]:
    path = Path(source)
    if source.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise ConfigError(f"config file not found: {source}")
    else:
        path = PRESET_DIR / f"{source}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown preset {source!r}; presets: {', '.join(preset_names())}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read config {path}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of settings")
    data.setdefault("name", path.stem)
    return data


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += _known_keys(ann, prefix + name + ".")
    return keys


def _explain(err: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    first = err.errors()[0]
    loc = prefix + ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        hint = difflib.get_close_matches(loc, _known_keys(model, prefix), n=1)
        return f"unknown config key {loc!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
    msg = first["msg"].removeprefix("Value error, ")
    return f"invalid config value for {loc!r}: {msg}" if loc else f"invalid config: {msg}"


def build_config(data: dict[str, Any]) -> PipelineConfig:
    """Validate a config mapping, turning pydantic's report into one actionable line."""
    from condense.methods import METHODS

    method = METHODS.get(str(data.get("method", "mtt")))
    if method is not None:  # the method's own section first, so its errors carry the 'distill.' prefix
        try:
            method.config_cls.model_validate(data.get("distill") or {})
        except ValidationError as err:
            raise ConfigError(_explain(err, method.config_cls, "distill.")) from None
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_explain(err, PipelineConfig)) from None


def _apply_budget(data: dict[str, Any], budget: str | None) -> None:
    """A config may name budgets (``budgets: {paper: {dotted.key: value}}``) so that a whole scale
    change, e.g. CPU-sized to paper-sized, is one ``--set budget=paper`` away."""
    budgets = data.pop("budgets", None) or {}
    if budget is None:
        return
    if budget not in budgets:
        known = ", ".join(sorted(budgets)) or "none"
        raise ConfigError(f"unknown budget {budget!r} for this config; budgets: {known}")
    for key, value in budgets[budget].items():
        _set_path(data, key, value)
    data["budget"] = budget


def load_config(source: str, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """A preset name or YAML path, then its selected budget, then ``key=value`` overrides, validated."""
    data = _read_yaml(source)
    parsed = [parse_override(text) for text in overrides]
    budget = next((value for key, value in reversed(parsed) if key == "budget"), data.get("budget"))
    _apply_budget(data, budget)
    for key, value in parsed:
        if key != "budget":
            _set_path(data, key, value)
    return build_config(data)
