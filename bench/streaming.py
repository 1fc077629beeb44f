"""Peak memory and images/s of the dataset path against the dataset's size: in memory vs streamed.

    python bench/streaming.py                                  # 100 classes x 40/80/160 images, 64 px
    python bench/streaming.py --json bench/out/streaming-cpu.json --width 32   # the issue's teacher
    python bench/streaming.py --per-class 100 --sizes 1,2,4,8 --work /tmp/shards
    python bench/streaming.py --workers 0,2                    # also streamed with 2 DataLoader workers

Issue 13's "memory is flat in the dataset's size". Generated WebDataset shards
(:func:`condense.datasets.generate.write_shards`: ``--classes`` classes of ``--side`` px JPEGs,
``--per-class`` training images per class times each of ``--sizes``, ``--test-per-class`` test
images per class at every size) go through these steps, on each path (``dataset.load: memory`` and
``stream``), each step in a fresh process so that its peak resident memory is its own:

- ``dataset``: the dataset stage (:func:`condense.stages.dataset.prepare`) into a store of its own
  per (size, path): decoding both splits (memory) or indexing the shards and measuring mean/std
  (stream). images = training + test images.
- ``teacher``: the stored dataset loaded as the pipeline loads it (:func:`condense.prepare.load`),
  then one epoch of teacher training (:func:`condense.teacher.train_teacher`, ConvNet of width
  ``--width``, batch norm, DSA) and its train/test accuracy passes. images/s = training images /
  the epoch's seconds; the accuracy passes are in ``eval_seconds``.
- ``rded``: RDED selection (:func:`condense.methods.rded.distill`, ipc 1, ``--candidates`` per
  class, the class-order check on 10 images per class with its floor off: one epoch of teacher does
  not promise 3x chance) with that teacher. images = candidates + check images.
- ``random``: the random-real baseline's draw (:func:`condense.evaluate.random_real_subset`,
  ``--ipc`` per class). images = the drawn images.
- ``expert``: one epoch of one MTT expert (:func:`condense.experts.train_expert`, plain SGD, DSA,
  batch 256) and its train/test accuracy passes. images = training images.
- ``dream``: one iteration of DREAM on DM (:mod:`condense.methods.dream`, ipc 1, ``--ipc`` real
  images per class chosen as the nearest to k-means centroids of every member's features, which
  reads the whole split class by class). images = training images.

``--steps`` runs a subset (``dataset`` is always run; ``rded`` brings ``teacher``).

Peak memory is the child process's high-water mark (``VmHWM``: imports and loading included); with
``--workers N`` > 0 (streamed only) DataLoader workers are forked processes that share the parent's
pages, so their private memory (``smaps_rollup``), summed and sampled every 50 ms, is reported next
to it ("workers MiB"). Each step's ``load_seconds`` (teacher, rded, random) is in the
JSON.

The children run with a fixed glibc mmap threshold (``MALLOC_MMAP_THRESHOLD_``, ``--mmap-threshold``,
4 MiB): glibc's default threshold moves up to 32 MiB as large blocks are freed, after which freed
activations stay in a fragmented heap, and the teacher step's high-water mark then wanders by about
10% between runs, not monotonically in the dataset's size (1141, 1112, 1229 MiB streamed at x1, x2,
x4 in one run; 1052 and 1065 MiB at x1 and x4 with the fixed threshold, same seconds).
``--mmap-threshold 0`` measures under glibc's defaults.

The verdicts: every streamed step's peak (the process's, plus its workers' private memory) varies
by at most 10% across the sizes ((max - min) / min), and every in-memory step's peak grows by more
than that from the smallest size to the largest.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STEPS = ("dataset", "teacher", "rded", "random", "expert", "dream")
"""In this order: ``rded`` needs the teacher ``teacher`` saved; every step needs ``dataset``'s store."""
FLAT = 0.10
"""The streamed path's peak may vary by this fraction across sizes."""


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*/children"):
            try:
                kids = [int(k) for k in task.read_text().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def _private_bytes(pid: int) -> int:
    """Memory of ``pid`` that no other process shares (a forked worker shares the parent's pages)."""
    total = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            total += int(line.split()[1]) * 1024
    return total


class _Workers(threading.Thread):
    """Samples the private memory of this process's descendants (DataLoader workers) every 50 ms and
    keeps the largest sum seen."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            total = 0
            for pid in _descendants(os.getpid()):
                try:
                    total += _private_bytes(pid)
                except OSError:
                    continue  # exited meanwhile
            self.peak = max(self.peak, total)


class _EpochClock:
    """A Progress stand-in that records when each teacher epoch ends."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def step(self, i: int, total: int, detail: str = "") -> None:
        self.ends.append(time.perf_counter())

    def note(self, message: str) -> None:
        pass


class _NoCheckpoints:
    def load(self) -> None:
        return None

    def save(self, state: dict[str, Any]) -> None:
        pass


def child(step: str, shards: Path, store_root: Path, load_mode: str, key: str, args: Any) -> dict:
    """One measured step in this (fresh) process; returns its row."""
    import torch

    from condense.config import DatasetConfig, DSAConfig, ModelConfig, TeacherConfig
    from condense.prepare import load
    from condense.stages.dataset import prepare
    from condense.store import Store

    cfg = DatasetConfig(
        source="webdataset", name="generated", path=str(shards), load=load_mode, workers=args.workers
    )
    store = Store(store_root)
    teacher_cfg = TeacherConfig(source="train", epochs=1)
    model_cfg = ModelConfig(width=args.width)
    teacher_file = store_root / "teacher.pt"
    before = _status_kib("VmRSS") * 1024
    row: dict[str, Any] = {"step": step}
    workers = _Workers()
    if args.workers:
        workers.start()
    started = time.perf_counter()
    if step == "dataset":
        key, cached = prepare(cfg, store, ipc=args.ipc)
        assert not cached, "the benchmark's store must be fresh"
        card = store.meta("dataset", key)["card"]
        row.update(key=key, images=card["train_count"] + card["test_count"], train=card["train_count"])
        row["seconds"] = time.perf_counter() - started
    else:
        data = load(store, key, cfg)
        loaded = time.perf_counter()
        row["load_seconds"] = loaded - started
        if step == "teacher":
            from condense.teacher import train_teacher

            clock = _EpochClock()
            trained = train_teacher(data, teacher_cfg, model_cfg, DSAConfig(), seed=0, progress=clock)  # type: ignore[arg-type]
            torch.save(trained.model.state_dict(), teacher_file)
            row.update(
                images=len(data.train_y),
                seconds=clock.ends[0] - loaded,
                eval_seconds=time.perf_counter() - clock.ends[0],
                train_accuracy=round(trained.train_accuracy, 2),
                test_accuracy=round(trained.test_accuracy, 2),
            )
        elif step == "rded":
            from condense.methods.base import DistillInputs
            from condense.methods.rded import RDEDConfig, distill
            from condense.teacher import build_teacher

            teacher = build_teacher(teacher_cfg, model_cfg, data)
            teacher.load_state_dict(torch.load(teacher_file, weights_only=True))
            method_cfg = RDEDConfig(
                candidates=args.candidates, check_images_per_class=10, min_teacher_accuracy=0
            )
            inputs = DistillInputs(data, 1, 0, method_cfg, model_cfg, DSAConfig(), teacher=teacher.eval())
            synthetic = distill(inputs, _NoCheckpoints())
            counts = torch.bincount(data.train_y.cpu(), minlength=data.num_classes)
            drawn = int(counts.clamp(max=args.candidates).sum() + counts.clamp(max=10).sum())
            row.update(
                images=drawn,
                seconds=time.perf_counter() - loaded,
                synthetic=len(synthetic.images),
                teacher_check_accuracy=synthetic.stats["teacher_check_accuracy"],
            )
        elif step == "expert":
            from condense.config import ExpertsConfig
            from condense.experts import train_expert

            expert_cfg = ExpertsConfig(num_experts=1, epochs=1, batch_size=256)
            trajectory = train_expert(data, model_cfg, expert_cfg, DSAConfig(), seed=0)
            row.update(
                images=len(data.train_y),
                seconds=time.perf_counter() - loaded,
                test_accuracy=round(trajectory.test_accuracy, 2),
            )
        elif step == "dream":
            from condense.methods.base import DistillInputs
            from condense.methods.dream import CONFIG as DREAM_CONFIG
            from condense.methods.dream import distill as dream

            method_cfg = DREAM_CONFIG(base="dm", iterations=1, batch_real=args.ipc, interval=1)
            inputs = DistillInputs(data, 1, 0, method_cfg, model_cfg, DSAConfig())
            synthetic = dream(inputs, _NoCheckpoints(), _EpochClock())
            row.update(
                images=len(data.train_y),
                seconds=time.perf_counter() - loaded,
                reclusters=synthetic.stats["reclusters"],
            )
        elif step == "random":
            from condense.evaluate import random_real_subset

            x, _ = random_real_subset(data, args.ipc, seed=0)
            row.update(images=len(x), seconds=time.perf_counter() - loaded)
        else:
            raise ValueError(step)
    row["peak_bytes"] = _status_kib("VmHWM") * 1024
    row["before_bytes"] = before
    if args.workers:
        workers.done.set()
        workers.join()
    row["workers_bytes"] = workers.peak
    return row


def _run_child(step: str, shards: Path, store: Path, path: str, key: str, args: Any, workers: int) -> dict:
    command = [sys.executable, __file__, "--child", step, str(shards), str(store), path, key]
    command += ["--workers", str(workers), "--width", str(args.width)]
    command += ["--candidates", str(args.candidates), "--ipc", str(args.ipc)]
    env = dict(os.environ)
    if args.mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"{step} on {path} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def verdicts(rows: list[dict]) -> dict[str, Any]:
    """Per path and step the spread of peak memory (the process's, plus its workers' private memory)
    across sizes, (max - min) / min; whether every streamed one is within 10%; whether every
    in-memory one grows by more than 10% from the smallest size to the largest."""
    total = {id(r): r["peak_bytes"] + r["workers_bytes"] for r in rows}
    spreads: dict[str, dict[str, float]] = {}
    growth: dict[str, float] = {}
    for label in dict.fromkeys(r["path"] for r in rows):
        spreads[label] = {}
        for step in dict.fromkeys(r["step"] for r in rows):
            mine = sorted((r["size"], total[id(r)]) for r in rows if r["path"] == label and r["step"] == step)
            values = [v for _, v in mine]
            spreads[label][step] = (max(values) - min(values)) / min(values)
            if label == "memory":
                growth[step] = values[-1] / values[0] - 1
    return {
        "spreads": spreads,
        "memory_growth": growth,
        "stream_within_10pct": all(
            v <= FLAT for label, by_step in spreads.items() if label != "memory" for v in by_step.values()
        ),
        "memory_grows": all(g > FLAT for g in growth.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--per-class", type=int, default=40, help="training images per class at size 1")
    parser.add_argument("--sizes", default="1,2,4", help="multiples of --per-class")
    parser.add_argument("--test-per-class", type=int, default=10, help="test images per class (every size)")
    parser.add_argument("--side", type=int, default=64, help="image side in pixels")
    parser.add_argument("--per-shard", type=int, default=1000, help="samples per shard")
    parser.add_argument("--width", type=int, default=8, help="the teacher ConvNet's width (32: ~4x slower)")
    parser.add_argument("--candidates", type=int, default=20, help="RDED candidates per class")
    parser.add_argument("--ipc", type=int, default=10, help="random-real images per class")
    parser.add_argument(
        "--workers", default="0", help="DataLoader workers of the streamed path, comma-separated (0,2)"
    )
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        default=4 * 2**20,
        help="glibc's MALLOC_MMAP_THRESHOLD_ in the children, bytes (0: glibc's dynamic default)",
    )
    parser.add_argument("--steps", default=",".join(STEPS), help=f"a subset of {','.join(STEPS)}")
    parser.add_argument("--work", type=Path, help="where shards and stores go (default: a temporary dir)")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--child", nargs=5, metavar=("STEP", "SHARDS", "STORE", "PATH", "KEY"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        step, shards, store, path, key = args.child
        args.workers = int(args.workers)
        print(json.dumps(child(step, Path(shards), Path(store), path, key, args)))
        return

    from condense.datasets.generate import write_shards

    sizes = [int(s) for s in args.sizes.split(",")]
    asked = set(args.steps.split(",")) | {"dataset"}
    if "rded" in asked:  # RDED scores its candidates with the teacher step's saved teacher
        asked.add("teacher")
    if asked - set(STEPS):
        sys.exit(f"unknown steps {sorted(asked - set(STEPS))}; choose from {', '.join(STEPS)}")
    steps = [s for s in STEPS if s in asked]
    workers = [int(w) for w in args.workers.split(",")]
    paths = [("memory", 0)] + [("stream", w) for w in workers]
    with tempfile.TemporaryDirectory(prefix="condense-streaming-") as scratch:
        work = args.work or Path(scratch)
        rows = []
        for size in sizes:
            per_class = args.per_class * size
            shards = work / f"x{size}" / "shards"
            if not shards.is_dir():
                write_shards(shards, args.classes, per_class, args.test_per_class, args.side, args.per_shard)
            for path, w in paths:
                label = path if path == "memory" or len(workers) == 1 else f"stream/w{w}"
                store = work / f"x{size}" / label.replace("/", "-")
                if store.exists():
                    sys.exit(f"{store} exists: give --work an empty folder")
                key = "-"
                for step in steps:
                    row = _run_child(step, shards, store, path, key, args, w)
                    key = row.get("key", key)
                    row.update(size=size, train_images=args.classes * per_class, path=label, workers=w)
                    row["images_per_s"] = row["images"] / row["seconds"] if row["seconds"] > 0 else None
                    rows.append(row)
                    print(
                        f"x{size} {label:9} {step:8} {row['peak_bytes'] / 2**20:8.1f} MiB "
                        f"{row['seconds']:7.2f} s",
                        file=sys.stderr,
                    )

    print(
        f"\n{args.classes} classes of {args.side} px, {args.per_class} x {args.sizes} training images per "
        f"class, {args.test_per_class} test per class; teacher ConvNet width {args.width}, one epoch; "
        + (
            f"MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}"
            if args.mmap_threshold
            else "glibc malloc defaults"
        )
    )
    print(
        f"{'train imgs':>10}  {'path':9} {'step':8} {'peak RSS MiB':>12} {'workers MiB':>11} "
        f"{'seconds':>8} {'images':>7} {'images/s':>9}"
    )
    for row in rows:
        workers_mib = f"{row['workers_bytes'] / 2**20:11.1f}" if row["workers"] else f"{'-':>11}"
        print(
            f"{row['train_images']:10}  {row['path']:9} {row['step']:8} {row['peak_bytes'] / 2**20:12.1f} "
            f"{workers_mib} {row['seconds']:8.2f} {row['images']:7} {row['images_per_s']:9.0f}"
        )
    report = verdicts(rows)
    print("\npeak memory (process + workers' private) spread across sizes, (max - min) / min:")
    print(f"{'path':9} " + " ".join(f"{s:>8}" for s in steps))
    for label, by_step in report["spreads"].items():
        print(f"{label:9} " + " ".join(f"{by_step[s]:8.1%}" for s in steps))
    flat, grows = report["stream_within_10pct"], report["memory_grows"]
    print(f"\nstream within {FLAT:.0%} across sizes: {'PASS' if flat else 'FAIL'}")
    print(
        f"memory grows by more than {FLAT:.0%} from x{min(sizes)} to x{max(sizes)}: "
        f"{'PASS' if grows else 'FAIL'}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: v for k, v in vars(args).items() if k not in ("json", "work", "child")}
        args.json.write_text(
            json.dumps(
                {"settings": settings, "rows": rows, **report},
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
