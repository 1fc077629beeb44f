"""The expert step compiled vs eager: first-epoch time (compilation and warm-up) apart from the
steady-state throughput of later epochs.

    python bench/compile_speed.py                          # CUDA: 50,000 images, batch 256, 3 epochs
    python bench/compile_speed.py --json bench/out/compile-speed.json
    python bench/compile_speed.py --device cpu --images 600 --width 16 --epochs 2   # a tiny CPU run

Each mode (``compute.compile`` off, then on) runs in a fresh process, so that neither inherits the
other's warm caches (cuDNN's autotuner, dynamo's compiled code): a ConvNet (CIFAR size, 3x32x32, 10
classes, ``--width``) trained as an expert is, with :func:`condense.experts.expert_optimizer` (plain
SGD) and :func:`condense.training.train_epoch` (DSA on every batch unless ``--no-dsa``; the forward
pass through :class:`condense.devices.Compiled` when compiled), on random CIFAR-shaped data already
on the device (no dataset on disk). ``--images`` is not a multiple of the batch by default, as in
CIFAR-10 (50,000 / 256): the last, smaller batch must not compile a second graph.

Per mode: the first epoch's seconds (compile + warm-up when compiled), the steady-state images/s over
the later epochs, and whether compilation fell back to eager (then the "compiled" numbers are eager
ones and the run exits 1). Then the speedups, compiled over eager: steady state and first epoch.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("eager", "compiled")


def child(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train ``args.epochs`` epochs in ``mode`` in this (fresh) process; returns its row."""
    import torch

    from condense import devices
    from condense.config import DSAConfig, ExpertsConfig, ModelConfig
    from condense.experts import expert_optimizer
    from condense.models import CONVNET, build_model
    from condense.training import train_epoch

    device = devices.resolve(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.images, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.images,), device=device)
    model = build_model(CONVNET, 3, 10, 32, ModelConfig(width=args.width), seed=0).to(device)
    cfg = ExpertsConfig(batch_size=args.batch)
    forward = devices.Compiled(model, mode == "compiled", device)
    optimizer, forward, loss_fn = expert_optimizer(model, cfg, forward)
    generator = torch.Generator().manual_seed(0)
    augment = DSAConfig() if args.dsa else None
    seconds, losses = [], []
    # The pipeline's switches for a CUDA job (TF32, cuDNN's autotuner), as an expert job runs under.
    with devices.configured(device, deterministic=False):
        for _ in range(args.epochs):
            started = time.perf_counter()
            losses.append(
                train_epoch(model, x, y, loss_fn, optimizer, args.batch, generator, augment, forward)
            )
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds.append(time.perf_counter() - started)
    steady = seconds[1:]
    return {
        "mode": mode,
        "device": str(device),
        "first_epoch_s": round(seconds[0], 3),
        "steady_images_per_s": round(args.images * len(steady) / sum(steady)),
        "epoch_seconds": [round(s, 3) for s in seconds],
        "final_loss": round(float(losses[-1]), 4),
        "fell_back": devices.compile_failure() if mode == "compiled" else None,
    }


def run_mode(mode: str, argv: list[str]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", mode, *argv], capture_output=True, text=True, cwd=ROOT
    )
    if proc.returncode != 0:
        raise SystemExit(f"the {mode} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict[str, Any]]) -> str:
    columns = ["mode", "device", "first epoch s", "steady images/s", "final loss", "fell back"]
    cells = [
        [
            r["mode"],
            r["device"],
            f"{r['first_epoch_s']:.2f}",
            str(r["steady_images_per_s"]),
            f"{r['final_loss']:.4f}",
            r["fell_back"] or "-",
        ]
        for r in rows
    ]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in [columns, *cells]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--images", type=int, default=50_000, help="random images per epoch")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3, help="the first is warm-up; at least 2")
    parser.add_argument("--width", type=int, default=128, help="ConvNet width (128: the experts')")
    parser.add_argument("--no-dsa", dest="dsa", action="store_false", help="time the network alone")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first is compilation and warm-up")
    if args.child:
        print(json.dumps(child(args.child, args)))
        return

    argv = [
        *("--device", args.device, "--images", str(args.images), "--batch", str(args.batch)),
        *("--epochs", str(args.epochs), "--width", str(args.width)),
        *([] if args.dsa else ["--no-dsa"]),
    ]
    rows = [run_mode(mode, argv) for mode in MODES]
    eager, compiled = rows
    speedup = {
        "steady": round(compiled["steady_images_per_s"] / eager["steady_images_per_s"], 2),
        "first_epoch": round(eager["first_epoch_s"] / compiled["first_epoch_s"], 2),
    }
    print(
        f"expert step, ConvNet width {args.width}, batch {args.batch}, {args.images} images/epoch, "
        f"{args.epochs} epochs, DSA {'on' if args.dsa else 'off'}\n"
    )
    print(table(rows))
    print(
        f"\ncompiled / eager: {speedup['steady']:.2f}x steady-state images/s; "
        f"first epoch {speedup['first_epoch']:.2f}x (below 1: compilation costs more than it saves there)"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: v for k, v in vars(args).items() if k not in ("json", "child")}
        args.json.write_text(json.dumps({"settings": settings, "rows": rows, "speedup": speedup}, indent=2))
    if compiled["fell_back"]:
        raise SystemExit(f"compilation fell back to eager: {compiled['fell_back']}")


if __name__ == "__main__":
    main()
