"""Shared fixtures: tiny budgets so real end-to-end runs stay fast on 2 CPU cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The suite runs on the CPU, on a GPU machine too: its assertions were written for the CPU's
# rounding and uncompiled steps. CONDENSE_TEST_CUDA=1 shows the GPUs to the tests about CUDA
# (bench/gpu_check.py runs those).
if os.environ.get("CONDENSE_TEST_CUDA") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

# A real MTT run on a digits subset, small enough for seconds on a CPU.
TINY = [
    "compute.device=cpu",
    "dataset.train_per_class=20",
    "experts.num_experts=2",
    "experts.epochs=4",
    "distill.iterations=6",
    "distill.syn_steps=4",
    "distill.max_start_epoch=2",
    "distill.checkpoint_every=2",
    "evaluate.seeds=2",
    "evaluate.epochs=20",
    "evaluate.full_data_epochs=2",
]


@pytest.fixture(scope="session")
def ephemeral_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for CLI subprocesses with no API URL: each command starts (and stops) its own
    ephemeral Prefect server, as on a user's laptop. A throwaway PREFECT_HOME shared by the session
    (its database migrates once), offline and quiet."""
    home = tmp_path_factory.mktemp("prefect-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300",
    )
    return env


@pytest.fixture(scope="session")
def prefect_env(
    ephemeral_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """Environment for CLI subprocesses: one Prefect server for the whole session, started and stopped
    here, so that each of the many commands skips a 10-30 s ephemeral-server start."""
    from tests.prefect_server import prefect_server

    home = tmp_path_factory.mktemp("prefect-server")  # its own database: not the ephemeral servers'
    env = {**ephemeral_env, "PREFECT_HOME": str(home)}
    with prefect_server(env, home / "server.log") as (api, _):
        yield {**env, "PREFECT_API_URL": api}


@pytest.fixture(scope="session")
def s3():
    """A bucket named ``bucket`` on moto's S3 server (loopback); yields the environment a process
    needs to reach it (also set in this one for the session)."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    from tests.moto_s3 import start_s3

    server, aws = start_s3("bucket")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in aws.items():
            patch.setenv(name, value)
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        yield aws
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def run_cli(args: list[str], env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "condense_flows.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"condense {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def fake_key(label: str) -> str:
    """A stage key's form (20 hex digits) for ``label``: records name only such keys."""
    import hashlib

    return hashlib.sha256(label.encode()).hexdigest()[:20]


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def tiny_args(store: Path, *extra: str, quiet: bool = True) -> list[str]:
    args = ["run", "digits-mtt", "--store", str(store), "--json", *(["-q"] if quiet else [])]
    for item in [*TINY, *extra]:
        args += ["--set", item]
    return args


class KillAfter:
    """Checkpoints that simulate a kill right after the n-th save."""

    def __init__(self, inner, saves: int):
        self.inner, self.saves = inner, saves

    def load(self):
        return self.inner.load()

    def save(self, state):
        self.inner.save(state)
        self.saves -= 1
        if self.saves == 0:
            raise KeyboardInterrupt


def kill_distillation_at_first_checkpoint(store, cfg, plan, monkeypatch) -> None:
    """Run the plan's distill job until it saves its first checkpoint, then stop it as a kill would
    (the work folder keeps the checkpoint; nothing is committed)."""
    from condense.stages import base

    original = base.TorchCheckpoints
    with monkeypatch.context() as patch:
        patch.setattr(base, "TorchCheckpoints", lambda path, *hook: KillAfter(original(path, *hook), 1))
        with pytest.raises(KeyboardInterrupt):
            run_jobs(store, cfg, plan, {"distill"})


class Notes:
    """A progress sink that keeps the notes a stage prints."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def note(self, message: str) -> None:
        self.lines.append(message)

    def step(self, *args) -> None:
        pass


def tree(path: Path) -> list[str]:
    """Every file and directory under ``path`` (to prove a store unchanged)."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def plan_for(store, cfg):
    """The dataset stage, run directly (no Prefect), and the plan of everything after it."""
    from condense.stages import dataset_job, execute, make_plan

    return make_plan(cfg, store, execute(dataset_job(), cfg, store)["key"])


def run_jobs(store, cfg, plan, stages: set[str], progress=None) -> list[dict]:
    """Execute, in plan order, the jobs of ``stages`` (their inputs must exist); returns outcomes."""
    from condense.progress import SILENT
    from condense.stages import execute

    return [execute(job, cfg, store, progress or SILENT) for job in plan.jobs if job.stage in stages]


def run_pipeline(store, cfg, progress=None) -> dict:
    """The whole pipeline, run directly (no Prefect): what the flow does, job by job; the summary."""
    import time

    from condense.progress import SILENT
    from condense.stages import dataset_job, execute, make_plan
    from condense.summary import finish_run, new_run_id

    started = time.time()
    dataset = execute(dataset_job(), cfg, store, progress or SILENT)
    plan = make_plan(cfg, store, dataset["key"])
    outcomes = [dataset, *(execute(job, cfg, store, progress or SILENT) for job in plan.jobs)]
    return finish_run(cfg, store, plan, outcomes, started, new_run_id())


def memory_and_stream(shards, store_root, **settings):
    """The same WebDataset shards loaded in memory and streamed (0 DataLoader workers): (memory, stream)."""
    from condense.config import DatasetConfig
    from condense.prepare import load
    from condense.stages.dataset import prepare
    from condense.store import Store

    out = {}
    for mode in ("memory", "stream"):
        cfg = DatasetConfig(source="webdataset", path=str(shards), load=mode, workers=0, **settings)
        store = Store(store_root / mode)
        key, _ = prepare(cfg, store)
        out[mode] = load(store, key, cfg)
    return out["memory"], out["stream"]


def record_experts(store, cfg) -> tuple[str, str]:
    """Dataset and expert stages, run directly (no Prefect); returns their keys."""
    plan = plan_for(store, cfg)
    run_jobs(store, cfg, plan, {"experts"})
    return plan.keys["dataset"], plan.keys["experts"]


@pytest.fixture(scope="session")
def digits30(tmp_path_factory: pytest.TempPathFactory):
    """Digits with 30 training images per class, prepared once for the library-level tests."""
    from condense.config import DatasetConfig
    from condense.prepare import load
    from condense.stages.dataset import prepare
    from condense.store import Store

    store = Store(tmp_path_factory.mktemp("digits30"))
    key, _ = prepare(DatasetConfig(train_per_class=30), store, 1)
    return load(store, key)


@pytest.fixture(scope="session")
def bn_teacher(digits30):
    """A small batch-norm ConvNet teacher trained on ``digits30`` (a few seconds)."""
    from condense import teacher
    from condense.config import DSAConfig, ModelConfig, TeacherConfig

    cfg = TeacherConfig(source="train", epochs=6, batch_size=64, dsa=False)
    return teacher.train_teacher(digits30, cfg, ModelConfig(width=16), DSAConfig(), seed=0)
