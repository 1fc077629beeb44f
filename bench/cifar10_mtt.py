"""CIFAR-10 MTT at a CPU budget, from the WebDataset shards: distilled vs. random real accuracy and
the time of each stage.

    python bench/cifar10_mtt.py --data ../shared/datasets/cifar10 [--set ipc=10 ...]

Runs the real pipeline (the ``condense run`` command) into ``bench/out/store`` and prints a table.
A second invocation reuses every cached stage; pass ``--fresh`` to time a cold run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "cifar10"))
    parser.add_argument("--store", default=str(ROOT / "bench" / "out" / "store"))
    parser.add_argument("--preset", default="cifar10-mtt")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    parser.add_argument("--fresh", action="store_true", help="delete the store first (cold timings)")
    args = parser.parse_args()
    if args.fresh:
        shutil.rmtree(args.store, ignore_errors=True)
    cmd = [sys.executable, "-m", "condense_flows.cli", "run", args.preset, "--store", args.store, "--json"]
    for item in [f"dataset.path={args.data}", *args.overrides]:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit(proc.returncode)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])

    print(f"\n{args.preset}  ipc={summary['ipc']}  overrides={args.overrides or '-'}")
    print(f"{'stage':<12} {'cached':<7} {'seconds':>8}")
    for name, stage in summary["stages"].items():
        print(f"{name:<12} {'yes' if stage['cached'] else 'no':<7} {stage['seconds']:>8.1f}")
    print(f"{'total':<12} {'':<7} {summary['seconds']:>8.1f}")
    print(f"\n{'model':<10} {'distilled':>14} {'random_real':>14} {'full_data':>14}   (test %, mean ± std)")
    for arch, acc in summary["accuracy"].items():
        base = summary["baselines_by_arch"][arch]
        cells = [acc, base.get("random_real"), base.get("full_data")]
        print(
            f"{arch:<10} "
            + " ".join(f"{c['mean']:>7.2f} ± {c['std']:<4.2f}" if c else f"{'-':>14}" for c in cells)
        )


if __name__ == "__main__":
    main()
