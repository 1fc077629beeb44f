"""A regular (non-editable) install: the wheel holds namespaced packages and the presets, and its
``condense`` command runs the pipeline from any directory, keeping its store in ``./data/store``."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from tests.conftest import ROOT, TINY, last_json


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, **kwargs)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_a_wheel_installed_into_a_fresh_venv_runs_digits_mtt(tmp_path: Path, prefect_env):
    wheels = tmp_path / "wheels"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            str(ROOT),
            "-w",
            str(wheels),
        ]
    )
    (wheel,) = wheels.glob("condense-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.startswith("condense-")}
    assert tops == {"condense", "condense_flows", "condense_tasks"}  # no top-level `flows` or `tasks`
    # ... and every dataset card, method recipe and comparison the presets are made of.
    recipes = {str(p.relative_to(ROOT)) for p in (ROOT / "condense" / "recipes").rglob("*.yaml")}
    assert "condense/recipes/methods/mtt.yaml" in recipes and recipes <= set(names), sorted(
        recipes - set(names)
    )
    # Every module of the package is in the wheel (a new subpackage missing from pyproject's list
    # would be left out, and an installed condense would fail on its first import of it).
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "condense").rglob("*.py")}
    assert sources <= set(names), sorted(sources - set(names))

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)])
    # The dependencies (torch, prefect, ...) come from this environment, found after the venv's own
    # site-packages; condense itself only from the venv (this environment has it as an editable
    # install, whose finder a plain path entry does not activate).
    site = Path(_run([str(python), "-c", "import site; print(site.getsitepackages()[0])"]).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    workdir = tmp_path / "work"
    workdir.mkdir()
    where = _run([str(python), "-c", "import condense.configure as c; print(c.__file__)"], cwd=workdir)
    assert where.stdout.strip().startswith(str(site))
    env = {k: v for k, v in prefect_env.items() if k != "CONDENSE_STORE"}
    args = [str(venv / "bin" / "condense"), "run", "digits-mtt", "--json", "-q"]
    for item in TINY:
        args += ["--set", item]
    summary = last_json(_run(args, cwd=workdir, env=env).stdout)
    assert summary["store"] == str(workdir / "data" / "store")
    assert Path(summary["artifacts"]["manifest"]).is_file()
    assert not (site / "data").exists()  # the store is never inside site-packages
