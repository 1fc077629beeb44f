"""The first minute of a new user, timed: README line 1's run, an unchanged rerun, the listings.

    python bench/first_minute.py                              # a fresh store under data/
    python bench/first_minute.py --reruns 5 --json bench/results/first-minute.json

Runs, one after another on this machine (the install is not timed: it is pip's):

1. ``condense run digits-mtt`` into an empty store: wall seconds, the flow's own seconds, the stage
   table (compute and wall seconds per stage) and the accuracies, which must keep distilled >= 90%
   and >= random real + 15 points;
2. the same command ``--reruns`` times more, every job cached: min / median / max wall seconds;
3. ``condense presets``, ``condense --help``, ``condense ls``, ``condense config``: wall seconds each
   (best of three; ``config`` validated once, then remembered).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONDENSE = [sys.executable, "-m", "condense_flows.cli"]


def timed(args: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    proc = subprocess.run([*CONDENSE, *args], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"condense {' '.join(args)} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return seconds, proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, default=ROOT / "data" / "first-minute-store")
    parser.add_argument("--reruns", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    shutil.rmtree(args.store, ignore_errors=True)
    run = ["run", "digits-mtt", "--store", str(args.store), "--json", "-q"]
    first_seconds, first = timed(run)
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    table = first.stdout.split("\n\ntest accuracy")[0]
    print(
        f"README line 1 (condense run digits-mtt, empty store): {first_seconds:.1f} s wall, "
        f"{summary['seconds']:.1f} s in the flow\n\n{table}\n"
    )
    distilled = summary["accuracy"]["convnet"]["mean"]
    random_real = summary["baselines"]["random_real"]["mean"]
    print(
        f"distilled {distilled:.2f}%, random real {random_real:.2f}%, full data "
        f"{summary['baselines']['full_data']['mean']:.2f}%"
    )
    reruns = [timed(run)[0] for _ in range(args.reruns)]
    print(
        f"unchanged rerun x{len(reruns)}: min {min(reruns):.2f} / median "
        f"{statistics.median(reruns):.2f} / max {max(reruns):.2f} s"
    )
    listings: dict[str, float] = {}
    for name, command in {
        "presets": ["presets"],
        "--help": ["--help"],
        "ls": ["ls", "--store", str(args.store)],
        "config": ["config", "digits-mtt"],  # shown once by the first run's config; remembered since
    }.items():
        listings[name] = min(timed(command)[0] for _ in range(3))
        print(f"condense {name}: {listings[name]:.2f} s (best of 3)")
    result: dict[str, Any] = {
        "first_run_seconds": round(first_seconds, 2),
        "flow_seconds": summary["seconds"],
        "stages": summary["stages"],
        "accuracy": {
            "distilled": distilled,
            "random_real": random_real,
            "full_data": summary["baselines"]["full_data"]["mean"],
        },
        "rerun_seconds": [round(s, 2) for s in reruns],
        "listing_seconds": {k: round(v, 2) for k, v in listings.items()},
        "ok": distilled >= 90 and distilled >= random_real + 15,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
