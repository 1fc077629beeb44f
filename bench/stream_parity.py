"""Streamed vs in-memory CIFAR-10: does RDED distil the same set from both paths?

    python bench/stream_parity.py --data ../shared/datasets/cifar10
    python bench/stream_parity.py --ipc 10 --json bench/out/stream-parity.json

Streaming reads images by byte range, so gzip-compressed shards (the shared CIFAR-10 copy) are first
decompressed into ``--store`` (``gunzip``, content unchanged); the in-memory path reads the originals.
The dataset stage runs three ways on the same samples: ``load: memory`` (decoded, mean/std over all
training images), ``load: stream`` with mean/std measured on every training image
(``stats_images`` >= the split), and ``load: stream`` with the default 20,000-image sample. One
teacher (trained on the in-memory data, so the data path is the only difference) scores RDED's
candidates on each, same seed. Printed: whether labels, draws and the distilled images are equal,
and where they are not, by how much (share of identical images, largest pixel difference on
[0, 1], the mean/std difference that caused it).
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from condense import teacher  # noqa: E402
from condense.config import DatasetConfig, DSAConfig, ModelConfig, TeacherConfig  # noqa: E402
from condense.methods import get_method  # noqa: E402
from condense.methods.base import DistillInputs  # noqa: E402
from condense.prepare import load  # noqa: E402
from condense.stages.dataset import prepare  # noqa: E402
from condense.store import Store  # noqa: E402


class NoCheckpoints:
    def load(self) -> None:
        return None

    def save(self, state: dict) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "cifar10"))
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--teacher-epochs", type=int, default=1)
    parser.add_argument("--width", type=int, default=32, help="ConvNet width of the teacher")
    parser.add_argument("--store", help="work folder: the store and uncompressed shards (default: temporary)")
    parser.add_argument("--json")
    args = parser.parse_args()

    work = Path(args.store or tempfile.mkdtemp(prefix="condense-parity-"))
    store = Store(work / "store")
    plain = work / "shards"
    plain.mkdir(parents=True, exist_ok=True)
    for shard in Path(args.data).glob("*.tar*"):
        target = plain / shard.name.removesuffix(".gz")
        if not target.exists():
            opener = gzip.open if shard.suffix == ".gz" else open
            with opener(shard, "rb") as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
    variants = {
        "memory": {"load": "memory"},
        "stream (stats on all)": {"load": "stream", "stats_images": 10**9},
        "stream (stats on 20k)": {"load": "stream"},
    }
    data = {}
    for name, settings in variants.items():
        path = args.data if settings["load"] == "memory" else str(plain)
        cfg = DatasetConfig(source="webdataset", name="cifar10", path=path, workers=2, **settings)
        started = time.perf_counter()
        key, _ = prepare(cfg, store, args.ipc)
        data[name] = load(store, key, cfg)
        print(f"{name:<24} dataset stage {time.perf_counter() - started:6.1f} s  key {key}")
    memory = data["memory"]
    trained = teacher.train_teacher(
        memory,
        TeacherConfig(source="train", epochs=args.teacher_epochs, batch_size=256, lr=0.05, dsa=False),
        ModelConfig(width=args.width),
        DSAConfig(),
        seed=0,
    )
    print(
        f"teacher (ConvNet-3, {args.teacher_epochs} epochs on the in-memory data): "
        f"test {trained.test_accuracy:.1f}%"
    )
    method = get_method("rded")
    rded = method.config_cls(candidates=args.candidates, crops_per_image=5)
    rows = []
    sets = {}
    for name, real in data.items():
        started = time.perf_counter()
        inputs = DistillInputs(
            real, args.ipc, 0, rded, ModelConfig(width=args.width), DSAConfig(), teacher=trained.model
        )
        sets[name] = method.distill(inputs, NoCheckpoints())
        seconds = time.perf_counter() - started
        reference = sets["memory"]
        pixels = (real.to_pixels(sets[name].images) - memory.to_pixels(reference.images)).abs()
        # The same crop comes back through another mean/std within float rounding; another crop
        # differs by at least a grey level somewhere.
        same = (pixels.flatten(1).amax(1) < 0.5 / 255).float().mean().item()
        row = {
            "variant": name,
            "labels_equal": bool(torch.equal(real.train_y, memory.train_y)),
            "mean_diff": max(abs(a - b) for a, b in zip(real.card["mean"], memory.card["mean"], strict=True)),
            "std_diff": max(abs(a - b) for a, b in zip(real.card["std"], memory.card["std"], strict=True)),
            "identical_images": same,
            "max_pixel_diff": float(pixels.max()),
            "rded_seconds": round(seconds, 1),
        }
        rows.append(row)
    print(f"\nRDED, IPC {args.ipc}, {args.candidates} candidates per class, one teacher, seed 0")
    print(
        f"{'variant':<24} {'labels':>6} {'|d mean|':>9} {'|d std|':>9} {'same images':>11} "
        f"{'max |dx|':>9} {'s':>6}"
    )
    for r in rows:
        print(
            f"{r['variant']:<24} {str(r['labels_equal']):>6} {r['mean_diff']:9.2e} {r['std_diff']:9.2e} "
            f"{r['identical_images']:11.1%} {r['max_pixel_diff']:9.2e} {r['rded_seconds']:6.1f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
