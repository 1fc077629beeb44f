"""What a comparison is: its spec (a YAML file of methods, IPCs, models, data and recipes), and each
(method, IPC) cell's pipeline configs per variant."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from condense.config import PipelineConfig, Strict, explain
from condense.configure import RECIPE_DIR, load_config
from condense.errors import CondenseError, ConfigError
from condense.methods import get_method
from condense.stages import Job, Plan

COMPARE_DIR = RECIPE_DIR / "compare"
VARIANTS = ("main", "hard", "plain")
CELL_FAILURES = (Exception,)
"""What marks a cell failed instead of stopping the comparison: anything one cell's job raises, be it
bad input met only when the stage runs (a guard that refuses a teacher, a class too small),
divergence, or a bug or a device fault in one method; the other cells complete. An interrupt
(KeyboardInterrupt, SystemExit) still stops the whole comparison."""


class CompareConfig(Strict):
    """A comparison: which cells, on which data, under which recipes."""

    name: str = "custom"
    presets: str = "digits-{method}"
    """Each method's preset (a name or a YAML path, ``{method}`` replaced)."""
    methods: list[str] = Field(min_length=1)
    ipc: list[int] = Field(min_length=1)
    models: list[str] = Field(default_factory=lambda: ["convnet"], min_length=1)
    """Evaluation architectures: ``convnet`` and any timm name (cross-architecture accuracy)."""
    seed: int = 0
    dataset: dict[str, Any]
    """Every cell's ``dataset`` section (replaces its preset's), so every cell reads one dataset."""
    evaluate: dict[str, Any] = Field(default_factory=dict)
    """Merged into every cell's ``evaluate`` section (seeds, baselines)."""
    recipes: dict[Literal["hard", "soft", "learned", "kd"], dict[str, Any]] = Field(default_factory=dict)
    """Merged into ``evaluate`` by the method's label regime (its preset's recipe and labels)."""
    settings: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Per method: config sections merged into its cells (e.g. a smaller ``distill`` budget)."""
    settings_by_ipc: dict[str, dict[int, dict[str, Any]]] = Field(default_factory=dict)
    """Per method and IPC, merged last (e.g. CUDD's curricula, which must sum to the IPC)."""

    @field_validator("methods", "models")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"{value} names an entry twice")
        return value

    @field_validator("ipc")
    @classmethod
    def _positive_distinct(cls, value: list[int]) -> list[int]:
        if any(isinstance(v, bool) or v < 1 for v in value) or len(set(value)) != len(value):
            raise ValueError(f"IPCs must be distinct positive integers, got {value}")
        return value


@dataclass
class Cell:
    """One (method, IPC): its config per variant, planned jobs and (after the run) its status."""

    method: str
    ipc: int
    regime: str
    configs: dict[str, PipelineConfig]
    plans: dict[str, Plan] = field(default_factory=dict)
    jobs: list[str] = field(default_factory=list)
    """Names of the pooled jobs this cell needs, in plan order."""


@dataclass
class Comparison:
    """The cells and their pooled jobs: ``jobs[name]`` runs with ``configs[name]`` after ``after[name]``."""

    spec: CompareConfig
    cells: list[Cell]
    jobs: dict[str, Job] = field(default_factory=dict)
    configs: dict[str, PipelineConfig] = field(default_factory=dict)
    after: dict[str, list[str]] = field(default_factory=dict)

    @property
    def dataset_config(self) -> PipelineConfig:
        return self.cells[0].configs["main"]

    def artifacts(self) -> list[tuple[str, str]]:
        """(stage, key) of everything the comparison reads or writes."""
        found = {pair for cell in self.cells for plan in cell.plans.values() for pair in plan.artifacts()}
        return sorted(found)


def compare_names() -> list[str]:
    """The bundled comparisons (``condense/recipes/compare/*.yaml``)."""
    return sorted(p.stem for p in COMPARE_DIR.glob("*.yaml"))


def _read(source: str) -> dict[str, Any]:
    path = Path(source)
    if not source.endswith((".yaml", ".yml")) and not path.is_file():
        path = COMPARE_DIR / f"{source}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown comparison {source!r}; comparisons: {', '.join(compare_names())}")
    if not path.is_file():
        raise ConfigError(f"comparison file not found: {source}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        first = " ".join(str(err).split())[:200]
        raise ConfigError(f"cannot read comparison {path}: {first}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"comparison {path} must be a mapping of settings")
    data.setdefault("name", path.stem)
    return data


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in, mappings recursively (``extra`` wins)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def dotted(tree: dict[str, Any], prefix: str = "") -> list[str]:
    """``{"evaluate": {"epochs": 300}}`` -> ``["evaluate.epochs=300"]`` (values as JSON, which YAML
    reads back unchanged), the form ``--set`` and :func:`condense.configure.load_config` take."""
    out = []
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out += dotted(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={json.dumps(value)}")
    return out


def _regime(cfg: PipelineConfig) -> str:
    return "kd" if cfg.evaluate.recipe == "kd" else cfg.evaluate.labels


def _plain(cfg: PipelineConfig) -> list[str]:
    """Overrides that turn the recipe's augmentation off (and skip the full-data baseline)."""
    if cfg.evaluate.recipe == "kd":
        off = ["crop_scale=[1.0,1.0]", "crop_ratio=[1.0,1.0]", "flip=false", "cutmix_prob=0.0"]
        return [*(f"evaluate.kd.{o}" for o in off), "evaluate.full_data=false"]
    return ["evaluate.dsa=false", "evaluate.full_data=false"]


def cell_configs(spec: CompareConfig, method: str, ipc: int, overrides: list[str]) -> Cell:
    """The configs of one cell's variants; any bad setting is one ConfigError line naming the cell."""
    preset = spec.presets.format(method=method)
    where = f"{method} ipc {ipc} ({preset})"
    try:
        get_method(method)
        regime = _regime(load_config(preset, overrides))

        def load(regime: str, *extra: str) -> PipelineConfig:
            tree = merge({"evaluate": spec.evaluate}, {"evaluate": spec.recipes.get(regime, {})})  # type: ignore[call-overload]
            tree = merge(tree, spec.settings.get(method, {}))
            tree = merge(tree, spec.settings_by_ipc.get(method, {}).get(ipc, {}))
            fixed = [f"dataset={json.dumps(spec.dataset)}", f"ipc={ipc}", f"seed={spec.seed}"]
            fixed.append(f"evaluate.models={json.dumps(spec.models)}")
            return load_config(preset, [*dotted(tree), *fixed, *extra, *overrides])

        main = load(regime)
        configs = {"main": main, "plain": load(regime, *_plain(main))}
        if regime == "hard":
            configs["hard"] = main
        else:
            hard = ["evaluate.recipe=mtt", "evaluate.labels=hard", "relabel.mode=online"]
            configs["hard"] = load("hard", *hard, "evaluate.random_real=false")
    except CondenseError as err:
        raise ConfigError(f"{where}: {err}") from None
    return Cell(method, ipc, regime, configs)


def load_comparison(
    source: str,
    methods: list[str] | None = None,
    ipcs: list[int] | None = None,
    models: list[str] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> Comparison:
    """A comparison file, its lists replaced by the given ones, every cell's config validated now
    (an unknown method or architecture, an empty list: one ConfigError line, before any work).
    ``overrides`` go to every cell; ``budget=NAME`` also selects the comparison's own budget."""
    data = _read(source)
    budgets = data.pop("budgets", None) or {}
    budget = next((o.partition("=")[2].strip() for o in reversed(overrides) if o.startswith("budget=")), None)
    if budget is not None:
        if budget not in budgets:
            raise ConfigError(
                f"unknown budget {budget!r} for {source}; budgets: {', '.join(budgets) or 'none'}"
            )
        data = merge(data, budgets[budget])
    for key, given in (("methods", methods), ("ipc", ipcs), ("models", models)):
        if given is not None:
            data[key] = given
    try:
        spec = CompareConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(explain(err, CompareConfig).replace("config", "comparison", 1)) from None
    cells = [cell_configs(spec, m, ipc, list(overrides)) for m in spec.methods for ipc in spec.ipc]
    datasets = {json.dumps(c.configs["main"].dataset.model_dump(), sort_keys=True) for c in cells}
    if len(datasets) > 1:
        raise ConfigError("a comparison runs on one dataset: its cells' dataset sections differ")
    return Comparison(spec, cells)
