"""Stored (FKD/SRe2L) soft labels: bytes against KD accuracy for each way of storing fewer of them.

    python bench/label_storage.py                  # digits, RDED IPC 10, 100 KD epochs, 5 students each
    python bench/label_storage.py --epochs 300 --stored-epochs 30 --seeds 5 --json out.json
    python bench/label_storage.py --preset digits-sre2l --set distill.iterations=100

One distilled set (``--preset``, default ``digits-rded``: a batch-norm teacher trained on the real
digits picks the crops) and one teacher, built once through the library (no Prefect, no store
beyond the prepared dataset). Then, per scheme, the relabel stage's own function draws the plans and
stores the teacher's probabilities (:func:`condense.relabel.relabel`), the arrays are saved as the
stage saves them (zarr, chunked per epoch; ``on disk`` is after zarr's compression), and ``--seeds``
fresh ConvNet students train on the replayed labels with the preset's KD recipe
(:func:`condense.evaluate.train_and_test_kd`) and are tested on the real test split.

Schemes (``relabel.*`` fields): ``fp32`` (all probabilities, float32), ``fp16`` (the default),
``top_k`` (``--top-k`` largest, float16 plus int16 class indices), ``stored_epochs`` (``--stored-
epochs`` of ``--epochs`` plans, replayed cyclically), ``uint8`` (8-bit codes, one float16 scale per
row) and ``combined`` (top_k + uint8 + stored_epochs).

The ImageNet-1K lines extrapolate each scheme's measured bytes: per (image, stored epoch) the plan
and per-row bytes (order, box, flip, CutMix, the uint8 scale; the CutMix boxes are per batch, counted
at the digits batch size, an overestimate), plus per kept value its bytes (index + value), times
1,000 x IPC images, the stored epochs (300, or 300 x stored_epochs / epochs) and the kept values
(1,000 classes, or ``--imagenet-top-k``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from condense import artifacts, relabel  # noqa: E402
from condense.configure import load_config  # noqa: E402
from condense.evaluate import train_and_test_kd  # noqa: E402
from condense.methods import get_method  # noqa: E402
from condense.methods.base import DistillInputs  # noqa: E402
from condense.prepare import load  # noqa: E402
from condense.progress import SILENT  # noqa: E402
from condense.report import human_bytes  # noqa: E402
from condense.stages.dataset import prepare  # noqa: E402
from condense.stages.evaluate import eval_seed, kd_recipe  # noqa: E402
from condense.store import Store  # noqa: E402
from condense.store.files import disk_bytes  # noqa: E402
from condense.teacher import train_teacher  # noqa: E402

VALUE_ARRAYS = ("top_k_index", "top_k_prob", "top_k_code")
"""Arrays with one entry per kept value; every other array is per row (or per batch)."""


class NoCheckpoints:
    """The distill stage's checkpoints, for a run that never resumes."""

    def load(self) -> None:
        return None

    def save(self, state: dict[str, Any]) -> None:
        return None


def schemes(args: argparse.Namespace) -> dict[str, list[str]]:
    k, s = f"relabel.top_k={args.top_k}", f"relabel.stored_epochs={args.stored_epochs}"
    return {
        "fp32": ["relabel.fp16=false"],
        "fp16": [],
        "top_k": [k],
        "stored_epochs": [s],
        "uint8": ["relabel.quantize=uint8"],
        "combined": [k, s, "relabel.quantize=uint8"],
    }


def measure(arrays: dict[str, np.ndarray], kept: int) -> dict[str, float]:
    """Bytes per (image, stored epoch) that do not grow with the kept values, and per kept value."""
    epochs, images = arrays["order"].shape
    per_value = sum(a.nbytes for n, a in arrays.items() if n in VALUE_ARRAYS)
    per_row = sum(a.nbytes for n, a in arrays.items() if n not in VALUE_ARRAYS)
    return {
        "row_bytes": per_row / (epochs * images),
        "value_bytes": per_value / (epochs * images * kept),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="digits-rded")
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=100, help="KD evaluation epochs (the preset: 300)")
    parser.add_argument("--seeds", type=int, default=5, help="fresh students per scheme")
    parser.add_argument("--top-k", type=int, default=3, help="kept probabilities of digits' 10 classes")
    parser.add_argument("--stored-epochs", type=int, default=10, help="stored plans (a tenth of --epochs)")
    parser.add_argument("--imagenet-top-k", type=int, default=10, help="top_k's kept values on ImageNet-1K")
    parser.add_argument("--store", default=str(ROOT / "bench" / "out" / "store"), help="prepared dataset")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (on a busy 2-core machine 1 ran 3x faster than 2)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base = [f"ipc={args.ipc}", f"evaluate.epochs={args.epochs}", "relabel.mode=stored", *args.overrides]
    cfg = load_config(args.preset, base)
    if cfg.evaluate.recipe != "kd":
        raise SystemExit(f"{args.preset} does not evaluate with the KD recipe")
    store = Store(args.store)
    data = load(store, prepare(cfg.dataset, store, cfg.ipc)[0])
    started = time.perf_counter()
    teacher = train_teacher(data, cfg.teacher, cfg.model, cfg.dsa, cfg.seed).model.eval()
    method = get_method(cfg.method)
    inputs = DistillInputs(data, cfg.ipc, cfg.seed, cfg.distill, cfg.model, cfg.dsa, teacher=teacher)
    synthetic = method.distill(inputs, NoCheckpoints(), SILENT)
    factor = int(synthetic.stats.get("factor", 1))
    images = synthetic.images
    print(
        f"teacher and {cfg.method} set ({len(images)} images): {time.perf_counter() - started:.1f} s",
        file=sys.stderr,
        flush=True,
    )

    rows = []
    for name, overrides in schemes(args).items():
        started = time.perf_counter()
        scfg = load_config(args.preset, [*base, *overrides])
        r, kd = scfg.relabel, scfg.evaluate.kd
        recipe = kd_recipe(scfg, "distilled", factor)
        arrays = relabel.relabel(
            teacher,
            images,
            recipe.augment,
            scfg.evaluate.epochs,
            recipe.batch_size,
            kd.temperature,
            r.top_k,
            r.fp16,
            scfg.seed,
            quantize=r.quantize,
            stored_epochs=r.stored_epochs,
        )
        with tempfile.TemporaryDirectory() as work:
            artifacts.save_stored_labels(Path(work), arrays)
            on_disk = disk_bytes(Path(work) / artifacts.STORED_LABELS)
        stored = relabel.StoredLabels(arrays, data.num_classes, recipe.batch_size)
        results = [
            train_and_test_kd(
                "convnet", data, images, recipe, eval_seed(scfg, i), stored.plan, stored.targets, scfg.model
            )
            for i in range(args.seeds)
        ]
        runs = [result["accuracy"] for result in results]
        kept = r.top_k or data.num_classes
        rows.append(
            {
                "scheme": name,
                "overrides": overrides,
                "stored_epochs": int(arrays["order"].shape[0]),
                "kept": kept,
                "label_bytes": int(sum(a.nbytes for a in arrays.values())),
                "disk_bytes": int(on_disk),
                "image_bytes": int(images.numel()),
                **measure(arrays, kept),
                "accuracy": {
                    "mean": statistics.mean(runs),
                    "std": statistics.pstdev(runs),
                    "runs": runs,
                },
                "train_loss": [result["train_loss"] for result in results],
            }
        )
        print(f"{name}: {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)

    epochs = cfg.evaluate.epochs
    for row in rows:
        fraction = row["stored_epochs"] / epochs  # ImageNet stores the same fraction of its 300 epochs
        values = args.imagenet_top_k if row["kept"] < data.num_classes else 1000
        per_image = 300 * fraction * (row["row_bytes"] + values * row["value_bytes"])
        row["imagenet"] = {str(ipc): int(1000 * ipc * per_image) for ipc in (10, 50)}

    reference = rows[0]["label_bytes"]
    print(
        f"\n{cfg.dataset.name}, {cfg.method} IPC {cfg.ipc} ({len(images)} images, "
        f"{rows[0]['image_bytes']} B of pixels), {epochs} KD epochs, T={cfg.evaluate.kd.temperature:g};"
        f" ConvNet test accuracy (%), mean ± std over {args.seeds} students"
    )
    header = (
        f"{'scheme':<14} {'epochs':>6} {'kept':>4} {'labels':>10} {'vs fp32':>7} {'on disk':>10}"
        f" {'B/row':>6} {'B/value':>7} {'accuracy':>14} {'IN-1K ipc10':>12} {'IN-1K ipc50':>12}"
    )
    print(header)
    for row in rows:
        acc = row["accuracy"]
        print(
            f"{row['scheme']:<14} {row['stored_epochs']:>6} {row['kept']:>4}"
            f" {human_bytes(row['label_bytes']):>10} {reference / row['label_bytes']:>6.1f}x"
            f" {human_bytes(row['disk_bytes']):>10}"
            f" {row['row_bytes']:>6.2f} {row['value_bytes']:>7.2f} {acc['mean']:>7.2f} ± {acc['std']:<4.2f}"
            f" {human_bytes(row['imagenet']['10']):>12} {human_bytes(row['imagenet']['50']):>12}"
        )
    print(
        f"IN-1K: 1,000 classes x IPC images, 300 epochs ({args.stored_epochs * 300 // epochs} stored "
        f"where stored_epochs), all 1,000 values kept or top {args.imagenet_top_k}, from the measured "
        f"B/row (plan + scale) and B/value (index + value)."
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
