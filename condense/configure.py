"""A run's config, resolved from pieces, each value remembering where it came from.

A run is (dataset, method, IPC, budget) plus ``--set`` overrides. Its settings stack up in layers,
later ones winning:

1. the schemas' defaults (:mod:`condense.config`);
2. the **dataset card** (``condense/recipes/datasets/<dataset>.yaml``): source, path, classes,
   resolution, normalisation, the benchmark's evaluation network;
3. the **method's settings** (``condense/recipes/methods/<method>.yaml``), on every dataset;
4. the **budget**: ``cpu`` (the default: the card's and the method's CPU sizing, per dataset and IPC)
   or ``paper`` (the method's hyperparameter table from its paper or official scripts, one row per
   dataset and IPC; a combination without a row is an error naming the rows there are);
5. ``--set key=value`` overrides.

A run's name is ``<dataset>-<method>`` (``cifar100-mtt``); the preset names of earlier versions are
exactly these names and resolve to the configs they always did. A YAML file of one's own is one
layer of its own (with its ``budgets`` section of named dotted overrides), then the overrides; with
``base: <dataset>-<method>`` it is a layer over that pair (its budgets and IPC rows still apply).

A small resolver of our own rather than Hydra/OmegaConf: the layers are plain mappings merged by
:func:`_set_path`, which already gives ``--set`` its section-merge and ``null``-reset meaning; keeping
one merge means a value reads the same from a file, a card, a table or the command line, and the
provenance of each value is one dictionary kept beside the merge.

The schemas are :mod:`condense.config`; the ``distill`` section is typed by the method registry
(:func:`condense.methods.configure`), so adding a method never touches this file.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import importlib.metadata
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from condense import codeversion
from condense.config import PipelineConfig, explain
from condense.errors import ConfigError

RECIPE_DIR = Path(__file__).parent / "recipes"
DATASET_DIR = RECIPE_DIR / "datasets"
METHOD_DIR = RECIPE_DIR / "methods"
DEFAULT_DATASET = "digits"
BUDGETS = ("cpu", "paper")


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


def leaves(settings: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """A layer's settings as ``(dotted key, value)`` pairs: nested sections are walked, an empty
    mapping is a value of its own (``experts.schedule: {}`` turns PAD's schedule on)."""
    for key, value in settings.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from leaves(value, dotted + ".")
        else:
            yield dotted, value


@dataclass
class Resolution:
    """A config mapping being stacked up, with the layer that set each value."""

    tree: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def apply(self, source: str, settings: Mapping[str, Any]) -> None:
        for dotted, value in leaves(settings):
            _set_path(self.tree, dotted, value)
            for key in [k for k in self.sources if k.startswith(dotted + ".")]:
                del self.sources[key]  # a whole section replaced or reset
            self.sources[dotted] = source

    def source_of(self, dotted: str) -> str:
        """The layer that set ``dotted``, or a section above it; else the schema's default."""
        parts = dotted.split(".")
        for end in range(len(parts), 0, -1):
            found = self.sources.get(".".join(parts[:end]))
            if found is not None:
                return found if end == len(parts) else f"default (section set by {found})"
        return "default"


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


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error on one line: what and where (PyYAML's own report spans several)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return " ".join(f"{problem}{where}".split())


def _read_file(path: Path) -> dict[str, Any]:
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
    return data


# -- the pieces ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Card:
    """A benchmark dataset: its settings and its CPU sizing."""

    name: str
    title: str
    settings: dict[str, Any]
    cpu: dict[str, Any]


@dataclass(frozen=True)
class Recipe:
    """A method's settings on every dataset and its two budgets. A budget maps ``all`` (every
    dataset) and dataset names to a mapping of ``all`` (every IPC) and ``ipc<N>`` rows."""

    name: str
    title: str
    settings: dict[str, Any]
    cpu: dict[str, Any]
    paper: dict[str, Any]
    paper_source: str
    not_for: dict[str, str]
    """Datasets the method does not apply to, with the reason."""

    def paper_rows(self) -> dict[str, list[int]]:
        """The paper table's (dataset, IPC) rows."""
        return {
            dataset: sorted(int(key[3:]) for key in rows if key.startswith("ipc"))
            for dataset, rows in self.paper.items()
            if dataset != "all"
        }


def _ordered(folder: Path) -> list[tuple[Path, dict[str, Any]]]:
    """The YAML files of ``folder`` and their contents, in the order they ask for (``order``)."""
    files = [(path, _read_file(path)) for path in folder.glob("*.yaml")]
    return sorted(files, key=lambda item: (item[1].get("order", len(files)), item[0].stem))


@functools.cache
def cards() -> dict[str, Card]:
    """The dataset cards, by name."""
    found = {}
    for path, data in _ordered(DATASET_DIR):
        found[path.stem] = Card(
            name=path.stem,
            title=data["title"],
            settings=data.get("settings") or {},
            cpu=data.get("cpu") or {},
        )
    return found


@functools.cache
def recipes() -> dict[str, Recipe]:
    """The methods' recipes, by method name."""
    found = {}
    for path, data in _ordered(METHOD_DIR):
        paper = dict(data.get("paper") or {})
        found[path.stem] = Recipe(
            name=path.stem,
            title=data["title"],
            settings={"method": path.stem, **(data.get("settings") or {})},
            cpu=data.get("cpu") or {},
            paper=paper,
            paper_source=str(paper.pop("source", "")),
            not_for=data.get("not_for") or {},
        )
    return found


def preset_names() -> list[str]:
    """Every ``<dataset>-<method>`` run name the pieces make."""
    return sorted(f"{d}-{m}" for m, recipe in recipes().items() for d in cards() if d not in recipe.not_for)


def _split_name(name: str) -> tuple[str, str] | None:
    dataset, sep, method = name.rpartition("-")
    return (dataset, method) if sep and dataset in cards() and method in recipes() else None


def _unknown(kind: str, name: str, known: list[str], listing: str) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return ConfigError(f"unknown {kind} {name!r}{hint}; {listing}")


def _unknown_name(name: str) -> ConfigError:
    """The one-line error for a name that is no pair: which half is wrong, and the nearest names."""
    dataset, sep, method = name.rpartition("-")
    if sep and method in recipes() and dataset not in cards():
        return _unknown("dataset", dataset, list(cards()), f"datasets: {', '.join(cards())}")
    if sep and dataset in cards() and method not in recipes():
        return _unknown("method", method, list(recipes()), f"methods: {', '.join(recipes())}")
    return _unknown(
        "preset",
        name,
        preset_names(),
        f"a preset is <dataset>-<method> (datasets: {', '.join(cards())}; methods: "
        f"{', '.join(recipes())}), see `condense presets`, or give a YAML file",
    )


_BUDGET = re.compile(r"(?:(cpu|paper)(?:-ipc(\d+))?|ipc(\d+))")


def _parse_budget(budget: Any) -> tuple[str, int | None]:
    """``cpu``, ``paper``, and the earlier presets' forms ``ipc<N>`` (cpu at IPC N) and
    ``paper-ipc<N>`` (paper at IPC N) -> (budget, IPC or None)."""
    if budget is None:
        return "cpu", None
    match = _BUDGET.fullmatch(str(budget))
    if match is None:
        raise ConfigError(f"unknown budget {budget!r}: cpu or paper (paper-ipc<N>, ipc<N> also work)")
    kind, paper_ipc, cpu_ipc = match.groups()
    ipc = paper_ipc or cpu_ipc
    return kind or "cpu", int(ipc) if ipc else None


def _rows(budget: Mapping[str, Any], dataset: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A budget's ``all`` settings and its entry for ``dataset`` (``all`` + ``ipc<N>`` rows)."""
    return budget.get("all") or {}, budget.get(dataset) or {}


def _resolve_recipe(dataset: str, method: str, parsed: list[tuple[str, Any]], name: str) -> Resolution:
    card, recipe = cards()[dataset], recipes()[method]
    if dataset in recipe.not_for:
        raise ConfigError(f"{method} does not apply to {dataset}: {recipe.not_for[dataset]}")
    budget_value = next((value for key, value in reversed(parsed) if key == "budget"), None)
    budget, budget_ipc = _parse_budget(budget_value)

    res = Resolution()
    res.apply(f"dataset card {dataset}", card.settings)
    res.apply(f"method {method}", recipe.settings)
    every, entry = _rows(recipe.cpu if budget == "cpu" else recipe.paper, dataset)
    if budget == "cpu":
        res.apply(f"cpu budget (dataset card {dataset})", card.cpu)
        res.apply(f"cpu budget {method}", every)
        res.apply(f"cpu budget {method} on {dataset}", entry.get("all") or {})
    else:
        res.apply(f"paper table {method}", every)
        res.apply(f"paper table {method} on {dataset}", entry.get("all") or {})
    ipc = next((value for key, value in reversed(parsed) if key == "ipc"), budget_ipc)
    if ipc is None:
        ipc = _default_ipc(card, recipe)
    # The IPC picks the budget's row, so it is settled before the rows (an override sets it again).
    settled_by = f"budget {budget_value}" if budget_ipc is not None else f"default IPC of {dataset}-{method}"
    res.apply(settled_by, {"ipc": ipc})
    row = entry.get(f"ipc{ipc}")
    if budget == "paper":
        if row is None:
            raise ConfigError(_no_paper_row(recipe, dataset, ipc))
        res.apply(f"paper table {method} on {dataset} at IPC {ipc} ({recipe.paper_source})", row)
    elif row is not None:
        res.apply(f"cpu budget {method} on {dataset} at IPC {ipc}", row)
    if budget_value is not None:
        res.apply("--set", {"budget": budget_value})
    res.apply("preset name", {"name": name})
    return res


def _default_ipc(card: Card, recipe: Recipe) -> Any:
    """The IPC a run has when none is asked for: the CPU budget's for this pair (DATM's CPU runs
    are at IPC 10), else the method's, else 1. The same for either budget, so ``--budget paper``
    alone changes the scale, not the IPC."""
    every, entry = _rows(recipe.cpu, card.name)
    for layer in (entry.get("all") or {}, every, recipe.settings, card.settings):
        if "ipc" in layer:
            return layer["ipc"]
    return 1


def _no_paper_row(recipe: Recipe, dataset: str, ipc: Any) -> str:
    rows = recipe.paper_rows()
    if dataset in rows:
        where = f"{dataset} IPC {', '.join(map(str, rows[dataset]))}"
    else:
        where = "; ".join(f"{d} IPC {', '.join(map(str, i))}" for d, i in rows.items()) or "none"
    return (
        f"{recipe.name} has no paper table row for {dataset} at IPC {ipc}; rows: {where}"
        f" (--budget cpu runs any combination)"
    )


def _resolve_file(path: Path, parsed: list[tuple[str, Any]]) -> Resolution:
    """A YAML file of one's own: one layer, then its selected named budget (``budgets:``); or, with
    ``base: <dataset>-<method>``, that pair's resolution (its budgets and IPC rows) under the file."""
    data = _read_file(path)
    data.setdefault("name", path.stem)
    base = data.pop("base", None)
    if base is not None:
        pair = (DEFAULT_DATASET, base) if base in recipes() else _split_name(str(base))
        if pair is None:
            raise ConfigError(f"{path}: base {base!r} is not a preset; {_unknown_name(str(base))}")
        if "budgets" in data:
            raise ConfigError(f"{path}: a file with a base takes its budgets (cpu, paper), not its own")
        res = _resolve_recipe(*pair, parsed, str(base))
        res.apply(f"file {path}", data)
        return res
    budgets = data.pop("budgets", None) or {}
    budget = next((value for key, value in reversed(parsed) if key == "budget"), data.get("budget"))
    res = Resolution()
    res.apply(f"file {path}", data)
    if budget is not None:
        if budget not in budgets:
            known = ", ".join(sorted(budgets)) or "none"
            raise ConfigError(f"unknown budget {budget!r} for this config; budgets: {known}")
        res.apply(f"budget {budget} of {path}", budgets[budget])
        res.tree["budget"] = budget
    return res


def resolve(source: str, overrides: list[str] | tuple[str, ...] = ()) -> Resolution:
    """``source`` (``<dataset>-<method>``, a method name for digits, or a YAML path) stacked up with
    its budget and ``key=value`` overrides, unvalidated, each value with its layer."""
    parsed = [parse_override(text) for text in overrides]
    path = Path(source)
    if source.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise ConfigError(f"config file not found: {source}")
        res = _resolve_file(path, parsed)
    elif source in recipes():
        res = _resolve_recipe(DEFAULT_DATASET, source, parsed, f"{DEFAULT_DATASET}-{source}")
    elif (pair := _split_name(source)) is not None:
        res = _resolve_recipe(*pair, parsed, source)
    else:
        raise _unknown_name(source)
    for key, value in parsed:
        if key != "budget":
            res.apply("--set", {key: value})
    return res


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


def validated_dump(resolution: Resolution) -> dict[str, Any]:
    """``build_config(resolution.tree)`` dumped as JSON values, remembered on disk by the tree and the
    code that validates it (the schema, the method's module and what it imports, the model names'
    libraries): a config shown once is shown again without importing the methods and torch
    (``condense config`` in a fraction of a second). Validation reads no files, so nothing else can
    change its answer; a tree that fails it is never remembered, and a plugin method's never is."""
    memo = _memo_file(resolution.tree)
    if memo is not None:
        try:
            return json.loads(memo.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass
    dump = build_config(resolution.tree).model_dump(mode="json")
    if memo is not None:
        with contextlib.suppress(OSError):  # a cache that cannot be written is only not a cache
            memo.parent.mkdir(parents=True, exist_ok=True)
            scratch = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")
            scratch.write_text(json.dumps(dump), encoding="utf-8")
            os.replace(scratch, memo)
    return dump


def _memo_file(tree: dict[str, Any]) -> Path | None:
    method = tree.get("method")
    if not isinstance(method, str) or not (Path(__file__).parent / "methods" / f"{method}.py").is_file():
        return None
    code = codeversion.code_version("condense.configure", f"condense.methods.{method}", "condense.models")
    libraries = [f"{name} {_installed(name)}" for name in ("pydantic", "timm", "torchvision")]
    text = json.dumps([tree, code, libraries], sort_keys=True, default=str)
    return codeversion.cache_dir() / "configs" / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.json"


def _installed(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


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


def load_config(source: str, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """A preset name (``<dataset>-<method>``), a method name or a YAML path, then its budget, then
    ``key=value`` overrides, validated."""
    return build_config(resolve(source, overrides).tree)


def run_source(
    target: str, dataset: str | None, ipc: int | None, budget: str | None
) -> tuple[str, list[str]]:
    """The CLI's ``METHOD --dataset D --ipc N --budget B`` as a preset name and overrides."""
    extra = [f"ipc={ipc}"] if ipc is not None else []
    extra += [f"budget={budget}"] if budget is not None else []
    if dataset is None:
        return target, extra
    if target not in recipes():
        raise ConfigError(f"--dataset takes a method name ({', '.join(recipes())}), got {target!r}")
    if dataset not in cards():
        raise _unknown_name(f"{dataset}-{target}")
    return f"{dataset}-{target}", extra
