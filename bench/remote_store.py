"""What running on an object-store store costs next to a local one: wall time per stage, bytes in the
bucket, and what a second machine (fresh cache) downloads for a run whose stages are all cached.

    python bench/remote_store.py                                  # digits-mtt, moto's S3 on loopback
    python bench/remote_store.py --preset digits-rded --set evaluate.seeds=2
    python bench/remote_store.py --url s3://my-bucket/bench       # a real bucket (AWS_* from the env)

Without ``--url`` it starts moto's S3 server on a free loopback port (``pip install -e '.[test]'``),
so the numbers are the protocol's overhead (uploads, markers, mirroring), not network latency.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from condense.report import human_bytes  # noqa: E402
from tests.moto_s3 import start_s3  # noqa: E402


def run(preset: str, store: str, overrides: list[str], env: dict[str, str]) -> tuple[dict[str, Any], float]:
    cmd = [sys.executable, "-m", "condense_flows.cli", "run", preset, "--store", store, "--json", "-q"]
    for item in overrides:
        cmd += ["--set", item]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(proc.returncode)
    return json.loads(proc.stdout.strip().splitlines()[-1]), time.perf_counter() - started


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="digits-mtt")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config overrides")
    parser.add_argument("--url", help="a store URL to use instead of moto's local S3 (it should be empty)")
    args = parser.parse_args()

    server, aws = (None, {}) if args.url else start_s3("bench")
    os.environ.update(aws)  # this process reads the bucket's size at the end
    url = args.url or "s3://bench/store"
    work = Path(tempfile.mkdtemp(prefix="condense-bench-"))
    env = {**os.environ, **aws, "PREFECT_HOME": str(work / "prefect")}
    runs = [
        ("local, fresh", str(work / "local"), None),
        ("local, rerun", str(work / "local"), None),
        ("object store, fresh", url, work / "cache-a"),
        ("object store, 2nd machine", url, work / "cache-b"),
    ]
    rows = []
    for name, store, cache in runs:
        summary, wall = run(args.preset, store, args.overrides, {**env, "CONDENSE_CACHE": str(cache or work)})
        stages = {stage: info["seconds"] for stage, info in summary["stages"].items()}
        local = tree_bytes(cache / "stores") if cache else tree_bytes(Path(store))
        rows.append((name, wall, stages, local, summary["accuracy"]))
        print(f"{name}: {wall:.1f} s", file=sys.stderr)

    import fsspec

    fs, base = fsspec.core.url_to_fs(url)
    names = list(rows[0][2])
    print(f"\n{args.preset} {' '.join(args.overrides)}; object store: {url}" + (" (moto)" if server else ""))
    print(f"{'run':<26} {'wall s':>7} " + " ".join(f"{n:>11}" for n in names) + f" {'local bytes':>12}")
    for name, wall, stages, local, _ in rows:
        cells = " ".join(f"{stages.get(n, 0):>11.1f}" for n in names)
        print(f"{name:<26} {wall:>7.1f} {cells} {human_bytes(local):>12}")
    print(f"bytes in the object store: {human_bytes(fs.du(base))}")
    same = all(row[4] == rows[0][4] for row in rows)
    print(f"accuracy identical across all four runs: {same}")
    if server:
        server.stop()


if __name__ == "__main__":
    main()
