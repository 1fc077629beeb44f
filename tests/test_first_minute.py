"""The first minute of a new user: listings that import nothing heavy, an unchanged rerun finished
from the store without a flow run, honest stage times. (Timings live in bench/first_minute.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT, last_json, run_cli, tiny_args

LISTINGS = """
import json, sys
from typer.testing import CliRunner
import condense_flows.cli as cli
codes = [CliRunner().invoke(cli.app, args).exit_code for args in json.loads(sys.argv[1])]
print(json.dumps({"codes": codes, "heavy": sorted({"torch", "prefect"} & set(sys.modules))}))
"""


def test_listings_and_help_import_neither_torch_nor_prefect(tmp_path):
    commands = [
        ["--help"],
        ["presets"],
        ["ls", "--store", str(tmp_path)],
        ["verify", "--help"],
        ["run", "--help"],
    ]
    out = subprocess.run(
        [sys.executable, "-c", LISTINGS, json.dumps(commands)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout) == {"codes": [0] * len(commands), "heavy": []}


CONFIG = """
import json, sys
from typer.testing import CliRunner
import condense_flows.cli as cli
result = CliRunner().invoke(cli.app, json.loads(sys.argv[1]))
heavy = sorted({"torch", "prefect"} & set(sys.modules))
print(json.dumps({"code": result.exit_code, "output": result.output, "heavy": heavy}))
"""


def config_in_a_fresh_process(cache: str, *args: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CONFIG, json.dumps(["config", *args])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "CONDENSE_CACHE_DIR": cache},
    )
    return json.loads(out.stdout)


def test_a_config_shown_before_is_shown_again_without_torch(tmp_path):
    cache = str(tmp_path / "cache")
    first = config_in_a_fresh_process(cache, "digits-dm", "--set", "ipc=3")
    assert first["code"] == 0 and "torch" in first["heavy"]  # validated by the method's own config
    again = config_in_a_fresh_process(cache, "digits-dm", "--set", "ipc=3")
    assert again == {**first, "heavy": []}
    other = config_in_a_fresh_process(cache, "digits-dm", "--set", "ipc=4")
    assert "ipc: 4" in other["output"] and "torch" in other["heavy"]
    for _ in range(2):  # a config that fails validation is never remembered
        bad = config_in_a_fresh_process(cache, "digits-dm", "--set", "distill.lr_img=-1")
        assert bad["code"] == 2 and "distill.lr_img" in bad["output"] and "torch" in bad["heavy"]


def test_an_unchanged_rerun_is_finished_from_the_store_without_a_flow_run(tmp_path, prefect_env):
    store = tmp_path / "store"
    first = last_json(run_cli(tiny_args(store), prefect_env).stdout)
    # Without any Prefect API: a rerun that needed a flow run would start a server (or fail).
    env = {k: v for k, v in prefect_env.items() if k != "PREFECT_API_URL"}
    again = run_cli(tiny_args(store, quiet=False), env)
    summary = last_json(again.stdout)
    assert "jobs cached: nothing to run (no Prefect flow run" in again.stderr
    assert all(stage["cached"] for stage in summary["stages"].values())
    assert summary["accuracy"] == first["accuracy"] and summary["keys"] == first["keys"]
    assert summary["version"] == {**first["version"], "new": False}
    assert (
        summary["run_id"] != first["run_id"]
        and (store / "runs" / summary["run_id"] / "summary.json").is_file()
    )
    assert not (store / "leases").exists() or not any((store / "leases").iterdir())
    # The stage table says reused, not a time that was never spent.
    table = again.stdout.split("test accuracy")[0]
    assert table.count("reused") == len(summary["stages"])
    # --flow still starts one (it computes nothing either).
    flowed = last_json(run_cli([*tiny_args(store), "--flow"], prefect_env).stdout)
    assert flowed["keys"] == first["keys"] and all(s["cached"] for s in flowed["stages"].values())


def test_a_changed_setting_is_not_finished_from_the_store(tmp_path, prefect_env):
    store = tmp_path / "store"
    run_cli(tiny_args(store), prefect_env)
    changed = run_cli(tiny_args(store, "distill.iterations=3", quiet=False), prefect_env)
    summary = last_json(changed.stdout)
    assert "nothing to run" not in changed.stderr
    stages = summary["stages"]
    assert stages["distill"]["cached"] is False and stages["experts"]["cached"] is True
    # A one-job stage's compute seconds are the work inside it: never more than its wall span.
    assert 0 < stages["distill"]["seconds"] <= stages["distill"]["wall_seconds"]
    table = changed.stdout.split("test accuracy")[0]
    assert "experts      reused" in table and "distill      reused" not in table


def test_help_shows_flags_bare_and_values_by_what_they_are():
    from typer.testing import CliRunner

    from condense_flows.cli import app

    commands = ["run", "compare", "presets", "config", "plan", "ls", "gc", "verify", "export"]
    pages = {c: CliRunner().invoke(app, [c, "--help"], env={"COLUMNS": "100"}).output for c in commands}
    for command, page in pages.items():
        options = page.split("Options:")[1]
        assert "<bool>" not in page and "--no-" not in page, command  # flags: no metavariable, no twin
        assert "<str>" not in options and "<int>" not in options and "<list" not in options, command
        assert max(len(line) for line in page.splitlines()) <= 100, command
    assert "--store DIR|URL" in pages["run"] and "--set KEY=VALUE" in pages["run"]
    assert "  --json  " in pages["run"] and "  --debug  " in pages["run"]
