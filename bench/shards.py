"""One distillation on two workers: SRe2L, RDED, DM and CUDD on generated 100-class data, 1 vs 2
shards on a local 2-worker Dask cluster.

    python bench/shards.py                                   # prints the table, writes the JSON
    python bench/shards.py --methods dm,cudd                 # reruns these rows, keeps the others
    python bench/shards.py --methods rded --ipc 4 --json /tmp/shards.json

For each method: the teacher is trained once (not timed), then the distill stage runs (a) as one job
on one Dask worker, (b) as 2 shards, one on each of the cluster's 2 single-threaded worker processes,
then their merge. Reported: wall seconds of the distill stage (shards + merge), the speedup, each
worker's peak resident memory (the process's high-water mark read from /proc after its job), and
whether the merged artifact's files equal the unsharded one's byte for byte. Torch uses one thread
per worker (as a Dask worker of this kind does), so two shards can use both cores. Stores live under
``data/shards``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from condense.configure import load_config  # noqa: E402
from condense.datasets.generate import write_shards  # noqa: E402
from condense.stages import dataset_job, execute, make_plan  # noqa: E402
from condense.store import Store  # noqa: E402

SETTINGS = {
    # Generated 100 classes of 32 px; a small batch-norm ConvNet teacher; budgets of a few minutes.
    "rded": ["distill.candidates=60", "distill.crops_per_image=10"],
    "sre2l": ["distill.iterations=60", "distill.checkpoint_every=30"],
    "dm": ["distill.iterations=60", "distill.checkpoint_every=30", "distill.batch_real=32"],
    # Two curricula of 2: only the first shards; the second (and its student) follows in the merge.
    "cudd": ["distill.iterations=60", "distill.checkpoint_every=30", "distill.student_epochs=5"],
}


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_job(job: Any, cfg: Any, store: Store) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    outcome = execute(job, cfg, store)
    return {"part": outcome["part"], "seconds": outcome["seconds"], "peak_rss_mb": round(peak_rss_mb(), 1)}


def artifact_files(store: Store, key: str) -> dict[str, Any]:
    """The set's files (images, labels, pixels, history) and its meta's statistics; the meta's
    timings and part records differ by how the set was made."""
    folder = store.path("distill", key)
    files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    meta = store.meta("distill", key)
    files["meta.json"] = {field: meta[field] for field in ("lr", "method", "ipc", "stats", "input_std")}
    return files


def distil(client: Any, method: str, shards: int, data: Path, work: Path, ipc: int) -> dict[str, Any]:
    overrides = [
        f"dataset.path={data}",
        "dataset.load=memory",
        "compute.device=cpu",
        f"ipc={ipc}",
        "teacher.epochs=5",
        "model.width=32",
        f"compute.shards={shards}",
        *SETTINGS[method],
    ]
    cfg = load_config(f"cifar100-{method}", overrides)
    store = Store(work / f"{method}-{shards}")
    dataset = execute(dataset_job(), cfg, store)
    plan = make_plan(cfg, store, dataset["key"])
    for job in plan.jobs:
        if job.stage in ("experts", "teacher"):
            client.submit(run_job, job, cfg, store, pure=False).result()
    jobs = [job for job in plan.jobs if job.stage == "distill"]
    client.restart()  # fresh worker processes: each one's memory high-water mark is this run's
    started = time.perf_counter()
    parts = client.gather(
        [client.submit(run_job, j, cfg, store, pure=False) for j in jobs if j.part is not None]
    )
    merge = client.submit(run_job, next(j for j in jobs if j.part is None), cfg, store, pure=False).result()
    seconds = time.perf_counter() - started
    key = str(plan.keys["distill"])
    return {
        "seconds": round(seconds, 1),
        "jobs": [*parts, merge],
        "files": artifact_files(store, key),
        "key": key,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="sre2l,rded,dm,cudd")
    parser.add_argument("--ipc", type=int, default=4)
    parser.add_argument("--work", type=Path, default=ROOT / "data" / "shards")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "shards.json")
    args = parser.parse_args()
    from distributed import Client, LocalCluster

    data = args.work / "cifar100-like"
    if not data.exists():
        write_shards(data, 100, 60, 10, 32)
    rows = []
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        for method in args.methods.split(","):
            shutil.rmtree(args.work / f"{method}-1", ignore_errors=True)
            shutil.rmtree(args.work / f"{method}-2", ignore_errors=True)
            one = distil(client, method, 1, data, args.work, args.ipc)
            two = distil(client, method, 2, data, args.work, args.ipc)
            row = {
                "method": method,
                "ipc": args.ipc,
                "one_job_s": one["seconds"],
                "two_shards_s": two["seconds"],
                "speedup": round(one["seconds"] / two["seconds"], 2),
                "peak_rss_mb": [job["peak_rss_mb"] for job in two["jobs"]],
                "same_key": one["key"] == two["key"],
                "identical_bytes": one["files"] == two["files"],
                "shard_seconds": [job["seconds"] for job in two["jobs"]],
            }
            rows.append(row)
            print(
                f"{method:<6} IPC {args.ipc}: one job {row['one_job_s']} s, 2 shards {row['two_shards_s']} s "
                f"(x{row['speedup']}), peak RSS per job {row['peak_rss_mb']} MB, "
                f"identical bytes {row['identical_bytes']}",
                flush=True,
            )
    if args.json.is_file():  # rows of methods not rerun are kept
        rerun = {row["method"] for row in rows}
        kept = [row for row in json.loads(args.json.read_text())["rows"] if row["method"] not in rerun]
        rows = kept + rows
    report = {
        "command": "python bench/shards.py",
        "machine": "2 CPU cores, a local Dask cluster of 2 single-threaded worker processes",
        "data": "generated: 100 classes of 32 px, 60 training and 10 test images each",
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
