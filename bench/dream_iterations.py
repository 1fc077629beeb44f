"""Iterations to accuracy: the same matching method with random vs. representative (DREAM) sampling.

For each sampler and distillation seed, one run to the largest iteration count keeps a snapshot of
the synthetic set at every milestone; each snapshot is evaluated by fresh ConvNets (the pipeline's
evaluation recipe). Prints a table and writes a PNG plot of accuracy vs. iterations.

    python bench/dream_iterations.py                      # digits, DSA gradient matching, IPC 10
    python bench/dream_iterations.py --ipc 1 --milestones 10,25,50,100,200,400
    python bench/dream_iterations.py --preset cifar10-dsa --set dataset.path=../shared/datasets/cifar10

Variants of one base method (``--preset``, e.g. DSA gradient matching), identical otherwise:
- ``random``: random real batches and random real initialisation (the method as its paper runs it);
- ``representative``: DREAM's sampler alone (k-means representatives, re-clustered every interval);
- ``dream``: the sampler plus k-means initialisation, i.e. DREAM.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from condense.configure import load_config
from condense.evaluate import train_and_test
from condense.methods import get_method
from condense.methods.base import DistillInputs
from condense.prepare import load
from condense.progress import SILENT
from condense.stages.dataset import prepare
from condense.stages.evaluate import recipe
from condense.store import Store

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "random": ["distill.sampler=random", "distill.init=real"],
    "representative": ["distill.sampler=representative", "distill.init=real"],
    "dream": ["distill.sampler=representative", "distill.init=kmeans"],
}


class Snapshots:
    """A Checkpoints stand-in that keeps the images at every save instead of resuming."""

    def __init__(self) -> None:
        self.images: dict[int, torch.Tensor] = {}

    def load(self) -> None:
        return None

    def save(self, state: dict[str, Any]) -> None:
        self.images[state["iteration"]] = state["images"].clone()


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    milestones = sorted(int(m) for m in args.milestones.split(","))
    step = milestones[0]
    if any(m % step for m in milestones):
        raise SystemExit("milestones must be multiples of the first one")
    rows = []
    for variant, variant_overrides in VARIANTS.items():
        for seed in range(args.seeds):
            cfg = load_config(
                args.preset,
                [
                    f"ipc={args.ipc}",
                    f"seed={seed}",
                    *variant_overrides,
                    f"distill.iterations={milestones[-1]}",
                    f"distill.checkpoint_every={step}",
                    *args.overrides,
                ],
            )
            store = Store(args.store)
            data = load(store, prepare(cfg.dataset, store, cfg.ipc)[0])
            method = get_method(cfg.method)
            snapshots = Snapshots()
            started = time.perf_counter()
            result = method.distill(
                DistillInputs(data, cfg.ipc, seed, cfg.distill, cfg.model, cfg.dsa), snapshots, SILENT
            )
            seconds = time.perf_counter() - started
            snapshots.images[milestones[-1]] = result.images
            evaluation = recipe(cfg, "distilled", None)
            for iteration in milestones:
                images = snapshots.images[iteration]
                accs = [
                    train_and_test("convnet", data, images, result.labels, evaluation, 1000 + k, cfg.model)
                    for k in range(args.eval_runs)
                ]
                accuracy = statistics.mean(a["accuracy"] for a in accs)
                rows.append({"variant": variant, "seed": seed, "iteration": iteration, "accuracy": accuracy})
            print(
                f"{variant:<15} seed {seed}: {seconds:6.1f} s distillation, stats {result.stats}, "
                f"final {rows[-1]['accuracy']:.2f}%",
                flush=True,
            )
    return rows


def table(rows: list[dict[str, Any]]) -> dict[str, dict[int, tuple[float, float]]]:
    curves: dict[str, dict[int, tuple[float, float]]] = {}
    for variant in VARIANTS:
        for iteration in sorted({r["iteration"] for r in rows}):
            accs = [r["accuracy"] for r in rows if r["variant"] == variant and r["iteration"] == iteration]
            std = statistics.pstdev(accs) if len(accs) > 1 else 0.0
            curves.setdefault(variant, {})[iteration] = (statistics.mean(accs), std)
    return curves


def iterations_to_reach(curve: dict[int, tuple[float, float]], target: float) -> int | None:
    return next((it for it, (mean, _) in sorted(curve.items()) if mean >= target), None)


def plot(curves: dict[str, dict[int, tuple[float, float]]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for variant, curve in curves.items():
        its = sorted(curve)
        means = [curve[i][0] for i in its]
        stds = [curve[i][1] for i in its]
        ax.errorbar(its, means, yerr=stds, marker="o", capsize=3, label=variant)
    ax.set_xscale("log")
    ax.set_xlabel("distillation iterations")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--preset", default="digits-dsa")
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--milestones", default="10,20,50,100,200")
    parser.add_argument("--seeds", type=int, default=3, help="distillation seeds per sampler")
    parser.add_argument("--eval-runs", type=int, default=1, help="fresh networks per snapshot and seed")
    parser.add_argument("--store", default=str(ROOT / "bench" / "out" / "store"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--plot", default=None, help="PNG path (default bench/out/<preset>-ipc<N>.png)")
    args = parser.parse_args()

    curves = table(run(args))
    title = f"{args.preset} ipc {args.ipc} ({' '.join(args.overrides) or 'preset settings'})"
    print(f"\n{title}: test accuracy (%), mean ± std over {args.seeds} distillation seeds")
    print(f"{'iterations':>10}" + "".join(f"{v:>18}" for v in VARIANTS))
    for it in sorted(curves["random"]):
        cells = [f"{curves[v][it][0]:>11.2f} ± {curves[v][it][1]:<4.2f}" for v in VARIANTS]
        print(f"{it:>10}" + "".join(cells))
    final_it = max(curves["random"])
    target = curves["random"][final_it][0]
    print(f"\nrandom sampling's final accuracy: {target:.2f}% at {final_it} iterations")
    for variant in list(VARIANTS)[1:]:
        reached = iterations_to_reach(curves[variant], target)
        ratio = f"{reached / final_it:.2f} of the iterations" if reached else "not reached"
        print(f"{variant:<15} reaches it at {reached} iterations ({ratio})")
    path = Path(args.plot or ROOT / "bench" / "out" / f"{args.preset}-ipc{args.ipc}.png")
    plot(curves, title, path)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
