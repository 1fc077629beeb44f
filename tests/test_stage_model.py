"""The stage model: keys derived from the code (an edit re-keys exactly what depends on it, however
indirectly), the import graph without cycles, and a plan derived from what stages read."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from condense import codeversion
from condense.configure import load_config
from condense.stages import all_stages, make_plan
from condense.stages.dataset import prepare
from condense.store import Store
from tests.conftest import ROOT

# Prints every planned job's key for digits-dsa, with the package found first on sys.path.
PLAN_KEYS = """
import json, sys
from condense.configure import load_config
from condense.stages import get_stage, make_plan
from condense.store import Store
cfg = load_config("digits-dsa")
dataset = get_stage("dataset")
keys = {"dataset": dataset.key(cfg, {}, dataset.resolve(cfg))}
plan = make_plan(cfg, Store(sys.argv[1]), sys.argv[2])
keys.update({job.name.rsplit("-", 1)[0]: job.key for job in plan.jobs})
print(json.dumps(keys))
"""


def _plan_keys(package_parent: Path, store: Path, dataset_key: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    out = subprocess.run(
        [sys.executable, "-c", PLAN_KEYS, str(store), dataset_key],
        cwd=package_parent,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def _edited(parent: Path, module: str, anchor: str) -> Path:
    """A package copy in which the function whose docstring ends in ``anchor`` (in ``module``) has
    one more statement."""
    source = _package_copy(parent) / "condense" / module
    text = source.read_text()
    assert text.count(anchor) == 1, anchor
    source.write_text(text.replace(anchor, f"{anchor}\n    seed = int(seed)"))
    return parent


def test_editing_a_module_rekeys_what_imports_it_and_everything_downstream_and_nothing_else(tmp_path: Path):
    cfg = load_config("digits-dsa")
    store = tmp_path / "store"
    dataset_key, _ = prepare(cfg.dataset, Store(store), cfg.ipc)
    before = _plan_keys(_package_copy(tmp_path / "original"), store, dataset_key)
    # One function changed in experts.py: the experts, the teacher picked from them and what reads
    # the teacher. Not the DSA set: its matching loop builds networks with training.student_model,
    # and nothing of the expert code (where that factory used to live, in every DSA key).
    anchor = 'to start from instead (PDD\'s experts regenerated after a stage)."""'
    after = _plan_keys(_edited(tmp_path / "experts", "experts.py", anchor), store, dataset_key)
    changed = sorted(name for name in before if before[name] != after[name])
    print("\nkeys changed by editing experts.train_expert (digits-dsa):")
    for name in before:
        print(f"  {name:<32} {before[name]} -> {after[name]}{'' if name in changed else '  (same)'}")
    assert before.keys() == after.keys() and before["dataset"] == dataset_key
    # Upstream (the dataset) and unrelated (the baselines train on the dataset alone): unchanged.
    unchanged = [n for n in before if n.startswith(("dataset", "evaluate-full_data", "evaluate-random_real"))]
    assert unchanged and all(before[n] == after[n] for n in unchanged)
    # The distilled set's evaluation trains on hard labels: the teacher's soft labels only reach
    # the export.
    expected = {"experts", "teacher", "soft_labels", "export"} | {
        n for n in before if n.startswith("experts[")
    }
    assert set(changed) == expected
    # The factory itself still re-keys the DSA set it builds networks for.
    anchor = '"""The distillation architecture (ConvNet) for this dataset."""'
    factory = _plan_keys(_edited(tmp_path / "factory", "training.py", anchor), store, dataset_key)
    assert factory["distill"] != before["distill"] and factory["dataset"] == before["dataset"]


def test_the_code_version_follows_imports_but_not_registries():
    distill_mtt = codeversion.code_modules(["condense.stages.distill", "condense.methods.mtt"])
    assert "condense.methods.trajectory" in distill_mtt and "condense.methods.dsa" not in distill_mtt
    evaluate = codeversion.code_modules(["condense.stages.evaluate"])
    # Evaluation reads teachers and synthetic sets but runs none of the code that makes them.
    assert not {"condense.teacher", "condense.experts", "condense.methods.mtt"} & set(evaluate)
    assert "condense.stages.base" in evaluate  # the executor and keying are every stage's code


def _cycles() -> list[list[str]]:
    modules = sorted(
        ".".join(("condense", *p.relative_to(codeversion.ROOT).with_suffix("").parts)).removesuffix(
            ".__init__"
        )
        for p in codeversion.ROOT.rglob("*.py")
    )
    state: dict[str, int] = {}
    found: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(codeversion.direct_imports(module)):
            if state.get(target) == 1:
                found.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in modules:
        if module not in state:
            visit(module, [module])
    return found


def test_no_import_cycle_in_the_package():
    assert _cycles() == []


def test_the_cycle_check_finds_a_cycle(monkeypatch):
    graph = {"condense.config": {"condense.methods"}, "condense.methods": {"condense.config"}}
    monkeypatch.setattr(codeversion, "direct_imports", lambda module: graph.get(module, set()))
    assert _cycles() == [["condense.config", "condense.methods", "condense.config"]]


@pytest.mark.parametrize(
    ("preset", "overrides", "stages"),
    [
        ("digits-mtt", [], ["dataset", "experts", "distill", "teacher", "soft_labels", "evaluate", "export"]),
        ("digits-rded", [], ["dataset", "teacher", "distill", "soft_labels", "evaluate", "export"]),
        (
            "digits-rded",
            ["relabel.mode=stored"],
            ["dataset", "teacher", "distill", "soft_labels", "relabel", "evaluate", "export"],
        ),
    ],
)
def test_the_plan_holds_exactly_the_stages_something_reads(tmp_path, preset, overrides, stages):
    cfg = load_config(preset, overrides)
    store = Store(tmp_path)
    plan = make_plan(cfg, store, prepare(cfg.dataset, store, cfg.ipc)[0])
    assert ["dataset", *plan.stages()] == stages
    assert set(plan.stages()) <= set(all_stages())
    position = {job.name: i for i, job in enumerate(plan.jobs)}
    for job in plan.jobs:  # every job waits only for jobs planned before it
        assert all(position[name] < position[job.name] for name in plan.after[job.name])
    evaluations = plan.keys["evaluate"]  # one job per subject x model, its seeds trained together
    assert isinstance(evaluations, list) and len(set(evaluations)) == len(cfg.evaluate.models) * 3


def _package_copy(parent: Path) -> Path:
    shutil.copytree(ROOT / "condense", parent / "condense", ignore=shutil.ignore_patterns("__pycache__"))
    return parent


def test_comments_docstrings_and_formatting_never_rekey_and_infrastructure_edits_do_not_either(
    tmp_path: Path,
):
    cfg = load_config("digits-dsa")
    store = tmp_path / "store"
    dataset_key, _ = prepare(cfg.dataset, Store(store), cfg.ipc)
    original, edited = _package_copy(tmp_path / "original"), _package_copy(tmp_path / "edited")
    training = edited / "condense" / "training.py"
    text = training.read_text()
    assert '    """One pass over' in text
    training.write_text(
        "# a comment at the top\n"
        + text.replace('    """One pass over', '    """Reworded: one pass over').replace(
            "def train_on(", "\n\n# a comment between\ndef   train_on("
        )
    )
    config = edited / "condense" / "config.py"  # infrastructure: its code is in no key
    config.write_text(config.read_text() + "\n\ndef an_unused_helper() -> int:\n    return 1\n")
    assert _plan_keys(original, store, dataset_key) == _plan_keys(edited, store, dataset_key)


def _with_model_option(parent: Path, field: str) -> Path:
    """A package copy whose ModelConfig (in the key of every stage that builds a ConvNet) has one
    more field, declared as ``field``."""
    config = _package_copy(parent) / "condense" / "config.py"
    text = config.read_text()
    anchor = '    norm: Literal["instancenorm", "batchnorm", "none"] = "instancenorm"\n'
    assert anchor in text
    config.write_text(text.replace(anchor, f"{anchor}    new_option: bool = {field}\n"))
    return parent


def test_adding_a_field_at_its_neutral_value_rekeys_nothing_and_a_changed_default_rekeys_its_holders(
    tmp_path: Path,
):
    cfg = load_config("digits-dsa")
    store = tmp_path / "store"
    dataset_key, _ = prepare(cfg.dataset, Store(store), cfg.ipc)
    original = _plan_keys(_package_copy(tmp_path / "original"), store, dataset_key)
    added = _plan_keys(_with_model_option(tmp_path / "added", "added(False)"), store, dataset_key)
    assert added == original
    # The same field whose default no longer reproduces the old behaviour enters the keys of the
    # stages that build a ConvNet (and of what follows them); the dataset's stays.
    flipped = _plan_keys(
        _with_model_option(tmp_path / "flipped", "added(False, default=True)"), store, dataset_key
    )
    changed = {stage for stage in original if flipped[stage] != original[stage]}
    assert "dataset" not in changed and "distill" in changed, changed
    assert any(stage.startswith("evaluate-") for stage in changed), changed
    # A plain field (no neutral value declared) is a new setting like any other: it re-keys.
    plain = _plan_keys(_with_model_option(tmp_path / "plain", "False"), store, dataset_key)
    assert plain["distill"] != original["distill"]


PLUGIN = '''
"""A plugin method: {doc}"""
import torch
from condense.config import Strict
from condense.methods import register_method
from condense.methods.base import SyntheticSet


class MeansConfig(Strict):
    pass


@register_method("plugin-means", config=MeansConfig)
def means(inputs, checkpoints, progress):
    data = inputs.data
    images = torch.stack([data.train_x[data.train_y == c].mean(0) for c in range(data.num_classes)])
    return SyntheticSet(images=images * {scale}, labels=torch.arange(data.num_classes))
'''

PLUGIN_KEYS = """
import json, sys
sys.path.insert(0, sys.argv[3])
import plugin_means  # registers plugin-means
from condense.configure import load_config
from condense.stages import make_plan
from condense.store import Store
cfg = load_config("digits-dsa", ["method=plugin-means", "distill=null"])
plan = make_plan(cfg, Store(sys.argv[1]), sys.argv[2])
print(json.dumps({job.name.rsplit("-", 1)[0]: job.key for job in plan.jobs}))
"""


def test_editing_a_plugin_methods_file_rekeys_its_distillation_and_what_follows(tmp_path: Path):
    cfg = load_config("digits-dsa")
    store = tmp_path / "store"
    dataset_key, _ = prepare(cfg.dataset, Store(store), cfg.ipc)
    plugins = tmp_path / "plugins"
    plugins.mkdir()

    def keys(doc: str, scale: str) -> dict[str, str]:
        (plugins / "plugin_means.py").write_text(PLUGIN.format(doc=doc, scale=scale))
        out = subprocess.run(
            [sys.executable, "-c", PLUGIN_KEYS, str(store), dataset_key, str(plugins)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(out.stdout)

    first = keys("class means", "1.0")
    reworded = keys("the mean image of each class", "1.0")
    edited = keys("class means", "0.5")
    assert first == reworded  # its docstring is not its code
    changed = {name for name in first if first[name] != edited[name]}
    assert {"distill", "soft_labels", "export"} <= changed and "teacher" not in changed
    assert any(name.startswith("evaluate-distilled") for name in changed)
    assert not any(name.startswith("evaluate-random_real") for name in changed)


# Modules marked INFRASTRUCTURE whose imports reach hashed modules, and why that is safe: the
# executor runs stages (prepare's loading, devices' placement); their code stays in every key
# through the walk, only the executor's own is left out.
INFRASTRUCTURE_EXCEPTIONS = {
    "condense.stages.base": {"condense.devices", "condense.prepare"},
}


def test_infrastructure_imports_only_infrastructure_but_for_the_stated_exceptions():
    marked = [m for m in _modules() if codeversion.infrastructure(m) is not None]
    assert {"condense.config", "condense.stages.base", "condense.store.local", "condense.errors"} <= set(
        marked
    )
    for module in marked:
        hashed = {m for m in codeversion.direct_imports(module) if codeversion.infrastructure(m) is None}
        assert hashed <= INFRASTRUCTURE_EXCEPTIONS.get(module, set()), f"{module} imports {sorted(hashed)}"


def test_a_stage_key_holds_no_infrastructure_module_but_still_what_it_reaches_through_one():
    distill = codeversion.hashed_modules(["condense.stages.distill", "condense.methods.mtt"])
    assert "condense.stages.base" not in distill and "condense.config" not in distill
    assert "condense.prepare" in distill  # reached only through the executor
    assert codeversion.normalised(b'"""doc"""\nx = 1  # note\n') == codeversion.normalised(b"x = (1)\n")
    assert codeversion.normalised(b"x = 1\n") != codeversion.normalised(b"x = 2\n")


def _modules() -> list[str]:
    return sorted(
        ".".join(("condense", *p.relative_to(codeversion.ROOT).with_suffix("").parts)).removesuffix(
            ".__init__"
        )
        for p in codeversion.ROOT.rglob("*.py")
    )
