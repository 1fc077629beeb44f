"""The `condense` command end to end on digits at a tiny budget: summary, caching, determinism,
export, resume after SIGKILL, and the one-line errors for bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

import condense
from condense import report
from condense.store import load_arrays
from condense.store.remote import RemoteStore
from tests.conftest import ROOT, last_json, run_cli, tiny_args, tree

STAGES = ("dataset", "experts", "distill", "teacher", "soft_labels", "evaluate", "export")


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, prefect_env) -> tuple[Path, dict]:
    store = tmp_path_factory.mktemp("store")
    return store, last_json(run_cli(tiny_args(store), prefect_env).stdout)


def test_summary_has_the_documented_shape(first_run):
    store, summary = first_run
    for key in ("run_id", "dataset", "method", "ipc", "store", "seconds"):
        assert key in summary
    assert (summary["dataset"], summary["method"], summary["ipc"]) == ("digits", "mtt", 1)
    assert list(summary["stages"]) == list(STAGES)
    for stage in summary["stages"].values():
        assert stage["cached"] is False and len(stage["key"]) == 20
    convnet = summary["accuracy"]["convnet"]
    # Ten synthetic digits beat ten random real ones even at this budget (71.8 vs 59.4).
    assert len(convnet["runs"]) == 2 and convnet["mean"] > summary["baselines"]["random_real"]["mean"] + 5
    assert set(summary["baselines"]) == {"random_real", "full_data"}
    artifacts = summary["artifacts"]
    assert Path(artifacts["synthetic"]).is_dir() and Path(artifacts["manifest"]).is_file()
    images = load_arrays(Path(artifacts["synthetic"]))["images"].astype(np.float64)
    scale = summary["input_std"]
    assert scale["synthetic"] == pytest.approx(float(images.std()), rel=1e-6)
    assert abs(scale["real"] - 1) < 0.1  # normalised digits (pixels in [0, 1] would be near 0.4)
    assert Path(artifacts["grid_png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(Path(p).is_file() for p in artifacts["shards"])
    run_dir = Path(artifacts["run_dir"])
    assert (run_dir / "summary.json").is_file() and "![synthetic set](grid.png)" in (
        run_dir / "report.md"
    ).read_text()


@pytest.mark.parametrize(("synthetic", "warned"), [(1.5, False), (0.6, False), (2.5, True), (0.4, True)])
def test_the_summary_warns_when_the_set_is_off_the_data_scale(synthetic, warned):
    summary = {
        "teacher": {"arch": "convnet", "source": "trained", "test_accuracy": 90.0},
        "labels": {"kind": "hard"},
        "evaluation_recipe": "mtt",
        "input_std": {"synthetic": synthetic, "real": 1.0},
    }
    [line] = [x for x in report.context_lines(summary) if x.startswith("input scale")]
    assert line.startswith(f"input scale: synthetic std {synthetic:.2f} vs real 1.00 ({synthetic:.2f}x)")
    assert ("BatchNorm" in line) is warned


def test_a_rerun_hits_every_cache(first_run, prefect_env):
    store, summary = first_run
    again = last_json(run_cli(tiny_args(store), prefect_env).stdout)
    assert all(again["stages"][s]["cached"] for s in STAGES)
    assert again["stages"] == {
        name: {**stage, **{k: again["stages"][name][k] for k in ("seconds", "wall_seconds")}, "cached": True}
        for name, stage in summary["stages"].items()
    }
    assert again["accuracy"] == summary["accuracy"]
    assert summary["version"]["new"] is True and again["version"] == {**summary["version"], "new": False}


def test_changing_evaluation_reuses_experts_and_synthetic_set(first_run, prefect_env):
    store, _ = first_run
    changed = last_json(run_cli(tiny_args(store, "evaluate.epochs=10"), prefect_env).stdout)
    cached = {name: stage["cached"] for name, stage in changed["stages"].items()}
    assert cached == {
        "dataset": True,
        "experts": True,
        "distill": True,
        "teacher": True,
        "soft_labels": True,
        "evaluate": False,
        "export": False,
    }


def test_changing_distillation_reuses_experts(first_run, prefect_env):
    store, _ = first_run
    changed = last_json(run_cli(tiny_args(store, "distill.iterations=4"), prefect_env).stdout)
    assert changed["version"]["new"] is True and changed["version"]["number"] >= 2
    cached = {name: stage["cached"] for name, stage in changed["stages"].items()}
    assert cached == {
        "dataset": True,
        "experts": True,
        "distill": False,
        "teacher": True,
        "soft_labels": False,
        "evaluate": False,
        "export": False,
    }


def test_two_fresh_stores_get_byte_identical_synthetic_images(first_run, prefect_env, tmp_path):
    _, summary = first_run
    other = last_json(run_cli(tiny_args(tmp_path), prefect_env).stdout)
    a = load_arrays(Path(summary["artifacts"]["synthetic"]))["images"]
    b = load_arrays(Path(other["artifacts"]["synthetic"]))["images"]
    assert a.tobytes() == b.tobytes()
    assert other["stages"]["distill"]["key"] == summary["stages"]["distill"]["key"]


def test_the_distilled_set_loads_in_python_and_with_plain_webdataset(first_run):
    _, summary = first_run
    ds = condense.load_distilled(summary["artifacts"]["run_dir"])
    assert len(ds) == 10
    image, label, soft = ds[3]
    assert image.shape == (1, 8, 8) and label == 3
    assert soft.shape == (10,) and abs(float(soft.sum()) - 1) < 1e-5
    synthetic = load_arrays(Path(summary["artifacts"]["synthetic"]))["images"]
    np.testing.assert_array_equal(ds.images.numpy(), synthetic)

    plain = list(wds.WebDataset(summary["artifacts"]["shards"], shardshuffle=False).decode("rgb8"))
    assert sorted(int(s["cls"]) for s in plain) == list(range(10))
    assert {"input.npy", "png", "cls", "soft.npy"} <= set(plain[0])
    assert plain[0]["png"].shape == (8, 8, 3)


def test_sigkill_during_distillation_resumes_from_the_checkpoint(prefect_env, tmp_path):
    # Long enough that the kill lands after the first checkpoint and well before the end, short enough
    # that the resumed run finishes within run_cli's timeout on a loaded 2-core machine.
    args = tiny_args(tmp_path, "distill.iterations=60", "distill.checkpoint_every=5", quiet=False)
    proc = subprocess.Popen(
        [sys.executable, "-m", "condense_flows.cli", *args],
        cwd=ROOT,
        env=prefect_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    checkpoint = None
    while time.monotonic() < deadline and checkpoint is None:
        found = list((tmp_path / "distill" / ".partial").glob("*/checkpoint.pt"))
        checkpoint = found[0] if found else None
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert checkpoint is not None, "no distillation checkpoint appeared"

    resumed = run_cli(args, prefect_env)
    summary = last_json(resumed.stdout)
    assert summary["stages"]["experts"]["cached"] is True
    assert "resuming MTT from checkpoint at iteration" in resumed.stderr
    images = load_arrays(Path(summary["artifacts"]["synthetic"]))["images"]
    assert images.shape == (10, 1, 8, 8) and np.isfinite(images).all()


def _shards(tmp_path: Path, corrupt: bool) -> Path:
    root = tmp_path / "shards"
    root.mkdir()
    for split in ("train", "test"):
        path = root / f"{split}-000000.tar"
        if corrupt and split == "train":
            path.write_bytes(os.urandom(4096))
        else:
            tarfile.open(path, "w").close()  # a valid tar with no samples
    return root


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "no-such-preset"], "unknown preset 'no-such-preset'"),
        (["run", "digits-mtt", "--set", "distill.iteratons=5"], "unknown config key 'distill.iteratons'"),
        (["run", "digits-mtt", "--set", "method=dreamy"], "unknown method 'dreamy'"),
        (["run", "digits-mtt", "--set", "ipc=0"], "'ipc'"),
        (["run", "digits-mtt", "--set", "ipc=1000"], "ipc=1000 is larger than the smallest class"),
        (
            ["run", "cifar10-mtt", "--set", "dataset.path=/nonexistent/cifar"],
            "dataset path not found: /nonexistent/cifar",
        ),
    ],
)
def test_bad_input_is_one_line_nonzero_and_leaves_the_store_alone(args, message, prefect_env, tmp_path):
    store = tmp_path / "store"
    before = tree(store)
    proc = run_cli([*args, "--store", str(store)], prefect_env, check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert tree(store) == before


@pytest.mark.parametrize(
    ("corrupt", "message"), [(True, "corrupt or unreadable shard"), (False, "no samples")]
)
def test_bad_shards_are_one_line_errors(corrupt, message, prefect_env, tmp_path):
    root = _shards(tmp_path, corrupt)
    store = tmp_path / "store"
    proc = run_cli(
        ["run", "cifar10-mtt", "--set", f"dataset.path={root}", "--store", str(store)],
        prefect_env,
        check=False,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert tree(store) == []


def test_dream_runs_end_to_end_and_reports_its_clustering_cost(prefect_env, tmp_path):
    args = ["run", "digits-dream", "--store", str(tmp_path), "--json", "-q"]
    for item in (
        "dataset.train_per_class=40",
        "experts.epochs=2",
        "distill.iterations=12",
        "distill.interval=5",
        "distill.checkpoint_every=5",
        "evaluate.seeds=2",
        "evaluate.epochs=20",
        "evaluate.full_data_epochs=2",
    ):
        args += ["--set", item]
    summary = last_json(run_cli(args, prefect_env).stdout)
    assert summary["method"] == "dream"
    stats = summary["distill_stats"]
    # 12 iterations, re-clustered at 0, 5 and 10 for each of 10 classes
    assert stats["reclusters"] == 30 and stats["kmeans_seconds"] > 0 and stats["feature_seconds"] > 0
    assert summary["learned_lr"] is None
    assert len(condense.load_distilled(summary["artifacts"]["run_dir"])) == 10


def test_published_sets_are_listed_loaded_exported_and_garbage_collected(first_run, prefect_env, tmp_path):
    store, summary = first_run
    listed = [
        json.loads(line)
        for line in run_cli(["ls", "--store", str(store), "--json"], prefect_env).stdout.splitlines()
    ]
    latest = {(r["dataset"], r["method"], r["ipc"]): r for r in listed}[("digits", "mtt", 1)]
    table = run_cli(["ls", "--store", str(store), "--all"], prefect_env).stdout
    rows = [line.split()[:4] for line in table.splitlines()]
    assert ["digits", "mtt", "1", f"v{latest['version']}"] in rows

    ds = condense.load_distilled(store, dataset="digits", method="mtt", ipc=1, version="latest")
    assert len(ds) == 10 and ds.manifest["source_fingerprint"] == latest["source_fingerprint"]
    first = condense.load_distilled(store, dataset="digits", method="mtt", ipc=1, version=1)
    assert first.manifest["keys"]["distill"] == summary["keys"]["distill"]

    out = tmp_path / "folder"
    run_cli(
        ["export", str(store), "--dataset", "digits", "--method", "mtt", "--ipc", "1", "--to", str(out)],
        prefect_env,
    )
    labels = json.loads((out / "labels.json").read_text())
    assert len(labels["images"]) == 10 and (out / labels["images"][3]["file"]).read_bytes()[:4] == b"\x89PNG"
    assert abs(sum(labels["images"][3]["soft"]) - 1) < 1e-4

    dry = run_cli(["gc", "--store", str(store), "--dry-run", "--grace-minutes", "0"], prefect_env).stdout
    assert "would remove" in dry
    assert condense.load_distilled(store, dataset="digits", method="mtt", ipc=1)  # a dry run removes nothing


def _orphaned_servers() -> set[str]:
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if "uvicorn" in line and line.split()[1] == "1"}


def test_the_dask_runner_on_an_s3_store_gives_the_same_results_and_leaves_no_server_behind(
    first_run, prefect_env, s3, tmp_path
):
    """Expert and evaluation tasks on two Dask worker processes that exchange every artifact through
    an object store (moto's S3), against the thread runner's run on a local store."""
    _, summary = first_run
    before = _orphaned_servers()
    url = "s3://bucket/dask-store"
    env = {**prefect_env, **s3, "CONDENSE_CACHE": str(tmp_path / "cache")}
    on_dask = last_json(run_cli([*tiny_args(url), "--runner", "dask"], env).stdout)
    assert on_dask["keys"] == summary["keys"]
    assert on_dask["accuracy"] == summary["accuracy"]
    a = load_arrays(Path(summary["artifacts"]["synthetic"]))["images"]
    reader = RemoteStore(url, cache=tmp_path / "reader")
    b = load_arrays(reader.path("distill", on_dask["keys"]["distill"]) / "synthetic.zarr")["images"]
    # Dask workers run torch single-threaded (OMP_NUM_THREADS=1): reductions sum in another order,
    # so the images agree to float rounding rather than bit for bit.
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert _orphaned_servers() <= before
