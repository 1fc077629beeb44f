"""The GPU path checked end to end in one command: environment, the CUDA tests, host syncs per hot
loop, compiled vs eager, CIFAR-10 IPC 10 through the pipeline, and time to accuracy of MTT and DATM.

    python bench/gpu_check.py --out DIR                    # on a GPU machine; under 8 minutes on one H200
    python bench/gpu_check.py --cpu --out /tmp/gpu-check   # the dry run: every section, tiny, on the CPU
    python bench/gpu_check.py --only compile_speed,cifar10 # rerun what failed

DIR defaults to ``$OUT`` when set (the device machine's folder of files that come back), else
``bench/out/gpu-check``. Everything lands there in two files: ``gpu_check.json`` (every section's
verdict, its numbers and its commands; rewritten after each section, so a run killed midway keeps
what finished) and ``gpu_check.log`` (each command line and its whole output, written as it runs).

Sections, in order, each a child process with its own time limit (a hang costs that section alone,
a failed section does not stop the later ones) inside one budget for the whole check (``--budget``,
480 s):

- ``environment``: Python, torch and its CUDA build, the device, its memory, a C compiler (Triton and
  inductor need one), and the packages the rest imports. Fails in one line without CUDA (unless
  ``--cpu``) or when a package is missing.
- ``cuda_tests``: the tests about CUDA, ``pytest tests/test_devices.py tests/test_device_check.py -k
  "(cuda or gpu) and not benchmark"`` with ``CONDENSE_TEST_CUDA=1`` (the suite otherwise hides the
  GPUs; ``benchmark`` is bench/gpu.py's smoke test, which section ``cifar10`` covers). Passed,
  failed, skipped and why; on a GPU a test skipped for want of CUDA fails the section.
- ``host_syncs``: ``bench/host_syncs.py --device cuda`` (``check`` under ``--cpu``): host waits per
  step of each hot loop. A loop that fails on the device fails the section.
- ``compile_speed``: ``bench/compile_speed.py``: the expert step compiled vs eager, first epoch
  (compilation, warm-up) apart from steady-state images/s. Falling back to eager fails the section.
- ``cifar10``: ``bench/gpu.py`` at its default budget (CIFAR-10 IPC 10, MTT, about 3 minutes on an
  H200): seconds, images/s, s/iteration, peak memory per stage, accuracy. Every stage must have run
  on the GPU.
- ``time_to_accuracy``: ``bench/gpu.py --method mtt`` and ``--method datm`` at a small budget each:
  wall seconds to the final accuracy.

Then the issue's targets, judged on a GPU (never a section's verdict): at most one host sync per
logged step, compiled expert epoch >= 3x eager, MTT >= 4x the official code's 0.367 s/iteration.
``--cpu`` runs every section tiny on the CPU (digits via ``bench/gpu.py --smoke``, host syncs on the
checking device; GPUs hidden) in about a minute on 2 cores: tests/test_gpu_check.py runs it.

On a device machine (the ``device`` tool's ``run``): the CIFAR-10 shards travel only inside the
checkout, and ``data/*`` is git-ignored, so copy them there and name the folder in ``carry``::

    mkdir -p data/cifar10 && cp -r ../shared/datasets/cifar10/* data/cifar10/      # here, once (21 MB)

Its image has torch, torchvision, numpy, pyyaml, pillow, fsspec, scikit-learn, timm and pytest, but
not pydantic, zarr, webdataset or faiss-cpu, and it reaches no package index: carry those as wheels
(the ``environment`` section names any still missing), built here into ``data/wheels`` (ignored too)
at this venv's versions (pydantic needs exactly its pydantic-core; ``--no-deps`` fetches no others)::

    wheels='pydantic|pydantic.core|annotated.types|typing.inspection|typing.extensions|zarr|numcodecs'
    wheels="$wheels|donfig|google.crc32c|webdataset|braceexpand|faiss.cpu"
    .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \\
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \\
        --platform manylinux2014_x86_64 -d data/wheels $(.venv/bin/pip freeze | grep -i -E "^($wheels)==")

(about 31 MB, 19 of them faiss-cpu: with the shards and the tree about 54 MB of the 64 MiB a call
carries). Then one call, ``carry: ["data/cifar10", "data/wheels"]``, ``timeout_s: 600``::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \\
        data/wheels/*.whl && export PYTHONPATH=/tmp/site || exit
    PYTHONUNBUFFERED=1 python3 bench/gpu_check.py

It prints, per section, a short table and ``PASS name (seconds): what passed`` or ``FAIL name
(seconds): why`` with the end of the failing command's output; then every section's PASS/FAIL line
again and the targets (``met``/``MISSED``). Exit status 1 when any section failed.

When a section fails: its FAIL line says why (timed out, the one-line error, the failing tests or
loops); the whole output of its commands is in ``gpu_check.log`` after its ``$`` line. Rerun only
that section with ``--only NAME``, or its command by hand (the ``$`` line, run in the checkout with
``PYTHONPATH`` naming it). A budget that does not fit (``timed out``): run ``bench/gpu.py`` by hand
with a smaller ``--iterations``/``--experts``. ``compilation fell back to eager``: the compiler's
first error follows; ``--set compute.compile=off`` runs the pipeline eagerly meanwhile.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

SUMMARY = "gpu_check.json"
LOG = "gpu_check.log"
BUDGET_S = 480
"""The whole check: the issue's 8 minutes, inside one 10-minute command of a device machine."""
MIN_START_S = 10
"""A command is not started with less of the budget left than this: it could not finish."""

TIMEOUTS = {
    "environment": 60,
    "cuda_tests": 150,
    "host_syncs": 90,
    "compile_speed": 150,
    "cifar10": 240,
    "time_to_accuracy": 120,  # each of the two runs
}
"""Seconds per section's command, sized at a few times what each should take on an H200."""

REQUIRED = {
    "torch": "torch",
    "torchvision": "torchvision",
    "numpy": "numpy",
    "pydantic": "pydantic",
    "yaml": "pyyaml",
    "PIL": "pillow",
    "fsspec": "fsspec",
    "zarr": "zarr",
    "webdataset": "webdataset",
    "sklearn": "scikit-learn",
    "faiss": "faiss-cpu",
    "pytest": "pytest",
}
"""Module -> pip name of what the sections import (the pipeline's stages, the benches, the tests)."""

SYNCS_PER_LOG = 1
COMPILE_SPEEDUP = 3.0
OFFICIAL_MTT_S_PER_ITERATION = 0.367
"""The official MTT code on CIFAR-10 IPC 10 (30 steps, batch 100) on an H100, as issue 25 measured it."""
MTT_SPEEDUP = 4.0

CUDA_TESTS = "(cuda or gpu) and not benchmark"
"""Test names about CUDA. Not ``device``: it matches both files' names, hence every test in them."""

# The time-to-accuracy budget: one MTT and one DATM run of about a minute each on an H200.
SMALL_BUDGET = [
    *("--experts", "2", "--expert-epochs", "6", "--iterations", "60"),
    *("--seeds", "2", "--eval-epochs", "200"),
]


@dataclass
class Ran:
    """One child command: its exit status (None: not finished), seconds and output."""

    argv: list[str]
    rc: int | None
    seconds: float
    output: str
    why_not: str = ""
    """Why it did not finish: timed out, or never started (the budget was spent)."""

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def failure(self) -> str:
        """One line: why this command failed."""
        if self.why_not:
            return self.why_not
        last = next((line for line in reversed(self.output.splitlines()) if line.strip()), "")
        return f"exit status {self.rc}: {last.strip()[:300]}"

    def tail(self, lines: int = 15) -> list[str]:
        return self.output.rstrip().splitlines()[-lines:]

    def last_json(self) -> Any:
        return json.loads(self.output.strip().splitlines()[-1])


@dataclass
class Target:
    """One of the issue's targets for the GPU run: what, the measured value, and whether it was met."""

    target: str
    value: str
    met: bool


@dataclass
class Verdict:
    """A section's outcome: passed or not and why, its short table, its numbers, the targets it measures."""

    passed: bool
    reason: str
    table: list[str] = field(default_factory=list)
    result: Any = None
    targets: list[Target] = field(default_factory=list)


class Runner:
    """Runs the sections' commands in the checkout, one at a time, each within its time limit and
    the check's remaining budget, its output streamed into the log."""

    def __init__(self, log: TextIO, log_path: Path, work: Path, cpu: bool, budget_s: float):
        self.log, self.log_path, self.work, self.cpu = log, log_path, work, cpu
        self.deadline = time.monotonic() + budget_s
        self.runs: list[Ran] = []
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        # The checkout importable without installing it (a device machine has it only as files).
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        if cpu:
            self.env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run is a CPU run on a GPU machine too

    def run(self, argv: list[str], timeout: float, env: dict[str, str] | None = None) -> Ran:
        limit = min(timeout, self.deadline - time.monotonic())
        prefix = [f"{k}={v}" for k, v in (env or {}).items()]
        shown = shlex.join([*prefix, *("python" if a == PY else a for a in argv)])
        if limit < MIN_START_S:
            ran = Ran(argv, None, 0.0, "", "not started: the check's time budget (--budget) was spent")
            self._note(f"\n$ {shown}\n# {ran.why_not}\n")
            self.runs.append(ran)
            return ran
        self._note(f"\n$ {shown}\n# time limit {limit:.0f} s\n")
        start = self.log_path.stat().st_size
        started = time.monotonic()
        # Its own session: on a timeout the whole process group goes (pytest's and the benches' children).
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env={**self.env, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        why_not = ""
        try:
            rc: int | None = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc, why_not = None, f"timed out after {limit:.0f} s"
        seconds = time.monotonic() - started
        with self.log_path.open(encoding="utf-8", errors="replace") as log:
            log.seek(start)
            output = log.read()
        self._note(f"# exit status {rc if rc is not None else why_not}, {seconds:.1f} s\n")
        ran = Ran(argv, rc, round(seconds, 1), output, why_not)
        self.runs.append(ran)
        return ran

    def _note(self, text: str) -> None:
        self.log.write(text)
        self.log.flush()


def text_rows(rows: list[dict[str, Any]], columns: list[str] | None = None) -> list[str]:
    """Rows of dicts as aligned text lines; columns: the given ones, else every key in first-seen order."""
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [["-" if row.get(c) is None else str(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    return [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in [columns, *cells]
    ]


def probe() -> dict[str, Any]:
    """This machine as the sections will find it (run in a child: a CUDA initialisation can hang)."""
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "c_compiler": shutil.which("cc") or shutil.which("gcc"),
        "missing": [pip for module, pip in REQUIRED.items() if importlib.util.find_spec(module) is None],
    }
    if "torch" in info["missing"]:
        return info
    import torch

    info.update(torch=torch.__version__, cuda_build=torch.version.cuda, cuda=torch.cuda.is_available())
    if info["cuda"]:
        props = torch.cuda.get_device_properties(0)
        info.update(
            devices=torch.cuda.device_count(),
            name=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            cudnn=torch.backends.cudnn.version(),
        )
        try:  # a driver that initialises but cannot run a kernel is still no GPU
            x = torch.ones(256, 256, device="cuda")
            info["matmul_ok"] = (x @ x)[0, 0].item() == 256
        except RuntimeError as err:
            info["matmul_ok"] = False
            info["matmul_error"] = str(err).splitlines()[0]
    return info


def environment(run: Runner) -> Verdict:
    ran = run.run([PY, "bench/gpu_check.py", "--probe"], TIMEOUTS["environment"])
    if not ran.ok:
        return Verdict(False, ran.failure())
    info = ran.last_json()
    device = f"{info['name']} x{info['devices']}, {info['memory_gib']} GiB" if info.get("cuda") else "none"
    table = text_rows(
        [
            {
                "python": info["python"],
                "torch": info.get("torch", "-"),
                "CUDA build": info.get("cuda_build") or "-",
                "GPU": device,
                "C compiler": info["c_compiler"] or "none",
            }
        ]
    )
    if info["missing"]:
        why = (
            f"missing Python packages: {', '.join(info['missing'])} (carry them as wheels: see the docstring)"
        )
        return Verdict(False, why, table, info)
    if not info["cuda"] and not run.cpu:
        build = f"torch {info['torch']}, CUDA build {info['cuda_build']}"
        why = f"CUDA is not available ({build}): run on a GPU machine, or --cpu for the dry run"
        return Verdict(False, why, table, info)
    if info.get("cuda") and not info["matmul_ok"]:
        return Verdict(
            False, f"CUDA initialised but a matrix product failed: {info.get('matmul_error')}", table, info
        )
    return Verdict(True, f"torch {info['torch']} on {device if info['cuda'] else 'the CPU'}", table, info)


def test_results(junit: Path) -> dict[str, Any]:
    """Counts and the skipped and failed tests of a pytest JUnit XML report."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    notes = []
    for case in ElementTree.parse(junit).iter("testcase"):
        name = case.get("name", "?")
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
            continue
        kind = {"failure": "failed", "error": "errors", "skipped": "skipped"}[outcome.tag]
        counts[kind] += 1
        message = (outcome.get("message") or "").splitlines()[0][:160] if outcome.get("message") else ""
        notes.append({"test": name, "outcome": kind, "message": message})
    return {**counts, "notes": notes}


def cuda_tests(run: Runner) -> Verdict:
    junit = run.work / "cuda_tests.xml"
    files = ["tests/test_devices.py", "tests/test_device_check.py"]
    argv = [PY, "-m", "pytest", "-q", *files, "-k", CUDA_TESTS, f"--junitxml={junit}"]
    ran = run.run(argv, TIMEOUTS["cuda_tests"], env={"CONDENSE_TEST_CUDA": "1"})
    if not junit.exists():
        return Verdict(False, ran.failure())
    result = test_results(junit)
    counts = {k: result[k] for k in ("passed", "failed", "errors", "skipped")}
    table = text_rows([counts]) + [f"{n['outcome']}: {n['test']}: {n['message']}" for n in result["notes"]]
    summary = ", ".join(f"{v} {k}" for k, v in counts.items())
    if result["failed"] or result["errors"]:
        bad = [n["test"] for n in result["notes"] if n["outcome"] != "skipped"]
        return Verdict(False, f"{summary}: {', '.join(bad)}", table, result)
    if not result["passed"]:
        return Verdict(False, f"no test ran ({summary})", table, result)
    no_gpu = [n["test"] for n in result["notes"] if n["outcome"] == "skipped" and "no CUDA" in n["message"]]
    if no_gpu and not run.cpu:
        return Verdict(False, f"the tests saw no GPU, skipped: {', '.join(no_gpu)}", table, result)
    return Verdict(ran.ok, summary if ran.ok else ran.failure(), table, result)


def host_syncs(run: Runner) -> Verdict:
    if not (ROOT / "bench" / "host_syncs.py").exists():
        return Verdict(False, "bench/host_syncs.py missing")
    out = run.work / "host_syncs.json"
    device = "check" if run.cpu else "cuda"
    ran = run.run([PY, "bench/host_syncs.py", "--device", device, "--json", str(out)], TIMEOUTS["host_syncs"])
    if not ran.ok or not out.exists():
        return Verdict(False, ran.failure())
    result = json.loads(out.read_text())
    rows, failed, over = [], [], []
    for row in result["rows"]:
        if "error" in row:
            failed.append(row["loop"])
            rows.append({"loop": row["loop"], "per step": row["error"]})
            continue
        per_log = round(row["total"] * row["steps/log"], 2)
        if per_log > SYNCS_PER_LOG:
            over.append(f"{row['loop']} ({per_log:g})")
        rows.append(
            {"loop": row["loop"], "steps/log": row["steps/log"], "per step": row["total"], "per log": per_log}
        )
    table = text_rows(rows, ["loop", "steps/log", "per step", "per log"])
    target = Target(
        f"at most {SYNCS_PER_LOG} host sync per logged step ({device})",
        "over in: " + ", ".join(over) if over else f"every loop <= {SYNCS_PER_LOG}",
        not over and not failed,
    )
    if failed:
        return Verdict(False, f"failed on the device: {', '.join(failed)}", table, result, [target])
    return Verdict(True, f"{len(rows)} loops counted on {device}", table, result, [target])


def compile_speed(run: Runner) -> Verdict:
    out = run.work / "compile_speed.json"
    sizes = ["--device", "cpu", "--images", "300", "--width", "16", "--epochs", "2"] if run.cpu else []
    ran = run.run([PY, "bench/compile_speed.py", *sizes, "--json", str(out)], TIMEOUTS["compile_speed"])
    if not ran.ok or not out.exists():
        return Verdict(False, ran.failure())
    result = json.loads(out.read_text())
    columns = ["mode", "device", "first_epoch_s", "steady_images_per_s", "fell_back"]
    table = text_rows(result["rows"], columns)
    speedup = result["speedup"]
    table.append(
        f"compiled / eager: {speedup['steady']}x steady state, first epoch {speedup['first_epoch']}x"
    )
    target = Target(
        f"compiled expert epoch >= {COMPILE_SPEEDUP:g}x eager (steady state)",
        f"{speedup['steady']}x",
        speedup["steady"] >= COMPILE_SPEEDUP,
    )
    return Verdict(True, f"{speedup['steady']}x steady-state speedup", table, result, [target])


def pipeline(run: Runner, label: str, argv: list[str], timeout: float) -> tuple[Ran, dict[str, Any] | None]:
    """One bench/gpu.py run writing its JSON into the work folder: (the run, its result or None)."""
    out = run.work / f"{label}.json"
    device = ["--smoke", "--device", "cpu"] if run.cpu else ["--device", "cuda"]
    ran = run.run([PY, "bench/gpu.py", *device, *argv, "--json", str(out)], timeout)
    return ran, json.loads(out.read_text()) if ran.ok and out.exists() else None


def off_the_gpu(result: dict[str, Any]) -> list[str]:
    """Stages of a bench/gpu.py result that did not run on CUDA (the dataset stage runs on the host)."""
    return [
        r["stage"] for r in result["stages"] if r["stage"] != "dataset" and not r["device"].startswith("cuda")
    ]


def accuracy(result: dict[str, Any]) -> str:
    return f"{result['accuracy']['mean']:.2f} ± {result['accuracy']['std']:.2f}"


def cifar10(run: Runner) -> Verdict:
    ran, result = pipeline(run, "cifar10", [], TIMEOUTS["cifar10"])
    if result is None:
        return Verdict(False, ran.failure())
    table = text_rows(result["stages"])
    table.append(f"{result['preset']}: {accuracy(result)} % (ConvNet), {result['seconds']:.1f} s end to end")
    distill = next(r for r in result["stages"] if r["stage"] == "distill")
    wanted = round(OFFICIAL_MTT_S_PER_ITERATION / MTT_SPEEDUP, 4)
    target = Target(
        f"MTT s/iteration <= {wanted} ({MTT_SPEEDUP:g}x the official code's "
        f"{OFFICIAL_MTT_S_PER_ITERATION} s on an H100)",
        f"{distill['s/iteration']} s ({OFFICIAL_MTT_S_PER_ITERATION / distill['s/iteration']:.1f}x)",
        distill["s/iteration"] <= wanted,
    )
    elsewhere = [] if run.cpu else off_the_gpu(result)
    if elsewhere:
        return Verdict(False, f"stages not on the GPU: {', '.join(elsewhere)}", table, result, [target])
    return Verdict(True, f"{accuracy(result)} % in {result['seconds']:.1f} s", table, result, [target])


def time_to_accuracy(run: Runner) -> Verdict:
    rows, results, failures = [], {}, []
    for method in ("mtt", "datm"):
        budget = [] if run.cpu else SMALL_BUDGET
        ran, result = pipeline(run, method, ["--method", method, *budget], TIMEOUTS["time_to_accuracy"])
        if result is None:
            failures.append(f"{method}: {ran.failure()}")
            rows.append({"method": method, "accuracy %": ran.why_not or f"exit status {ran.rc}"})
            continue
        results[method] = result
        elsewhere = [] if run.cpu else off_the_gpu(result)
        if elsewhere:
            failures.append(f"{method}: stages not on the GPU: {', '.join(elsewhere)}")
        distill = next(r for r in result["stages"] if r["stage"] == "distill")
        rows.append(
            {
                "method": method,
                "accuracy %": accuracy(result),
                "wall s": f"{result['seconds']:.1f}",
                "distill s/it": distill["s/iteration"],
                "seeds": len(result["accuracy"]["runs"]),
            }
        )
    table = text_rows(rows, ["method", "accuracy %", "wall s", "distill s/it", "seeds"])
    if failures:
        return Verdict(False, "; ".join(failures), table, results)
    line = "; ".join(f"{r['method']} {r['accuracy %']} % in {r['wall s']} s" for r in rows)
    return Verdict(True, line, table, results)


SECTIONS: dict[str, Callable[[Runner], Verdict]] = {
    "environment": environment,
    "cuda_tests": cuda_tests,
    "host_syncs": host_syncs,
    "compile_speed": compile_speed,
    "cifar10": cifar10,
    "time_to_accuracy": time_to_accuracy,
}


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` whole: a check killed mid-write leaves the previous summary, not half of one."""
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(data, indent=2, default=str) + "\n")
    partial.replace(path)


def default_out() -> Path:
    return Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "bench" / "out" / "gpu-check"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="results folder (default: $OUT, else bench/out/gpu-check)"
    )
    parser.add_argument("--cpu", action="store_true", help="the dry run: every section, tiny, on the CPU")
    parser.add_argument("--only", help=f"comma-separated sections to run, of: {', '.join(SECTIONS)}")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole check")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe()))
        return
    names = args.only.split(",") if args.only else list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}: use {', '.join(SECTIONS)}")

    out = args.out or default_out()
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / LOG
    summary: dict[str, Any] = {
        "command": sys.argv,
        "mode": "cpu" if args.cpu else "gpu",
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "budget_s": args.budget,
        "sections": {},
    }
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        log_path.write_text("")
        # Appending: the children write into the same file between the runner's own lines.
        with log_path.open("a", encoding="utf-8") as log:
            runner = Runner(log, log_path, work, args.cpu, args.budget)
            for name in names:
                print(f"\n== {name}", flush=True)
                first = len(runner.runs)
                section_started = time.monotonic()
                try:
                    verdict = SECTIONS[name](runner)
                except Exception as err:  # noqa: BLE001 - a section's own bug fails it, not the check
                    verdict = Verdict(False, f"the check itself failed: {type(err).__name__}: {err}")
                seconds = round(time.monotonic() - section_started, 1)
                ran = runner.runs[first:]
                for line in verdict.table:
                    print(f"  {line}")
                print(
                    f"{'PASS' if verdict.passed else 'FAIL'} {name} ({seconds} s): {verdict.reason}",
                    flush=True,
                )
                if not verdict.passed and ran and not ran[-1].ok and ran[-1].output:
                    print("  end of its output (the rest in gpu_check.log):")
                    print("\n".join(f"  | {line}" for line in ran[-1].tail()))
                summary["sections"][name] = {
                    "passed": verdict.passed,
                    "reason": verdict.reason,
                    "seconds": seconds,
                    "commands": [
                        {"argv": r.argv, "rc": r.rc, "seconds": r.seconds, "why_not": r.why_not} for r in ran
                    ],
                    "table": verdict.table,
                    "result": verdict.result,
                    "targets": [t.__dict__ for t in verdict.targets],
                }
                summary["seconds"] = round(time.monotonic() - started, 1)
                write_json(out / SUMMARY, summary)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    sections = summary["sections"]
    summary["passed"] = all(s["passed"] for s in sections.values())
    write_json(out / SUMMARY, summary)
    print(f"\n== gpu check ({summary['mode']}, {summary['seconds']} s of a {args.budget:.0f} s budget)")
    for name, section in sections.items():
        print(
            f"{'PASS' if section['passed'] else 'FAIL'} {name} ({section['seconds']} s): {section['reason']}"
        )
    targets = [t for s in sections.values() for t in s["targets"]]
    if targets:
        print("\ntargets" + (" (for the GPU: on the CPU they say nothing)" if args.cpu else ""))
        for t in targets:
            print(f"  {'met   ' if t['met'] else 'MISSED'} {t['target']}: {t['value']}")
    print(f"\nresults: {out / SUMMARY}, {out / LOG}")
    sys.exit(0 if summary["passed"] else 1)


if __name__ == "__main__":
    main()
