"""Devices: the setting and its errors, jobs spread over device strings, several seeds trained as one
(equal to one at a time), the compiled path, peak memory and out-of-memory errors. CUDA-only checks
run where a GPU is present and are skipped elsewhere."""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import warnings
import weakref

import pytest
import torch

from condense import devices
from condense.config import ComputeConfig, DatasetConfig, DSAConfig
from condense.configure import load_config
from condense.errors import CondenseError, ConfigError
from condense.evaluate import Recipe, train_and_test, train_and_test_seeds
from condense.models import ConvNet
from condense.prepare import load
from condense.report import text_table
from condense.stages.dataset import prepare
from condense.store import Store, load_arrays
from tests.conftest import TINY, plan_for, run_pipeline

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    store = Store(tmp_path_factory.mktemp("digits"))
    return load(store, prepare(DatasetConfig(train_per_class=20), store, 1)[0])


def test_device_settings_resolve_or_fail_in_one_line():
    assert devices.resolve("cpu") == torch.device("cpu")
    assert devices.resolve("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="unknown device 'gpu'"):
        devices.resolve("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no usable CUDA device"):
            devices.resolve("cuda:0")
    assert devices.fan_out("cpu", None) == ["cpu"]
    assert devices.fan_out("auto", ["cpu", "cpu"]) == ["cpu", "cpu"]
    with pytest.raises(ConfigError, match="invalid config value for 'compute.device'"):
        load_config("digits-mtt", ["compute.device=tpu"])


def test_the_plan_spreads_fanned_out_jobs_over_the_devices_in_turn(tmp_path):
    cfg = load_config("digits-mtt", [*TINY, "compute.devices=[cpu,cpu]", "evaluate.seeds_per_job=1"])
    plan = plan_for(Store(tmp_path), cfg)
    parts = [job.device for job in plan.jobs if job.part is not None]
    assert parts == ["cpu", "cpu"]
    evaluations = [job for job in plan.jobs if job.stage == "evaluate"]
    assert len(evaluations) == 6 and all(job.device == "cpu" for job in evaluations)
    assert all(job.device is None for job in plan.jobs if job.stage in ("distill", "teacher"))


def test_several_seeds_trained_as_one_equal_one_at_a_time(digits):
    recipe = Recipe(epochs=6, lr=0.01, batch_size=16, momentum=0.9, weight_decay=5e-4, dsa=DSAConfig())
    xs = [digits.train_x[:40], digits.train_x[40:80]]  # each seed its own set, as random real images
    ys = [digits.train_y[:40], digits.train_y[40:80]]
    alone = [
        train_and_test("convnet", digits, x, y, recipe, s) for x, y, s in zip(xs, ys, (5, 6), strict=True)
    ]
    together = train_and_test_seeds("convnet", digits, xs, ys, recipe, [5, 6])
    for a, b in zip(alone, together, strict=True):
        assert b["accuracy"] == pytest.approx(a["accuracy"], abs=0.3)
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
    assert alone[0]["accuracy"] != alone[1]["accuracy"]  # the seeds really differ


def test_batch_norm_networks_fall_back_to_one_at_a_time(digits):
    from condense.config import ModelConfig

    recipe = Recipe(epochs=1, lr=0.01, batch_size=16, momentum=0.9, weight_decay=5e-4, dsa=None)
    bn = ModelConfig(width=8, norm="batchnorm")
    x, y = digits.train_x[:30], digits.train_y[:30]
    together = train_and_test_seeds("convnet", digits, [x, x], [y, y], recipe, [1, 2], bn)
    alone = [train_and_test("convnet", digits, x, y, recipe, seed, bn) for seed in (1, 2)]
    assert [r["accuracy"] for r in together] == [r["accuracy"] for r in alone]


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None, reason="no C compiler")
def test_the_compiled_path_matches_eager(digits):
    recipe = Recipe(epochs=1, lr=0.01, batch_size=32, momentum=0.9, weight_decay=5e-4, dsa=None)
    x, y = digits.train_x[:64], digits.train_y[:64]  # two batches of one shape: one compilation
    from condense.config import ModelConfig

    small = ModelConfig(width=8)
    eager = train_and_test("convnet", digits, x, y, recipe, 3, small)
    compiled = train_and_test("convnet", digits, x, y, recipe, 3, small, compile_step=True)
    assert compiled["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-4)
    assert compiled["accuracy"] == pytest.approx(eager["accuracy"], abs=0.3)


def test_a_failing_compiler_falls_back_to_eager_once_for_the_whole_process(monkeypatch):
    def broken(*args, **kwargs):
        raise torch._dynamo.exc.TorchDynamoException("InvalidCxxCompiler: no working C++ compiler found")

    monkeypatch.setattr(devices, "_compile_failure", [])
    net = ConvNet(1, 3, 8)
    step = devices.Compiled(net, True, torch.device("cpu"))
    monkeypatch.setattr(step, "compiled", broken)
    x = torch.randn(2, 1, 8, 8)
    with pytest.warns(UserWarning, match="torch.compile is not available here"):
        out = step(x)
    assert torch.equal(out, net(x)) and step.compiled is None
    assert "InvalidCxxCompiler" in devices.compile_failure()
    later = devices.Compiled(net, True, torch.device("cpu"))  # a later job: no retry, no second warning
    assert later.compiled is None and torch.equal(later(x), net(x))


def test_compile_on_and_off_are_settings_not_yaml_booleans():
    assert load_config("digits-mtt", ["compute.compile=on"]).compute.compile == "on"
    assert load_config("digits-mtt", ["compute.compile=off"]).compute.compile == "off"
    with pytest.raises(ConfigError, match="compute.compile"):
        load_config("digits-mtt", ["compute.compile=sometimes"])


def test_running_out_of_device_memory_is_one_line_naming_what_lowers_it():
    message = "does not fit in the memory of cpu: lower distill.batch_syn"
    with pytest.raises(CondenseError, match=message), devices.measured(torch.device("cpu"), "distill"):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    # cuBLAS and cuDNN report their allocation failures as plain RuntimeErrors.
    with (
        pytest.raises(CondenseError, match="does not fit"),
        devices.measured(torch.device("cpu"), "evaluate"),
    ):
        raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
    with pytest.raises(ValueError, match="not memory"), devices.measured(torch.device("cpu"), "evaluate"):
        raise ValueError("not memory")


def test_an_out_of_memory_stage_frees_its_tensors_before_the_error_travels_on():
    def stage(tensors: list[weakref.ref]) -> None:
        activations = torch.zeros(1000)  # held only by this frame, as a stage's tensors are
        tensors.append(weakref.ref(activations))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    tensors: list[weakref.ref] = []
    try:
        with devices.measured(torch.device("cpu"), "distill"):
            stage(tensors)
    except CondenseError as err:
        kept = err  # a comparison keeps the error as its cell's outcome
    assert tensors[0]() is None, "the failed stage's tensor is still alive"
    assert kept.__context__ is None or kept.__context__.__traceback__ is None


def test_a_trajectory_stage_out_of_memory_suggests_the_constant_memory_walk():
    from condense.stages.base import _lower_memory

    assert "distill.memory=constant" in _lower_memory("distill", load_config("digits-mtt"))
    assert "distill.memory=constant" not in _lower_memory("distill", load_config("digits-dm"))
    assert "distill.memory=constant" not in _lower_memory("evaluate", load_config("digits-mtt"))


def _pretend_gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_cuda_is_cuda_zero_in_turns_and_counters(monkeypatch):
    _pretend_gpus(monkeypatch, 2)
    assert devices.resolve("cuda") == devices.resolve("cuda:0") == torch.device("cuda:0")
    assert devices.indexed(torch.device("cuda")) == torch.device("cuda:0")
    # One turn for both names: a job on "cuda" holds GPU 0's, so one on "cuda:0" waits.
    with devices.exclusive(torch.device("cuda")):
        assert not devices._slots["cuda:0"].acquire(blocking=False)
    with pytest.raises(ConfigError, match="only 2 CUDA device"):
        devices.resolve("cuda:2")


def test_the_worker_resolves_auto_not_the_planner(monkeypatch, tmp_path):
    cfg = load_config("digits-mtt", [*TINY, "compute.device=auto", "evaluate.seeds_per_job=1"])
    plan = plan_for(Store(tmp_path), cfg)
    spread = [job.device for job in plan.jobs if job.part is not None or job.stage == "evaluate"]
    assert spread and all(name.startswith("auto#") for name in spread)  # nothing pinned to this CPU
    assert devices.resolve(spread[0]) == torch.device("cpu")  # a worker without a GPU
    _pretend_gpus(monkeypatch, 2)  # a worker with two: its jobs take them in turn
    assert {str(devices.resolve(f"auto#{turn}")) for turn in range(4)} == {"cuda:0", "cuda:1"}
    assert devices.resolve("cuda#3") == torch.device("cuda:1")


def test_building_a_network_leaves_the_gpus_random_generators_alone(monkeypatch):
    from condense.models import build_model

    reseeded: list[int] = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded.append)
    monkeypatch.setattr(torch.cuda, "manual_seed", reseeded.append)
    first = build_model("convnet", 1, 3, 8, seed=4)
    assert reseeded == []
    assert torch.equal(first.classifier.weight, build_model("convnet", 1, 3, 8, seed=4).classifier.weight)


def test_cuda_switches_are_set_for_a_job_and_restored_after_the_last(monkeypatch):
    before = devices._cuda_flags()
    gpu = torch.device("cuda:0")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    with devices.configured(gpu, deterministic=True):
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()  # grid_sample has no such kernel
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == devices.CUBLAS_WORKSPACE
        with devices.configured(gpu, deterministic=True):  # a second job of the same mode joins
            pass
        assert torch.are_deterministic_algorithms_enabled()
        with pytest.raises(CondenseError, match="cannot run beside"), devices.configured(gpu, False):
            pass
    assert devices._cuda_flags() == before
    with devices.configured(gpu, deterministic=False):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.benchmark
    assert devices._cuda_flags() == before
    with devices.configured(torch.device("cpu"), deterministic=True):
        assert devices._cuda_flags() == before  # CPU jobs change nothing


def test_kernels_without_a_deterministic_version_are_named_not_printed():
    name = "grid_sampler_2d_backward_cuda"
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        devices.prepare_process()
        warnings.warn(
            f"{name} does not have a deterministic implementation, but you set warn_only", stacklevel=1
        )
    assert name in devices.nondeterministic_kernels()


def test_stacked_seeds_train_networks_with_dropout(digits, monkeypatch):
    """vmap's default refuses random operations; dropout draws a mask per seed instead."""
    from condense import evaluate

    def with_dropout(name, channels, classes, resolution, cfg=None, seed=0):
        net = ConvNet(channels, classes, resolution)
        return torch.nn.Sequential(net.features, torch.nn.Flatten(), torch.nn.Dropout(0.5), net.classifier)

    monkeypatch.setattr(evaluate, "build_model", with_dropout)
    recipe = Recipe(epochs=2, lr=0.01, batch_size=16, momentum=0.9, weight_decay=5e-4, dsa=None)
    x, y = digits.train_x[:40], digits.train_y[:40]
    results = train_and_test_seeds("convnet", digits, [x, x], [y, y], recipe, [1, 2])
    assert len(results) == 2 and all(r["accuracy"] > 10 for r in results)  # ten classes: chance is 10


def test_a_run_says_which_device_ran_each_stage_and_spreading_changes_nothing(tmp_path):
    base = run_pipeline(Store(tmp_path / "a"), load_config("digits-mtt", TINY))
    spread = run_pipeline(
        Store(tmp_path / "b"), load_config("digits-mtt", [*TINY, "compute.devices=[cpu,cpu]"])
    )
    assert base["keys"] == spread["keys"]  # the device is in no key
    assert base["accuracy"] == spread["accuracy"]
    assert all(stage["devices"] == ["cpu"] for stage in base["stages"].values())
    assert base["devices"]["cpu"]["threads"] == torch.get_num_threads()
    assert "device cpu:" in text_table(base)


@CUDA
def test_every_stage_runs_on_the_gpu(tmp_path):
    cfg = load_config("digits-mtt", [*TINY, "compute.device=cuda"])
    summary = run_pipeline(Store(tmp_path), cfg)
    assert all(
        stage["devices"][0].startswith("cuda")
        for name, stage in summary["stages"].items()
        if name != "dataset"
    )
    assert all(
        "peak_memory_bytes" in s for n, s in summary["stages"].items() if not s["cached"] and n != "dataset"
    )
    images = load_arrays(Store(tmp_path).path("distill", summary["keys"]["distill"]) / "synthetic.zarr")[
        "images"
    ]
    assert torch.isfinite(torch.from_numpy(images)).all()


@CUDA
def test_compiled_matches_eager_on_the_gpu(digits):
    gpu = digits.to("cuda")
    recipe = Recipe(epochs=2, lr=0.01, batch_size=32, momentum=0.9, weight_decay=5e-4, dsa=DSAConfig())
    x, y = gpu.train_x[:64], gpu.train_y[:64]
    eager = train_and_test("convnet", gpu, x, y, recipe, 3)
    compiled = train_and_test("convnet", gpu, x, y, recipe, 3, compile_step=True)
    assert compiled["accuracy"] == pytest.approx(eager["accuracy"], abs=1.0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="fewer than two CUDA devices")
def test_jobs_spread_over_two_gpus(tmp_path):
    cfg = load_config("digits-mtt", [*TINY, "compute.devices=[cuda:0,cuda:1]", "evaluate.seeds_per_job=1"])
    summary = run_pipeline(Store(tmp_path), cfg)
    assert summary["stages"]["evaluate"]["devices"] == ["cuda:0", "cuda:1"]


def test_the_gpu_benchmark_runs_its_smoke_budget_anywhere(tmp_path):
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [
            sys.executable,
            "bench/gpu.py",
            "--smoke",
            "-q",
            "--store",
            str(tmp_path / "store"),
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    stages = {row["stage"]: row for row in result["stages"]}
    assert stages["experts"]["images/s"] > 0 and stages["distill"]["s/iteration"] > 0
    assert stages["evaluate"]["s/eval run (distilled)"] > 0
    assert "end to end" in proc.stdout and len(result["accuracy"]["runs"]) == 2


def _max_inside(device: torch.device, cpu_jobs: int, threads: int = 3) -> int:
    """How many of ``threads`` jobs were inside ``exclusive`` at once, each staying until all have
    started or 0.3 s have passed."""
    inside, most, lock = [0], [0], threading.Lock()
    everyone = threading.Barrier(threads)

    def job() -> None:
        with devices.exclusive(device, cpu_jobs):
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            with contextlib.suppress(threading.BrokenBarrierError):
                everyone.wait(timeout=0.3)
            with lock:
                inside[0] -= 1

    workers = [threading.Thread(target=job) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return most[0]


def test_cpu_jobs_of_one_process_take_turns_up_to_compute_cpu_jobs():
    cpu = torch.device("cpu")
    assert _max_inside(cpu, cpu_jobs=1) == 1
    assert _max_inside(cpu, cpu_jobs=3) == 3  # all three met inside
    assert ComputeConfig().cpu_jobs == 1
