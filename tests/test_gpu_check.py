"""The prepared GPU check (bench/gpu_check.py): its CPU dry run passes every section and writes its two
files, and a hung command costs only its own time limit."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

from tests.conftest import ROOT

SCRIPT = ROOT / "bench" / "gpu_check.py"


def gpu_check() -> ModuleType:
    """bench/gpu_check.py as a module (bench/ is no package)."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_dry_run_passes_every_section_on_the_cpu_and_writes_its_results(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    summary = json.loads((out / "gpu_check.json").read_text())
    sections = summary["sections"]
    assert list(sections) == list(gpu_check().SECTIONS)
    failed = {name: s["reason"] for name, s in sections.items() if not s["passed"]}
    assert not failed, f"{failed}\n{proc.stdout[-3000:]}"
    assert proc.returncode == 0 and summary["passed"] and summary["mode"] == "cpu"
    # Two files, so that everything comes back from a device machine.
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log"]
    log = (out / "gpu_check.log").read_text()
    commands = [c for s in sections.values() for c in s["commands"]]
    assert len(commands) == 7 and all(c["rc"] == 0 for c in commands)
    assert log.count("\n$ ") == len(commands)
    for name in sections:
        assert f"PASS {name}" in proc.stdout
    # The CUDA tests that cannot run here are reported by name and reason, not dropped.
    tests = sections["cuda_tests"]["result"]
    assert tests["passed"] > 0 and tests["failed"] == tests["errors"] == 0
    skipped = [n for n in tests["notes"] if n["outcome"] == "skipped"]
    assert len(skipped) == tests["skipped"] and all(n["message"] for n in skipped)
    assert all(f"skipped: {n['test']}" in proc.stdout for n in skipped)
    # Each section's numbers made it into the summary.
    assert sections["compile_speed"]["result"]["speedup"]["steady"] > 0
    assert {r["mode"] for r in sections["compile_speed"]["result"]["rows"]} == {"eager", "compiled"}
    assert len(sections["host_syncs"]["result"]["rows"]) > 0
    assert set(sections["time_to_accuracy"]["result"]) == {"mtt", "datm"}
    assert sections["cifar10"]["result"]["accuracy"]["mean"] > 0


def test_a_hung_command_is_killed_at_its_limit_children_too_and_the_check_goes_on(tmp_path, monkeypatch):
    check = gpu_check()
    monkeypatch.setattr(check, "MIN_START_S", 0)
    log_path = tmp_path / "log"
    log_path.write_text("")
    hang = (
        "import subprocess, sys, time; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        "print(child.pid, flush=True); time.sleep(60)"
    )
    with log_path.open("a") as log:
        runner = check.Runner(log, log_path, tmp_path, cpu=True, budget_s=60)
        hung = runner.run([sys.executable, "-c", hang], timeout=2)
        assert hung.rc is None and hung.why_not == "timed out after 2 s" and hung.seconds < 10
        grandchild = int(hung.output.split()[0])
        later = runner.run([sys.executable, "-c", "print('later')"], timeout=30)
        assert later.ok and later.output.strip() == "later"
        runner.deadline = time.monotonic()  # the budget is spent: nothing more starts
        unstarted = runner.run([sys.executable, "-c", "print('never')"], timeout=30)
    assert unstarted.rc is None and "not started" in unstarted.why_not
    assert unstarted.output == "" and "\nnever\n" not in log_path.read_text()  # it printed nothing
    # The sleeping grandchild went with its parent's process group.
    for _ in range(50):
        if gone(grandchild):
            break
        time.sleep(0.1)
    assert gone(grandchild)


def gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie awaiting its reaping has)."""
    try:
        return "State:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
