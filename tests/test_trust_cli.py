"""The `condense` command under an unlucky operator: two identical runs at once, gc while a run reads
its inputs, SIGTERM mid-run, and every bad input or bad file as one line, never a traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from condense.configure import load_config
from condense.store import Store
from tests.conftest import (
    ROOT,
    TINY,
    fake_key,
    last_json,
    plan_for,
    run_cli,
    run_jobs,
    run_pipeline,
    tiny_args,
    tree,
)
from tests.test_compare import TINY_COMPARISON

RUN_TINY = """
import json, sys
from condense.configure import load_config
from condense.store import Store
from tests.conftest import TINY, run_pipeline
summary = run_pipeline(Store(sys.argv[1]), load_config("digits-mtt", TINY))
print(json.dumps({"accuracy": summary["accuracy"], "keys": summary["keys"]}))
"""


def test_two_identical_runs_started_together_both_complete_alike(tmp_path):
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RUN_TINY, str(tmp_path / "store")],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [proc.communicate(timeout=600) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [err[-2000:] for _, err in results]
    first, second = (last_json(out) for out, _ in results)
    assert first == second
    assert not any((tmp_path / "store" / "distill" / ".partial").glob("*/*"))


def started(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """``condense ARGS`` running in the background, its output captured as text."""
    return subprocess.Popen(
        [sys.executable, "-m", "condense_flows.cli", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(pattern: str, root: Path, proc: subprocess.Popen, seconds: float = 300) -> Path:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = sorted(root.glob(pattern))
        if found:
            return found[0]
        assert proc.poll() is None, "the run ended before the file appeared"
        time.sleep(0.2)
    raise AssertionError(f"nothing matched {pattern} under {root}")


def _age(root: Path, seconds: float = 7200) -> None:
    old = time.time() - seconds
    for path in root.rglob("*"):
        os.utime(path, (old, old), follow_symlinks=False)


def test_gc_while_a_run_reads_old_unpublished_inputs_leaves_the_run_whole(prefect_env, tmp_path):
    store = tmp_path / "store"
    # An earlier run published a version, and a run that failed after its experts left them behind,
    # referenced by no version, hours old: just what gc removes.
    run_pipeline(Store(store), load_config("digits-mtt", TINY))
    failed = ["experts.epochs=5", "distill.max_start_epoch=3", "evaluate.seeds=1"]
    cfg = load_config("digits-mtt", [*TINY, *failed])
    run_jobs(Store(store), cfg, plan_for(Store(store), cfg), {"experts"})
    _age(store)
    args = tiny_args(store, *failed, "distill.iterations=300", "distill.checkpoint_every=5")
    proc = started(args, prefect_env)
    _wait_for("distill/.partial/*/checkpoint.pt", store, proc)
    gc = run_cli(["gc", "--store", str(store), "--grace-minutes", "0"], prefect_env)
    assert "removed" in gc.stdout
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    summary = last_json(out)
    assert summary["stages"]["experts"]["cached"] is True  # its input survived the gc
    assert not (store / "leases").exists()  # and the run's lease went with it


def _servers(parent: int) -> set[str]:
    """PIDs of live (not zombie) API servers whose parent is ``parent``."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,stat=,args="], capture_output=True, text=True).stdout
    rows = [line.split(None, 3) for line in out.splitlines()]
    return {
        pid for pid, ppid, stat, args in rows if "uvicorn" in args and ppid == str(parent) and "Z" not in stat
    }


def _gone(pids: set[str], seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        out = subprocess.run(["ps", "-eo", "pid=,stat="], capture_output=True, text=True).stdout
        live = {pid for pid, stat in (line.split() for line in out.splitlines()) if "Z" not in stat}
        if not pids & live:
            return True
        time.sleep(0.2)
    return False


def test_sigterm_stops_within_seconds_keeps_finished_experts_and_resumes(
    ephemeral_env, prefect_env, tmp_path
):
    store = tmp_path / "store"
    args = tiny_args(store, "experts.epochs=100", quiet=False)
    proc = started(args, ephemeral_env)
    _wait_for("experts/.partial/*/trajectories.zarr", store, proc)  # the experts are training
    servers = _servers(proc.pid)
    time.sleep(1)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 5
    assert proc.returncode == 143
    assert err.strip().splitlines()[-1] == (
        "error: stopped by SIGTERM; rerun the same command to resume from the last checkpoint"
    )
    assert servers and _gone(servers)
    resumed = last_json(run_cli(tiny_args(store, "experts.epochs=100"), prefect_env).stdout)
    assert resumed["stages"]["experts"]["cached"] is False and resumed["version"]["number"] == 1


def test_sigkill_of_the_command_takes_its_api_server_with_it(ephemeral_env, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "condense_flows.cli", *tiny_args(tmp_path, "experts.epochs=300")],
        cwd=ROOT,
        env=ephemeral_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_for("experts/.partial/*", tmp_path, proc)
    servers = _servers(proc.pid)
    assert servers, "no API server was running"
    proc.kill()
    proc.wait()
    assert _gone(servers)  # not reparented to PID 1 and left running


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--set", "evaluate.models=[convnet,resnet81]"],
            "unknown architecture 'resnet81' (did you mean resnet18",
        ),
        (
            ["--set", "teacher.source=train", "--set", "teacher.arch=vit_tinyy"],
            "'teacher.arch': unknown architecture",
        ),
        (["--set", "ipc=true"], "invalid config value for 'ipc': expected a number, got true"),
        (["--set", "evaluate.lr=.nan"], "'evaluate.lr': expected a finite number, got nan"),
        (["--devices", ""], "--devices '': name each device"),
        (["--device", "cuda:99999999999999999999"], "cuda"),
        (["--set", "dataset.name=../../X"], "is not a plain name"),
    ],
)
def test_config_mistakes_are_caught_before_any_work(extra, message, prefect_env, tmp_path):
    proc = run_cli(
        ["run", "digits-mtt", "--store", str(tmp_path / "store"), *extra], prefect_env, check=False
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert message in lines[0] and not (tmp_path / "store").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"method: mtt\nipc: [1,\n", "cannot read config"),
        (b"method: mtt\n\xff\xfe ipc: 1\n", "not UTF-8 text"),
        (b"", "is empty"),
        (b"method: mtt\nipc: 1\nipc: 10\n", "the key 'ipc' is given twice at line 3"),
    ],
)
def test_unreadable_config_files_are_one_line(content, message, prefect_env, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    proc = run_cli(["run", str(path)], prefect_env, check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr


def _one_line_failure(proc) -> str:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    return lines[0]


def test_bad_files_around_a_store_are_one_line_errors(prefect_env, tmp_path):
    store = tmp_path / "store"
    summary = run_pipeline(Store(store), load_config("digits-mtt", TINY))
    # export --to a file
    target = tmp_path / "a-file"
    target.write_text("x")
    run = summary["artifacts"]["run_dir"]
    assert "is a file" in _one_line_failure(
        run_cli(["export", run, "--to", str(target)], prefect_env, check=False)
    )
    # export of a shard that is not a tar
    shard = Path(summary["artifacts"]["shards"][0])
    original = shard.read_bytes()
    shard.write_bytes(os.urandom(len(original)))
    out = tmp_path / "out"
    line = _one_line_failure(run_cli(["export", run, "--to", str(out)], prefect_env, check=False))
    assert "damaged" in line and not out.exists()
    shard.write_bytes(original)
    # a version record that is not one
    (record,) = (store / "versions").rglob("v0001.json")
    record.write_text("{not json")
    for command in (["ls"], ["gc", "--dry-run"]):
        line = _one_line_failure(run_cli([*command, "--store", str(store)], prefect_env, check=False))
        assert "v0001.json is damaged" in line
    assert tree(store)  # nothing was removed by the failed gc


def test_an_s3_store_without_credentials_is_one_line(s3, prefect_env, tmp_path):
    env = {
        k: v for k, v in {**prefect_env, **s3}.items() if not k.startswith("AWS_") or k == "AWS_ENDPOINT_URL"
    }
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"))
    line = _one_line_failure(run_cli(["ls", "--store", "s3://bucket/nocreds"], env, check=False))
    assert "NoCredentialsError" in line or "credentials" in line.lower()


def _comparison(tmp_path: Path, **dm_distill: int) -> Path:
    """A one-cell comparison (DM, IPC 1) as a YAML file, its distillation settings replaced."""
    spec = {**TINY_COMPARISON, "methods": ["dm"]}
    spec["settings"] = {"dm": {"distill": {"iterations": 2, "checkpoint_every": 2, **dm_distill}}}
    path = tmp_path / "one-cell.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _compare_proc(comparison: Path, store: Path, env: dict[str, str]) -> subprocess.Popen:
    return started(["compare", str(comparison), "--store", str(store), "--json", "-q"], env)


def test_two_identical_comparisons_started_together_both_complete_alike(prefect_env, tmp_path):
    comparison, store = _comparison(tmp_path), tmp_path / "store"
    procs = [_compare_proc(comparison, store, prefect_env) for _ in range(2)]
    results = [proc.communicate(timeout=600) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [err[-2000:] for _, err in results]
    boards = [last_json(out) for out, _ in results]
    assert [cell["status"] for board in boards for cell in board["cells"]] == ["ok", "ok"]
    first, second = (board["cells"][0] for board in boards)
    assert first["distill_key"] == second["distill_key"] and first["accuracy"] == second["accuracy"]
    # One leaderboard version: whichever published second found the same record and kept it.
    assert sorted(board["version"]["new"] for board in boards) == [False, True]
    assert {board["version"]["number"] for board in boards} == {1}
    assert not any((store / "distill" / ".partial").glob("*/*"))


def test_gc_during_a_live_comparison_keeps_everything_the_comparison_uses(prefect_env, tmp_path):
    store = tmp_path / "store"
    (store / "versions").mkdir(parents=True)  # nothing published: only the lease protects the run
    work = tmp_path / "work"
    work.mkdir()
    (work / "weights.bin").write_bytes(b"\x00" * 16)
    Store(store).commit("experts", fake_key("abandoned"), work, {})
    _age(store)
    proc = _compare_proc(_comparison(tmp_path, iterations=300, checkpoint_every=5), store, prefect_env)
    lease = _wait_for("leases/*.json", store, proc)
    deadline = time.monotonic() + 300
    while not any(stage == "distill" for stage, _ in json.loads(lease.read_text())["keys"]):
        assert proc.poll() is None and time.monotonic() < deadline, "the comparison never planned its cell"
        time.sleep(0.2)
    gc = run_cli(["gc", "--store", str(store), "--grace-minutes", "0", "--partials"], prefect_env)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert f"experts/{fake_key('abandoned')}" in gc.stdout  # gc did remove what nothing uses
    assert not (store / "experts" / fake_key("abandoned")).exists()
    cell = last_json(out)["cells"][0]
    assert cell["status"] == "ok", cell["reason"]
    assert (store / "distill" / cell["distill_key"] / "meta.json").is_file()
    assert [p.name for p in (store / "dataset").iterdir() if (p / "meta.json").is_file()] != []
    assert not (store / "leases").exists() or not any((store / "leases").iterdir())
