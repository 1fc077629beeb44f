"""The README's "run on a work pool" path, for real: a local Prefect server on a free loopback port, a
process work pool, `prefect deploy` from prefect.yaml, a worker, a deployment run with parameters on
digits at a tiny budget, its artifacts checked through the API, and nothing left running after."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY, last_json, tiny_args
from tests.prefect_server import PREFECT, free_port, prefect_server, stop


def sessions_alive(session_ids: set[int]) -> list[str]:
    """Processes still running in any of these sessions (the worker's flow runs included). Zombies
    are not running: they wait for a reaper (PID 1 of a container may not be one)."""
    out = subprocess.run(["ps", "-eo", "pid=,sid=,stat=,args="], capture_output=True, text=True).stdout
    alive = []
    for line in out.splitlines():
        pid, sid, stat, args = line.split(None, 3)
        if int(sid) in session_ids and int(pid) != os.getpid() and not stat.startswith("Z"):
            alive.append(f"{pid} {args[:80]}")
    return alive


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_API_URL=api,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PREFECT_WORKER_QUERY_SECONDS="2",
        CONDENSE_PROJECT_DIR=str(ROOT),
    )
    with prefect_server(env, tmp_path / "server.log", port) as (started, proc):
        assert started == api
        yield api, env
    assert sessions_alive({proc.pid}) == [], "the server left processes behind"


def prefect(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [PREFECT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc


def api_post(api: str, path: str, body: dict) -> list[dict]:
    request = urllib.request.Request(
        f"{api}/{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_a_deployment_runs_on_a_worker_and_publishes_its_report(server, tmp_path: Path):
    api, env = server
    store = tmp_path / "store"
    prefect(["work-pool", "create", "condense-pool", "--type", "process"], env)
    deployed = prefect(["--no-prompt", "deploy", "--all"], env)
    assert "digits-mtt" in deployed.stdout and "cifar10-mtt-nightly" in deployed.stdout

    worker_log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen(
        [PREFECT, "worker", "start", "--pool", "condense-pool", "--limit", "1"],
        cwd=tmp_path,  # the deployment's pull step, not the worker's directory, finds the code
        env=env,
        stdout=worker_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        run = prefect(
            [
                "deployment",
                "run",
                "condense-pipeline/digits-mtt",
                "--param",
                f"overrides={json.dumps([*TINY, 'ipc=2'])}",
                "--param",
                f"store={store}",
                "--watch",
                "--watch-timeout",
                "420",
            ],
            env,
            timeout=480,
        )
        assert "Completed" in run.stdout + run.stderr, run.stdout[-2000:]
    finally:
        stop(worker, signals=2)
        worker_log.close()

    runs = api_post(api, "flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}})
    assert len(runs) == 1 and runs[0]["parameters"]["store"] == str(store)
    artifacts = {a["key"]: a for a in api_post(api, "artifacts/filter", {}) if a["key"]}
    assert artifacts["condense-report"]["type"] == "markdown"
    assert "digits / mtt / ipc 2" in artifacts["condense-report"]["data"]
    assert artifacts["condense-accuracy"]["type"] == "table"
    assert (
        artifacts["condense-grid"]["type"] == "markdown" and "grid.png" in artifacts["condense-grid"]["data"]
    )
    picture = artifacts["condense-grid-image"]["data"]  # the picture itself, not only its path
    assert picture.startswith("![the distilled images](data:image/png;base64,")
    assert base64.b64decode(picture.split(",", 1)[1].rstrip(")"))[:8] == b"\x89PNG\r\n\x1a\n"
    progress = artifacts["condense-distill-progress"]
    assert progress["type"] == "progress" and float(progress["data"]) == 100.0
    assert all(a["flow_run_id"] == runs[0]["id"] for a in artifacts.values())
    summaries = list(store.glob("runs/*/summary.json"))
    assert len(summaries) == 1 and json.loads(summaries[0].read_text())["ipc"] == 2

    scheduled = api_post(api, "flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}})
    assert scheduled and all(r["deployment_id"] != runs[0]["deployment_id"] for r in scheduled)

    assert sessions_alive({worker.pid}) == [], "the worker or its flow runs outlived it"


def test_an_existing_dask_cluster_runs_the_tasks_on_machines_that_share_only_the_store(
    server, s3, tmp_path: Path
):
    """`--dask-address`: a scheduler and two workers started outside the command, each worker with its
    own local cache (as on separate machines), all reporting to one Prefect server; the store is S3."""
    api, env = server
    env = {**env, **s3, "OMP_NUM_THREADS": "1"}
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    dask = str(Path(sys.executable).parent / "dask")
    scheduler_args = ["scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"]
    started = [subprocess.Popen([dask, *scheduler_args], env=env, cwd=ROOT, start_new_session=True)]
    for name in ("a", "b"):
        worker_env = {**env, "CONDENSE_CACHE": str(tmp_path / f"cache-{name}")}
        args = [dask, "worker", address, "--nthreads", "1", "--no-dashboard", "--name", name]
        started.append(subprocess.Popen(args, env=worker_env, cwd=ROOT, start_new_session=True))
    try:
        cli_cache = tmp_path / "cache-cli"
        command = [*tiny_args("s3://bucket/external"), "--dask-address", address]
        run = subprocess.run(
            [sys.executable, "-m", "condense_flows.cli", *command],
            cwd=ROOT,
            env={**env, "CONDENSE_CACHE": str(cli_cache)},
            capture_output=True,
            text=True,
            timeout=480,
        )
        assert run.returncode == 0, run.stderr[-3000:]
    finally:
        for proc in reversed(started):
            stop(proc)
    summary = last_json(run.stdout)
    assert summary["version"]["new"] and not any(s["cached"] for s in summary["stages"].values())
    assert summary["accuracy"]["convnet"]["mean"] > 20

    (mirror,) = (cli_cache / "stores").iterdir()
    assert not (mirror / "evaluate").exists()  # every evaluation ran on a worker
    assert not list(mirror.glob("experts/.partial/*/expert-*.json"))  # and every expert
    worked = [p for p in tmp_path.glob("cache-[ab]/stores/*/dataset") if p.is_dir()]
    assert worked, "no task ran on the external workers"

    (flow_run,) = api_post(api, "flow_runs/filter", {})
    assert flow_run["state_type"] == "COMPLETED"
    task_runs = api_post(api, "task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run["id"]]}}})
    assert sum(t["state_type"] == "COMPLETED" for t in task_runs) >= 12
    assert sessions_alive({proc.pid for proc in started}) == [], "the Dask cluster left processes behind"
