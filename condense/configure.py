"""A run's config: a preset (or YAML file), its named budget, then ``key=value`` overrides, validated.

The schemas are :mod:`condense.config`; the ``distill`` section is typed by the method registry
(:func:`condense.methods.configure`), so adding a method never touches this file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from condense.config import PipelineConfig, explain
from condense.errors import ConfigError

PRESET_DIR = Path(__file__).parent / "presets"


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
    last = keys[-1]
    if isinstance(node.get(last), dict) and (value is None or isinstance(value, dict)):
        # ``--set experts={epochs: 3}`` changes one setting of the preset's section, not the others
        # (``experts={}`` changes nothing); ``experts=null`` resets the section to the schema's
        # defaults (``method=x distill=null``: the new method's settings, not the preset's method's).
        if value is None:
            del node[last]
        for key, item in (value or {}).items():
            _set_path(node[last], str(key), item)
        return
    node[last] = value


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last
    silently, so a setting written twice would quietly lose its first value)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def parse_override(text: str) -> tuple[str, Any]:
    """``"distill.iterations=300"`` -> ``("distill.iterations", 300)``; values are parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value, got {text!r}")
    try:
        value = _load_yaml(raw) if raw.strip() else None
    except yaml.constructor.ConstructorError as err:
        raise ConfigError(f"--set {key.strip()}: {err.problem}") from None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def preset_names() -> list[str]:
    """The bundled presets (``condense/presets/*.yaml``), by name."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error on one line: what and where (PyYAML's own report spans several)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return " ".join(f"{problem}{where}".split())


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
        data = _load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"cannot read config {path}: not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot read config {path}: {_yaml_problem(err)}") from None
    if not data:  # an empty file would silently run every default (the full digits budget)
        raise ConfigError(f"config {path} is empty: name a preset or write its settings there")
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of settings")
    data.setdefault("name", path.stem)
    return data


def build_config(data: dict[str, Any]) -> PipelineConfig:
    """Validate a config mapping (the schema, then the method's own section through the registry),
    turning pydantic's report into one actionable line."""
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(explain(err, PipelineConfig)) from None
    _check_architectures(cfg)
    # Here, not at the top: the methods (and torch) load only when a config is built, so listing the
    # presets stays instant.
    from condense import methods

    return methods.configure(cfg)


def _check_architectures(cfg: PipelineConfig) -> None:
    """Every network name is checked now, not when its stage runs after hours of others."""
    from condense.models import check_architecture

    named = [(f"evaluate.models[{i}]", name) for i, name in enumerate(cfg.evaluate.models)]
    if cfg.teacher.source != "best_expert":
        named.append(("teacher.arch", cfg.teacher.arch))
    for where, name in named:
        try:
            check_architecture(name)
        except ValueError as err:
            raise ConfigError(f"invalid config value for {where!r}: {err}") from None


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
