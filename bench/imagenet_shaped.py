"""An ImageNet-shaped run end to end on CPU: generated 224 px WebDataset shards, streamed.

    python bench/imagenet_shaped.py                      # 4 classes x 150 images, ~10 minutes on 2 cores
    python bench/imagenet_shaped.py --classes 10 --per-class 300 --json bench/out/imagenet-shaped.json

The ``imagenet-rded`` and ``imagenet-sre2l`` presets exactly as a user runs them on ImageNet-1K
(224 px, short side 256 + centre crop, RandomResizedCrop epochs, ImageNet normalisation,
``dataset.load: stream``, a torchvision ResNet-18 teacher trained by the pipeline on the stream, RDED
with factor 2 / SRe2L recovery, online / stored labels, KD evaluation of ResNet-18 students), with
only the budget shrunk to CPU size (teacher epochs, candidates, recovery steps, KD epochs, IPC 2).
Both runs share one store, so SRe2L reuses the dataset index and the teacher RDED trained.

Printed per run: each stage's seconds and images/s where it reads real images, the accuracy of the
distilled set and of random real images under the same KD recipe, label bytes, and the peak
resident memory of the run's process. Also the measured per-image costs the README's ImageNet-1K
estimate is built from (teacher training and inference images/s on this machine).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from condense.datasets.generate import write_shards  # noqa: E402
from condense.report import human_bytes  # noqa: E402


def budget(args: argparse.Namespace, data: Path) -> list[str]:
    """The presets' settings a 2-core CPU can afford; everything else is the presets' own."""
    return [
        f"dataset.path={data}",
        f"dataset.workers={args.workers}",
        f"ipc={args.ipc}",
        f"teacher.epochs={args.teacher_epochs}",
        "teacher.batch_size=32",
        "teacher.lr=0.05",
        f"evaluate.epochs={args.kd_epochs}",
        "evaluate.batch_size=8",
    ]


METHOD_BUDGET = {
    "imagenet-rded": lambda a: [f"distill.candidates={a.candidates}", "distill.crops_per_image=2"],
    # Top 2 of a few classes stands for the preset's top 10 of 1,000; the label savings are on.
    "imagenet-sre2l": lambda a: [
        f"distill.iterations={a.iterations}",
        "distill.checkpoint_every=1000",
        f"relabel.top_k={min(10, a.classes // 2)}",
        "relabel.quantize=uint8",
        f"relabel.stored_epochs={max(1, a.kd_epochs // 4)}",
    ],
}


def run(preset: str, store: Path, overrides: list[str]) -> tuple[dict[str, Any], float, float]:
    """One `condense run`: its summary, wall seconds and the child's peak RSS (MiB)."""
    cmd = [sys.executable, "-m", "condense_flows.cli", "run", preset, "--store", str(store), "--json", "-q"]
    for item in overrides:
        cmd += ["--set", item]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(proc.returncode)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of children is the largest so far: a run lower than an earlier one reports that one.
    return json.loads(proc.stdout.strip().splitlines()[-1]), seconds, max(peak, before) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--per-class", type=int, default=150, help="training images per class")
    parser.add_argument("--test-per-class", type=int, default=30)
    parser.add_argument("--ipc", type=int, default=2)
    parser.add_argument("--teacher-epochs", type=int, default=3)
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--kd-epochs", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", help="folder for shards and store (default: a temporary one)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="condense-imagenet-shaped-"))
    data = work / "shards"
    started = time.perf_counter()
    if not data.exists():
        write_shards(data, args.classes, args.per_class, args.test_per_class, 224, per_shard=200)
    print(
        f"shards: {args.classes} classes x {args.per_class} train / {args.test_per_class} test, 224 px, "
        f"{human_bytes(sum(p.stat().st_size for p in data.iterdir()))} "
        f"({time.perf_counter() - started:.0f} s)"
    )
    train_images = args.classes * args.per_class
    rows = []
    for preset in ("imagenet-rded", "imagenet-sre2l"):
        summary, seconds, peak = run(preset, work / "store", budget(args, data) + METHOD_BUDGET[preset](args))
        stages = summary["stages"]
        teacher = stages.get("teacher", {})
        row = {
            "preset": preset,
            "seconds": round(seconds, 1),
            "peak_rss_mib": round(peak),
            "stages": {name: (s["seconds"], s["cached"]) for name, s in stages.items()},
            "teacher_images_per_s": None
            if teacher.get("cached")
            else round(train_images * args.teacher_epochs / teacher["seconds"], 1),
            "accuracy": summary["accuracy"],
            "random_real": summary["baselines"].get("random_real"),
            "teacher_test_accuracy": summary["teacher"].get("test_accuracy"),
            "labels": summary["labels"],
        }
        rows.append(row)
        print(f"\n{preset}: {seconds:.0f} s, peak RSS {peak:.0f} MiB")
        for name, (secs, cached) in row["stages"].items():
            print(f"  {name:<12} {secs:8.1f} s{' (cached)' if cached else ''}")
        if row["teacher_images_per_s"]:
            print(f"  teacher training: {row['teacher_images_per_s']} images/s (ResNet-18, 224 px, streamed)")
        print(f"  distilled {json.dumps(row['accuracy'])}")
        print(f"  random real {json.dumps(row['random_real'])}")
        print(f"  teacher test accuracy {row['teacher_test_accuracy']}, labels {json.dumps(row['labels'])}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
