"""`condense plan --why`: each stage that would recompute says what changed (a module, a setting, an
input) against the closest artifact of its stage in the store, without running anything."""

from __future__ import annotations

import pytest

from condense import codeversion
from condense.configure import load_config
from condense.stages.base import PREIMAGE
from condense.stages.why import explain
from condense.store import Store
from tests.conftest import TINY, run_cli, run_pipeline


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    store = Store(tmp_path_factory.mktemp("why"))
    run_pipeline(store, load_config("digits-mtt", TINY))
    return store


def _edit(monkeypatch: pytest.MonkeyPatch, module: str) -> None:
    """As if ``module``'s code had changed: its digest differs from the one the store recorded."""
    digest = codeversion.module_digest
    monkeypatch.setattr(
        codeversion, "module_digest", lambda name: "0" * 16 if name == module else digest(name)
    )


def _verdicts(store: Store, *overrides: str) -> dict[str, str]:
    found = explain(load_config("digits-mtt", [*TINY, *overrides]), store)
    return {v.job: "cached" if v.cached else "; ".join(v.reasons) for v in found}


def test_every_artifact_records_its_keys_preimage(store):
    summary = store.meta(
        "distill", next(p.name for p in (store.root / "distill").iterdir() if p.name[0] != ".")
    )
    preimage = summary[PREIMAGE]
    assert preimage["config"]["distill"]["iterations"] == 6 and "experts" in preimage["inputs"]
    assert "condense.methods.mtt" in preimage["code"] and "condense.stages.base" not in preimage["code"]


def test_an_unchanged_config_is_all_cached(store):
    verdicts = _verdicts(store)
    assert set(verdicts.values()) == {"cached"} and "dataset" in verdicts and "export" in verdicts


def test_a_setting_names_the_field_and_its_values(store):
    verdicts = _verdicts(store, "distill.iterations=7")
    assert verdicts["distill"] == "distill.iterations 6 -> 7"
    assert verdicts["soft_labels"] == "input distill recomputes"
    assert verdicts["experts"] == verdicts["teacher"] == "cached"


def test_an_input_that_recomputes_is_named(store):
    verdicts = _verdicts(store, "experts.epochs=5")
    assert verdicts["experts"] == "experts.epochs 4 -> 5"
    assert "input experts recomputes" in verdicts["distill"]


def test_a_changed_module_is_named(store, monkeypatch):
    _edit(monkeypatch, "condense.experts")
    verdicts = _verdicts(store)
    assert verdicts["dataset"] == "cached"  # the dataset stage does not run the experts' code
    assert verdicts["experts"] == "condense/experts.py changed"
    assert verdicts["teacher"] == "input experts recomputes"  # digits-mtt's teacher is the best expert
    assert verdicts["evaluate-random_real-convnet-0+1"] == "cached"
    assert "input experts recomputes" in verdicts["distill"]


def test_the_command_prints_the_reasons(store, ephemeral_env):
    proc = run_cli(
        [
            "plan",
            "digits-mtt",
            *(a for o in TINY for a in ("--set", o)),
            "--set",
            "distill.iterations=7",
            "--store",
            str(store.root),
            "--why",
        ],
        ephemeral_env,
    )
    lines = {line.split()[0]: line for line in proc.stdout.splitlines()}
    assert lines["experts"].endswith("cached")
    assert lines["distill"].endswith("recompute: distill.iterations 6 -> 7")


def test_when_the_dataset_recomputes_the_later_stages_are_still_explained(store, monkeypatch):
    _edit(monkeypatch, "condense.zca")
    verdicts = _verdicts(store)
    assert verdicts["dataset"] == "condense/zca.py changed"
    assert "input dataset recomputes" in verdicts["experts"] and "export" in verdicts
