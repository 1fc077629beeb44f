"""Fault injection: damage each kind of artifact in every way, rerun, and show what the user sees.

    python bench/faults.py                       # tiny digits-mtt, 7 artifact kinds x 4 faults
    python bench/faults.py --json bench/out/faults.json

One intact run fills a store. Then, per artifact kind (trajectories, synthetic images, soft labels,
teacher weights, an artifact's meta.json, a version record, an export shard) and per fault (delete
a file, truncate it, flip bytes in place, delete the commit marker), a copy of that store is damaged
and the same command rerun, twice if the first rerun failed. The table says what the user saw (the
last line on stderr, or the note the run printed), the exit codes, and whether the result (accuracy,
learned lr, the exported images) equals the intact run's. No row may read "exit 0" with "no".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import condense  # noqa: E402

TINY = [
    "dataset.train_per_class=20",
    "experts.num_experts=2",
    "experts.epochs=4",
    "distill.iterations=6",
    "distill.syn_steps=4",
    "distill.max_start_epoch=2",
    "evaluate.seeds=2",
    "evaluate.epochs=20",
    "evaluate.full_data_epochs=2",
]
FAULTS = ("delete file", "truncate", "flip bytes", "delete marker")


def run(store: Path, env: dict[str, str]) -> tuple[int, str, dict[str, Any] | None]:
    cmd = [sys.executable, "-m", "condense_flows.cli", "run", "digits-mtt", "--store", str(store), "--json"]
    for item in TINY:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    notes = [line for line in proc.stderr.splitlines() if "damaged" in line or "error" in line]
    summary = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None
    return proc.returncode, (notes[-1].strip() if notes else "-"), summary


def target(store: Path, summary: dict[str, Any], kind: str) -> tuple[Path, Path]:
    """(the file a fault hits, the commit marker that vouches for it)."""
    keys = summary["keys"]
    if kind == "version record":
        record = next((store / "versions").rglob("v0001.json"))
        return record, record  # a version record is its own marker
    stage, inner = {
        "trajectories": ("experts", "trajectories.zarr/c"),
        "synthetic images": ("distill", "synthetic.zarr/images/c"),
        "soft labels": ("soft_labels", "labels.zarr/probs/c"),
        "teacher weights": ("teacher", "weights.pt"),
        "meta.json": ("distill", "meta.json"),
        "export shard": ("export", "distilled-000000.tar"),
    }[kind]
    folder = store / stage / keys[stage]
    path = folder / inner
    if path.is_dir():
        path = sorted(p for p in path.rglob("*") if p.is_file())[0]
    return path, folder / "meta.json"


def damage(path: Path, marker: Path, fault: str) -> None:
    if fault == "delete file":
        path.unlink()
    elif fault == "truncate":
        path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])
    elif fault == "flip bytes":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        marker.unlink()


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if (a["accuracy"], a["baselines"], a["learned_lr"]) != (b["accuracy"], b["baselines"], b["learned_lr"]):
        return False
    x, y = (condense.load_distilled(s["artifacts"]["run_dir"]) for s in (a, b))
    return bool((x.images == y.images).all() and (x.labels == y.labels).all())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="condense-faults-"))
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect")}
    code, _, intact = run(work / "intact", env)
    assert code == 0 and intact is not None, "the intact run failed"
    kinds = ("trajectories", "synthetic images", "soft labels", "teacher weights", "meta.json",
             "version record", "export shard")  # fmt: skip
    rows = []
    for kind in kinds:
        for fault in FAULTS:
            store = work / f"{kind}-{fault}".replace(" ", "_")
            shutil.copytree(work / "intact", store)
            damage(*target(store, intact, kind), fault)
            first, seen, summary = run(store, env)
            codes = [first]
            if summary is None:  # the run stopped; the fault must not stay in the way
                second, _, summary = run(store, env)
                codes.append(second)
            equal = "yes" if summary is not None and same(summary, intact) else "no"
            rows.append({"artifact": kind, "fault": fault, "user saw": seen, "exit": codes, "equal": equal})
            print(
                f"{kind:<17} {fault:<13} exit {'/'.join(map(str, codes)):<5} equal {equal:<3}  {seen}",
                flush=True,
            )
    bad = [r for r in rows if r["exit"][0] == 0 and r["equal"] == "no"]
    print(f"\n{len(rows)} cases, {len(bad)} with exit 0 and a different result")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
