"""The KD family end to end through `condense run`: digits-rded (teacher stage, KD recipe for every
subject, stored labels, caching, one-line errors for a wrong teacher or bad relabel settings) and
digits-cudd (recovery with curricula, its summary)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import zarr

import condense
from condense import report
from tests.conftest import last_json, run_cli

TINY_RDED = [
    "dataset.train_per_class=20",
    "teacher.epochs=4",
    "distill.candidates=10",
    "evaluate.seeds=2",
    "evaluate.epochs=6",
    "evaluate.full_data_epochs=1",
]


def rded_args(store: Path, *extra: str) -> list[str]:
    args = ["run", "digits-rded", "--store", str(store), "--json", "-q"]
    for item in [*TINY_RDED, *extra]:
        args += ["--set", item]
    return args


@pytest.fixture(scope="module")
def online_run(tmp_path_factory, prefect_env) -> tuple[Path, dict]:
    store = tmp_path_factory.mktemp("rded-store")
    return store, last_json(run_cli(rded_args(store), prefect_env).stdout)


def test_rded_trains_a_teacher_and_evaluates_everything_with_the_kd_recipe(online_run):
    _, summary = online_run
    assert list(summary["stages"]) == ["dataset", "teacher", "distill", "soft_labels", "evaluate", "export"]
    assert summary["teacher"]["source"] == "train" and summary["teacher"]["test_accuracy"] > 50
    assert summary["evaluation_recipe"] == "kd" and summary["labels"]["kind"] == "kd-online"
    assert set(summary["baselines"]) == {"random_real", "full_data"}
    stats = summary["distill_stats"]
    assert stats["selected_ce"] < stats["candidate_ce"] and stats["teacher_check_accuracy"] > 50
    # The teacher's most confident crops teach more than random real images (28.5 vs 20.0 here).
    assert summary["accuracy"]["convnet"]["mean"] > summary["baselines"]["random_real"]["mean"]
    assert len(condense.load_distilled(summary["artifacts"]["run_dir"])) == 10


def test_a_rerun_is_all_cached(online_run, prefect_env):
    store, summary = online_run
    again = last_json(run_cli(rded_args(store), prefect_env).stdout)
    assert all(stage["cached"] for stage in again["stages"].values())
    assert again["accuracy"] == summary["accuracy"]


def test_stored_relabeling_is_a_cached_stage_that_reports_its_size(online_run, prefect_env):
    store, summary = online_run
    stored = last_json(
        run_cli(rded_args(store, "relabel.mode=stored", "relabel.top_k=4"), prefect_env).stdout
    )
    stages = stored["stages"]
    assert stages["teacher"]["cached"] and stages["distill"]["cached"] and not stages["relabel"]["cached"]
    labels = stored["labels"]
    assert labels["kind"] == "kd-stored" and labels["top_k"] == 4
    assert labels["image_bytes"] == 10 * 64 and labels["label_bytes"] > labels["image_bytes"]
    group = zarr.open_group(str(store / "relabel" / stages["relabel"]["key"] / "labels.zarr"), mode="r")
    assert group["top_k_prob"].shape == (6, 10, 4) and group["boxes"].shape == (6, 10, 4)
    # More evaluation seeds reuse the stored labels: they depend on the set, not on the students.
    more = last_json(
        run_cli(
            rded_args(store, "relabel.mode=stored", "relabel.top_k=4", "evaluate.seeds=3"), prefect_env
        ).stdout
    )
    assert more["stages"]["relabel"]["cached"] is True and more["stages"]["evaluate"]["cached"] is False


def _one_line_error(proc) -> str:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    return lines[0]


def test_an_observer_with_another_class_order_fails_with_a_clear_message(online_run, prefect_env, tmp_path):
    store, summary = online_run
    weights = torch.load(
        store / "teacher" / summary["stages"]["teacher"]["key"] / "weights.pt", weights_only=True
    )
    perm = torch.roll(torch.arange(10), 1)
    weights["classifier.weight"] = weights["classifier.weight"][perm]
    weights["classifier.bias"] = weights["classifier.bias"][perm]
    torch.save(weights, tmp_path / "observer.pt")
    proc = run_cli(
        rded_args(store, "teacher.source=file", f"teacher.path={tmp_path / 'observer.pt'}"),
        prefect_env,
        check=False,
    )
    assert "class order does not match" in _one_line_error(proc)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["relabel.top_k=11"], "relabel.top_k 11 exceeds the number of classes (10)"),
        (["teacher.source=file", "teacher.path=/nonexistent/observer.pt"], "teacher file not found"),
    ],
)
def test_bad_teacher_and_relabel_settings_are_one_line_errors(extra, message, online_run, prefect_env):
    store, _ = online_run
    assert message in _one_line_error(run_cli(rded_args(store, *extra), prefect_env, check=False))


def test_cudd_runs_end_to_end_and_reports_its_recovery_and_curricula(online_run, prefect_env):
    store, _ = online_run
    args = ["run", "digits-cudd", "--store", str(store), "--json", "-q"]
    for item in (*TINY_RDED[:2], "distill.iterations=10", "distill.student_epochs=3", *TINY_RDED[3:]):
        args += ["--set", item]
    summary = last_json(run_cli(args, prefect_env).stdout)
    assert summary["stages"]["teacher"]["cached"] is True  # the same teacher settings as digits-rded
    stats = summary["distill_stats"]
    # Recovery starts from images the teacher gets right and lowers its CE: it still knows them all.
    assert stats["teacher_synthetic_accuracy"] >= 90 and stats["final_bn_loss"] > 0
    first, second = stats["curricula"]
    assert first["init"]["simple"] == 10 and "student_accuracy" in second
    text = report.text_table(summary)
    assert "recovery: the teacher classifies" in text and "curriculum 2: 1 per class" in text
    assert len(condense.load_distilled(summary["artifacts"]["run_dir"])) == 20
