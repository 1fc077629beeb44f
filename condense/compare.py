"""``condense compare``: every (method, IPC) cell through the pipeline's own stages, scored fairly.

A comparison (``condense/presets/compare/<name>.yaml`` or a YAML path) names a list of methods, of
IPCs and of evaluation architectures, one ``dataset`` section for every cell, and the evaluation
recipe per label regime (``hard``, ``learned``, ``soft``: MTT's SGD+DSA recipe; ``kd``: the
RDED/SRe2L recipe). A cell's config is its method's preset (``presets``, e.g. ``digits-{method}``)
with the comparison's dataset section, its ``evaluate`` settings, the recipe of the method's label
regime, the method's own ``settings`` (and ``settings_by_ipc``), the IPC, the architectures and the
command's ``--set`` overrides, in that order.

Each cell is planned like ``condense run`` (:func:`condense.stages.make_plan`) three times over:

- ``main``: the method's own regime: distilled, random real and full data;
- ``hard``: the distilled images with hard labels under the ``hard`` recipe, beside full data under
  that recipe (DD-Ranking's hard-label recovery; the same plan as ``main`` for hard-label methods);
- ``plain``: ``main`` without augmentation (no DSA; for KD no crops, flips or CutMix), distilled and
  random real (DD-Ranking's augmentation-robust score).

The jobs of every cell and variant are pooled by name (a job's name holds its store key), so what
cells share (the dataset, experts, teachers, baselines per IPC and recipe) is one job, and a job
whose artifact is in the store is a cache hit: adding a method or an IPC computes only its cells.
No Prefect here; :mod:`condense_flows.compare` submits the pooled jobs.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from condense import artifacts, plots, scores, versions
from condense.config import ModelConfig, PipelineConfig, Strict, explain
from condense.configure import PRESET_DIR, load_config
from condense.errors import CondenseError, ConfigError
from condense.evaluate import summarize
from condense.methods import get_method
from condense.models import CONVNET
from condense.prepare import check_ipc
from condense.report import human_bytes, input_scale
from condense.stages import Job, Plan, make_plan
from condense.stages.base import input_key
from condense.store import Store, stable_hash, write_json

COMPARE_DIR = PRESET_DIR / "compare"
VARIANTS = ("main", "hard", "plain")
CELL_FAILURES = (Exception,)
"""What marks a cell failed instead of stopping the comparison: anything one cell's job raises, be it
bad input met only when the stage runs (a guard that refuses a teacher, a class too small),
divergence, or a bug or a device fault in one method; the other cells complete. An interrupt
(KeyboardInterrupt, SystemExit) still stops the whole comparison."""
UPSTREAM = ("difficulty", "experts", "teacher")
"""Stages whose seconds count as a method's preparation cost when its distillation reads them."""


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


# ----------------------------------------------------------------------------- configuration


def compare_names() -> list[str]:
    """The bundled comparisons (``condense/presets/compare/*.yaml``)."""
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


# ----------------------------------------------------------------------------- planning


def check_ipcs(comparison: Comparison, card: dict[str, Any]) -> None:
    """Every IPC fits every class (DatasetError otherwise), checked before any cell's job runs."""
    for ipc in comparison.spec.ipc:
        check_ipc(card, ipc)


def _needed(plan: Plan) -> list[Job]:
    """The plan's evaluation jobs and everything they wait for (not the export), in plan order."""
    wanted: set[str] = set()
    todo = [job.name for job in plan.jobs if job.stage == "evaluate"]
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo += plan.after[name]
    return [job for job in plan.jobs if job.name in wanted]


def plan_comparison(comparison: Comparison, store: Store, dataset_key: str) -> Comparison:
    """Plan every cell's variants and pool their jobs by name (equal names, equal work)."""
    check_ipcs(comparison, store.meta("dataset", dataset_key)["card"])
    for cell in comparison.cells:
        for variant, cfg in cell.configs.items():
            plan = make_plan(cfg, store, dataset_key)
            cell.plans[variant] = plan
            for job in _needed(plan):
                comparison.jobs.setdefault(job.name, job)
                comparison.configs.setdefault(job.name, cfg)
                comparison.after.setdefault(job.name, plan.after[job.name])
                if job.name not in cell.jobs:
                    cell.jobs.append(job.name)
    return comparison


# ----------------------------------------------------------------------------- scoring


Outcome = dict[str, Any] | BaseException | None
"""What a pooled job ended with: its outcome, the error that failed it, or None when it never ran
because a job it waits for failed."""


def failure(cell: Cell, outcomes: dict[str, Outcome]) -> str | None:
    """The one-line reason a cell failed (its first failed job's error), or None."""
    for name in cell.jobs:
        outcome = outcomes.get(name)
        if isinstance(outcome, BaseException):
            stage = name.split("-", 1)[0].split("[", 1)[0]
            message = " ".join(str(outcome).split())
            if not isinstance(outcome, CondenseError):  # not one of ours: its kind says what went wrong
                message = f"{type(outcome).__name__}: {message}" if message else type(outcome).__name__
            return f"{stage}: {message or type(outcome).__name__}"
    if any(outcomes.get(name) is None for name in cell.jobs):
        return "a job it needs did not run"
    return None


def _by_subject(store: Store, plan: Plan, arch: str) -> dict[str, dict[str, Any]]:
    """{subject: accuracy mean/std/runs, mean ECE and temperature-scaled ECE} of one variant."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for key in plan.keys["evaluate"]:
        meta = store.meta("evaluate", key)
        if meta["arch"] == arch:
            runs.setdefault(meta["subject"], []).extend(meta["runs"])
    out = {}
    for subject, found in runs.items():
        entry: dict[str, Any] = summarize([r["accuracy"] for r in found])
        for name in ("ece", "ece_scaled"):
            values = [r.get(name) for r in found]
            entry[name] = None if None in values else round(sum(values) / len(values), 2)
        out[subject] = entry
    return out


def _ancestors(plan: Plan, stage: str) -> set[str]:
    """Stage names of the jobs ``stage``'s job waits for, transitively."""
    after = {job.name: plan.after[job.name] for job in plan.jobs}
    stage_of = {job.name: job.stage for job in plan.jobs}
    todo = [name for name in after if stage_of[name] == stage]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        for upstream in after.get(name, []):
            if upstream not in seen:
                seen.add(upstream)
                todo.append(upstream)
    return {stage_of[name] for name in seen if name in stage_of} | {"dataset"}


def stage_seconds(meta: dict[str, Any]) -> float:
    """Compute time of an artifact: its own plus its parts' (one expert each)."""
    return float(meta.get("seconds", 0.0)) + sum(float(p.get("seconds", 0.0)) for p in meta.get("parts", []))


def cost(cell: Cell, store: Store) -> dict[str, Any]:
    """Distillation seconds, preparation seconds (experts, difficulty, teacher it reads), and the bytes
    of the images and of what their labels need (as stored, or the teacher when labels are online)."""
    cfg, plan = cell.configs["main"], cell.plans["main"]
    keys = plan.keys
    distill = store.meta("distill", str(keys["distill"]))
    upstream = [s for s in UPSTREAM if s in _ancestors(plan, "distill") and s in keys]
    synthetic = artifacts.load_synthetic(store, str(keys["distill"]))
    count, classes = (
        len(synthetic.labels),
        len(store.meta("dataset", str(keys["dataset"]))["card"]["classes"]),
    )
    image_bytes = int(synthetic.images.numel())  # one byte per pixel and channel, as exported
    if cfg.evaluate.recipe == "kd" and cfg.relabel.mode == "stored":
        labels, label_bytes = (
            "stored soft labels",
            int(store.meta("relabel", str(keys["relabel"]))["label_bytes"]),
        )
    elif cfg.evaluate.recipe == "kd":
        weights = store.path("teacher", str(keys["teacher"])) / artifacts.TEACHER_WEIGHTS
        labels, label_bytes = "teacher online", weights.stat().st_size
    elif cfg.evaluate.labels == "hard":
        labels, label_bytes = "hard", count  # one byte per class index
    else:
        labels, label_bytes = cfg.evaluate.labels, count * classes * 4  # float32 rows
    return {
        "distill_seconds": round(stage_seconds(distill), 2),
        "upstream_seconds": round(sum(stage_seconds(store.meta(s, str(keys[s]))) for s in upstream), 2),
        "image_bytes": image_bytes,
        "label_bytes": int(label_bytes),
        "labels": labels,
    }


def _mean_std(entry: dict[str, Any] | None) -> dict[str, float] | None:
    return None if entry is None else {"mean": entry["mean"], "std": entry["std"]}


def student(arch: str, model: ModelConfig) -> str:
    """The evaluation network as the leaderboard names it. A ConvNet shows its norm (and any width or
    depth it was given): the presets follow their papers, instance norm for MTT's family and batch
    norm for the teacher-based methods, so the same ``convnet`` is two different students unless
    ``evaluate.model`` pins one."""
    if arch != CONVNET:
        return arch
    shown = ["no norm" if model.norm == "none" else model.norm]
    shown += [f"width {model.width}"] if model.width != ModelConfig().width else []
    shown += [f"depth {model.depth}"] if model.depth is not None else []
    return f"{arch} ({', '.join(shown)})"


def score_cell(cell: Cell, arch: str, store: Store) -> dict[str, Any]:
    """The scores of one cell on one architecture, from its variants' evaluations."""
    main = _by_subject(store, cell.plans["main"], arch)
    hard = _by_subject(store, cell.plans["hard"], arch)
    plain = _by_subject(store, cell.plans["plain"], arch)
    distilled, random, full = main["distilled"], main.get("random_real"), main.get("full_data")
    entry: dict[str, Any] = {
        "accuracy": _mean_std(distilled),
        "random_real": _mean_std(random),
        "full_data": _mean_std(full),
        "hard_labels": {
            "distilled": _mean_std(hard["distilled"]),
            "full_data": _mean_std(hard.get("full_data")),
        },
        "no_augmentation": {
            "distilled": _mean_std(plain["distilled"]),
            "random_real": _mean_std(plain.get("random_real")),
        },
        "calibration": {"ece": distilled["ece"], "ece_scaled": distilled["ece_scaled"]},
    }
    found: dict[str, Any] = {}
    if random is not None and "full_data" in hard:
        found.update(
            scores.label_robust(
                hard["distilled"]["mean"], hard["full_data"]["mean"], distilled["mean"], random["mean"]
            )
        )
    if random is not None and "random_real" in plain:
        found.update(
            scores.augmentation_robust(
                distilled["mean"], random["mean"], plain["distilled"]["mean"], plain["random_real"]["mean"]
            )
        )
    entry["scores"] = {k: round(v, 4) for k, v in found.items()}
    return entry


def score(comparison: Comparison, store: Store, outcomes: dict[str, Outcome]) -> list[dict[str, Any]]:
    """One entry per method x IPC x architecture: status (ok, or failed with its reason), cached
    (every job of the cell was a cache hit), accuracies, scores, calibration and cost."""
    entries = []
    for cell in comparison.cells:
        reason = failure(cell, outcomes)
        cached = reason is None and all(outcomes[name]["cached"] for name in cell.jobs)  # type: ignore[index]
        cell_cost = cost(cell, store) if reason is None else None
        distill_key = str(cell.plans["main"].keys["distill"])
        scale = input_scale(store.meta("distill", distill_key).get("input_std")) if reason is None else None
        for arch in comparison.spec.models:
            entry: dict[str, Any] = {
                "method": cell.method,
                "ipc": cell.ipc,
                "arch": arch,
                "student": student(arch, cell.configs["main"].student),
                "regime": cell.regime,
                "status": "ok" if reason is None else "failed",
                "reason": reason,
                "cached": cached,
            }
            if reason is None:
                entry.update(
                    score_cell(cell, arch, store), cost=cell_cost, input_scale=scale, distill_key=distill_key
                )
            entries.append(entry)
    return entries


def fingerprint(comparison: Comparison, entries: list[dict[str, Any]]) -> str:
    """What a leaderboard version stands for: every cell's status and the keys it was computed from."""
    cells = [
        {
            "method": c.method,
            "ipc": c.ipc,
            "keys": sorted(input_key(p.keys["evaluate"]) for p in c.plans.values()),
            "ok": all(e["status"] == "ok" for e in entries if e["method"] == c.method and e["ipc"] == c.ipc),
        }
        for c in comparison.cells
    ]
    return stable_hash({"models": comparison.spec.models, "cells": cells})


# ----------------------------------------------------------------------------- outputs


def _cell(entry: dict[str, float] | None) -> str:
    return "-" if not entry else f"{entry['mean']:.2f} ± {entry['std']:.2f}"


def _number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


COLUMNS = [
    "method", "ipc", "student", "labels", "accuracy", "random real", "full data", "HLR", "IOR", "LRS", "ARS",
    "ECE", "ECE (T)", "input std", "distill s", "images", "labels size", "status",
]  # fmt: skip


def rows(entries: list[dict[str, Any]]) -> list[list[str]]:
    """The leaderboard as text cells, best accuracy first within each IPC and architecture."""
    ordered = sorted(
        entries,
        key=lambda e: (e["ipc"], e["arch"], e["status"] != "ok", -(e.get("accuracy") or {"mean": 0})["mean"]),
    )
    out = [COLUMNS]
    for e in ordered:
        if e["status"] != "ok":
            out.append(
                [e["method"], str(e["ipc"]), e["student"], e["regime"], *["-"] * 13, f"failed: {e['reason']}"]
            )
            continue
        s, c = e["scores"], e["cost"]
        out.append(
            [
                e["method"],
                str(e["ipc"]),
                e["student"],
                e["regime"],
                _cell(e["accuracy"]),
                _cell(e["random_real"]),
                _cell(e["full_data"]),
                _number(s.get("hlr")),
                _number(s.get("ior")),
                _number(s.get("lrs"), 3),
                _number(s.get("ars"), 3),
                _number(e["calibration"]["ece"]),
                _number(e["calibration"]["ece_scaled"]),
                "-" if e["input_scale"] is None else f"{e['input_scale']:.2f}x",
                f"{c['distill_seconds']:.1f}",
                human_bytes(c["image_bytes"]),
                human_bytes(c["label_bytes"]),
                "ok (cached)" if e["cached"] else "ok",
            ]
        )
    return out


def text_table(table: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table
    )


SCORES_NOTE = """\
Student: the network trained on the set (a ConvNet shows its norm: each method's preset uses its
paper's, instance norm for the hard and learned labels and batch norm for the teacher-based methods,
unless evaluate.model pins one; compare accuracies within one student). Accuracy: test accuracy (%)
of fresh networks trained only on the set, final epoch, mean ± std over seeds; random real: as many
random real images per class, same labels and recipe; full data: the whole training set, same
recipe. HLR (hard-label recovery) = full data minus distilled, both with hard labels under the hard-
label recipe (points; lower is better). IOR (improvement over random) = distilled minus random real
(points). DD-Ranking's scores from accuracies as fractions a = %/100: LRS = (e^alpha - e^-1) / (e -
e^-1) with alpha = 0.5 IOR - 0.5 HLR; ARS the same map of beta = 0.5 (a_syn - a_rand with
augmentation) + 0.5 (a_syn - a_rand without). ECE: expected calibration error (%, 15 bins) of the
distilled-set students on the test split; ECE (T): after temperature scaling fitted on training
images held out of their training. Input std: the std of the set's network inputs over that of real
training inputs (1.00x: the data's scale; a set far from it trains BatchNorm statistics that test
images do not have). Labels size: hard labels one byte each, learned/soft labels float32 rows,
stored KD labels as stored, online KD the teacher.
"""


def markdown(board: dict[str, Any]) -> str:
    table = rows(board["cells"])
    lines = [
        f"# {board['name']}: {board['dataset']}",
        "",
        f"Run `{board['run_id']}` ({board['seconds']:.0f} s).",
        "",
        "| " + " | ".join(table[0]) + " |",
        "|" + "---|" * len(table[0]),
        *["| " + " | ".join(row) + " |" for row in table[1:]],
        "",
        SCORES_NOTE,
        *[f"![{name}]({Path(path).name})" for name, path in board["pictures"].items()],
    ]
    return "\n".join(lines) + "\n"


def csv_text(entries: list[dict[str, Any]]) -> str:
    """One row per cell, flat columns (accuracies' mean and std, scores, calibration, cost)."""
    fields = ["method", "ipc", "arch", "student", "regime", "status", "reason", "cached"]
    pairs = ["accuracy", "random_real", "full_data"]
    extra = ["hlr", "ior", "lrs", "ars", "ece", "ece_scaled", "input_scale"]
    extra += ["distill_seconds", "upstream_seconds", "image_bytes", "label_bytes"]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([*fields, *(f"{p}_{s}" for p in pairs for s in ("mean", "std")), *extra])
    for e in entries:
        ok = e["status"] == "ok"
        values = [e[f] for f in fields]
        values += [(e.get(p) or {}).get(s) if ok else None for p in pairs for s in ("mean", "std")]
        found = {**e.get("scores", {}), **e.get("calibration", {}), **(e.get("cost") or {})}
        found["input_scale"] = e.get("input_scale")
        values += [found.get(x) for x in extra]
        writer.writerow(["" if v is None else v for v in values])
    return buffer.getvalue()


def pictures(
    comparison: Comparison, store: Store, entries: list[dict[str, Any]], folder: Path
) -> dict[str, str]:
    """Accuracy against IPC per architecture (with random-real and full-data lines per label
    regime), accuracy against distillation time, and each IPC's synthetic images, one row per
    method and one column per class; returns {name: path}."""
    out: dict[str, str] = {}
    ok = [e for e in entries if e["status"] == "ok"]
    for arch in comparison.spec.models:
        mine = [e for e in ok if e["arch"] == arch]
        if not mine:
            continue
        lines: dict[str, list[tuple[float, float]]] = {}
        dashed: dict[str, list[tuple[float, float]]] = {}
        for e in sorted(mine, key=lambda e: e["ipc"]):
            lines.setdefault(e["method"], []).append((e["ipc"], e["accuracy"]["mean"]))
            if e["random_real"]:
                dashed.setdefault(f"random real ({e['regime']})", []).append(
                    (e["ipc"], e["random_real"]["mean"])
                )
            if e["full_data"]:
                dashed.setdefault(f"full data ({e['regime']})", []).append((e["ipc"], e["full_data"]["mean"]))
        dashed = {k: sorted(set(v)) for k, v in dashed.items()}
        path = folder / f"accuracy-vs-ipc-{arch}.png"
        plots.line_chart(
            lines,
            dashed,
            f"{comparison.spec.name}: test accuracy vs images per class ({arch})",
            "images per class",
            "test accuracy (%)",
            log_x=True,
        ).save(path)
        out[f"accuracy_vs_ipc_{arch}"] = str(path)
        points = {
            f"{e['method']} ipc{e['ipc']}": (max(e["cost"]["distill_seconds"], 0.01), e["accuracy"]["mean"])
            for e in mine
        }
        path = folder / f"accuracy-vs-time-{arch}.png"
        plots.scatter_chart(
            points,
            f"{comparison.spec.name}: accuracy vs distillation time ({arch})",
            "distillation seconds",
            "test accuracy (%)",
            log_x=True,
        ).save(path)
        out[f"accuracy_vs_time_{arch}"] = str(path)
    classes = store.meta("dataset", str(comparison.cells[0].plans["main"].keys["dataset"]))["card"]["classes"]
    for ipc in comparison.spec.ipc:
        sets = {}
        for cell in comparison.cells:
            if cell.ipc == ipc and any(e["method"] == cell.method and e["ipc"] == ipc for e in ok):
                arrays = artifacts.load_synthetic_arrays(store, str(cell.plans["main"].keys["distill"]))
                sets[cell.method] = (arrays["pixels"], arrays["labels"])
        if sets:
            path = folder / f"images-ipc{ipc}.png"
            plots.image_rows(sets, classes, f"synthetic images, ipc {ipc} (first of each class)").save(path)
            out[f"images_ipc{ipc}"] = str(path)
    return out


def finish(
    comparison: Comparison, store: Store, outcomes: dict[str, Outcome], run_id: str, seconds: float
) -> dict[str, Any]:
    """Score every cell, write the leaderboard (markdown, CSV, JSON, pictures) into the store and
    publish it as a version (unchanged cells and results keep the latest); returns the leaderboard."""
    entries = score(comparison, store, outcomes)
    card = store.meta("dataset", str(comparison.cells[0].plans["main"].keys["dataset"]))["card"]
    name = comparison.spec.name
    series = versions.leaderboard_series(store, card["name"], name)
    relative = f"{versions.LEADERBOARDS}/{card['name']}/{name}/{run_id}"
    folder = store.root / relative
    folder.mkdir(parents=True)
    ok_keys = {e["distill_key"] for e in entries if e["status"] == "ok"}
    board: dict[str, Any] = {
        "name": name,
        "dataset": card["name"],
        "run_id": run_id,
        "seconds": round(seconds, 2),
        "methods": comparison.spec.methods,
        "ipc": comparison.spec.ipc,
        "models": comparison.spec.models,
        "cells": entries,
    }
    board["pictures"] = pictures(comparison, store, entries, folder)
    record = {
        "name": name,
        "dataset": card["name"],
        "fingerprint": fingerprint(comparison, entries),
        "folder": relative,
        "artifacts": [
            [stage, key] for stage, key in comparison.artifacts() if stage != "distill" or key in ok_keys
        ],
    }
    files = {
        name: folder / f"leaderboard.{ext}"
        for name, ext in (("markdown", "md"), ("csv", "csv"), ("json", "json"))
    }
    board["files"] = {k: str(v) for k, v in files.items()}
    files["csv"].write_text(csv_text(entries))
    files["markdown"].write_text(markdown(board))
    write_json(files["json"], board)
    store.share(relative)  # the files first: a published version never names a missing folder
    version, new = versions.publish_in(
        store, series, record, lambda latest: latest["fingerprint"] == record["fingerprint"]
    )
    board["version"] = {"number": version["version"], "new": new, "created": version["created"]}
    return board
