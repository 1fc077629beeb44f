"""Time to accuracy on a device: CIFAR-10 IPC 10 with MTT (or DATM), stage by stage, end to end.

    python bench/gpu.py                                   # CIFAR-10 shards, the device `auto` picks
    python bench/gpu.py --method datm                     # DATM's preset at the same budget
    python bench/gpu.py --experts 20 --expert-epochs 30 --iterations 2000 --seeds 5 --eval-epochs 1000
    python bench/gpu.py --smoke                           # digits, a tiny budget: the CPU / CI check

The shards are read from ``--data``, by default ``data/cifar10`` in this checkout (where a copy
travels to a device machine: ``mkdir -p data/cifar10 && cp -r ../shared/datasets/cifar10/*
data/cifar10/``), else ``../shared/datasets/cifar10`` beside it. The default budget (all 50,000
training images, 4 experts x 12 epochs, 200 iterations of 30 steps, 3 evaluation seeds x 300 epochs)
is meant to take about 3 minutes on one H200, well inside one 10-minute command.

Runs the pipeline's stages directly (no Prefect; the same executor the flow uses) into a fresh
store and prints, per stage: wall seconds, images/s (experts), seconds per iteration (distill),
seconds per evaluation run, peak device memory; then the accuracy (ConvNet, final epoch, mean ±
std over seeds) and the total wall time. As a table, and as JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from condense.configure import load_config  # noqa: E402
from condense.progress import SILENT, Progress  # noqa: E402
from condense.report import human_bytes  # noqa: E402
from condense.stages import dataset_job, execute, make_plan  # noqa: E402
from condense.store import Store  # noqa: E402
from condense.summary import build_summary, new_run_id  # noqa: E402

DATA = (ROOT / "data" / "cifar10", ROOT.parent / "shared" / "datasets" / "cifar10")
"""Where the CIFAR-10 shards are looked for, in order: a copy inside the checkout, the shared one."""


def cifar10_shards(given: str | None) -> str:
    """``--data``, else the first of :data:`DATA` that holds training shards; one clear line if none does."""
    if given is not None:
        return given
    for path in DATA:
        if any(path.glob("train-*.tar*")):
            return str(path)
    raise SystemExit(
        f"error: no CIFAR-10 shards in {DATA[0]} nor in {DATA[1]}: copy them into the first "
        "(mkdir -p data/cifar10 && cp -r ../shared/datasets/cifar10/* data/cifar10/) or pass --data"
    )


def window(method: str, max_start: int, iterations: int) -> list[str]:
    """DATM's start window: grown from half the largest start epoch to all of it over the first half
    of the iterations (its preset's window is sized for the preset's experts). MTT's is fixed."""
    if method != "datm":
        return []
    return [
        f"distill.initial_max_start_epoch={max_start // 2}",
        f"distill.window_growth_iterations={max(1, iterations // 2)}",
    ]


def budget(args: argparse.Namespace) -> tuple[str, list[str]]:
    """(preset, overrides) of the run: ``args.method``'s preset at the smoke or the CIFAR-10 budget."""
    if args.smoke:
        return f"digits-{args.method}", [
            "dataset.train_per_class=20",
            "experts.num_experts=2",
            "experts.epochs=3",
            "distill.iterations=5",
            "distill.syn_steps=4",
            "distill.max_start_epoch=1",
            *window(args.method, 1, 5),
            "evaluate.seeds=2",
            "evaluate.epochs=5",
            "evaluate.full_data_epochs=1",
            f"compute.device={args.device}",
        ]
    # CIFAR-10 IPC 10 (MTT's IPC 10 settings: syn_steps 30, max_start_epoch 20, lr_init 0.001).
    max_start = min(20, args.expert_epochs - 2)
    return f"cifar10-{args.method}", [
        f"dataset.path={cifar10_shards(args.data)}",
        "dataset.train_per_class=null",
        "ipc=10",
        f"experts.num_experts={args.experts}",
        f"experts.epochs={args.expert_epochs}",
        "experts.batch_size=256",
        f"distill.iterations={args.iterations}",
        f"distill.syn_steps={args.syn_steps}",
        f"distill.max_start_epoch={max_start}",
        *window(args.method, max_start, args.iterations),
        "distill.lr_lr=1e-5",
        "distill.lr_init=0.001",
        f"distill.checkpoint_every={max(1, args.iterations // 5)}",
        f"evaluate.seeds={args.seeds}",
        f"evaluate.epochs={args.eval_epochs}",
        "evaluate.full_data_epochs=2",
        f"compute.device={args.device}",
        # Quoted: YAML 1.1 reads a bare on/off as a boolean.
        f"compute.compile='{args.compile}'",
    ]


def stage_rows(
    summary: dict[str, Any], outcomes: list[dict[str, Any]], cfg: Any, train_count: int
) -> list[dict]:
    rows = []
    for name, stage in summary["stages"].items():
        row: dict[str, Any] = {
            "stage": name,
            "seconds": stage["seconds"],
            "device": ",".join(stage["devices"]),
        }
        if name == "experts":
            row["images/s"] = round(
                cfg.experts.num_experts * cfg.experts.epochs * train_count / stage["seconds"]
            )
        if name == "distill":
            row["s/iteration"] = round(stage["seconds"] / cfg.distill.iterations, 4)
        if name == "evaluate":
            runs = [o for o in outcomes if o["stage"] == "evaluate" and o["params"]["subject"] == "distilled"]
            per_run = sum(o["seconds"] for o in runs) / sum(len(o["params"]["indices"]) for o in runs)
            row["s/eval run (distilled)"] = round(per_run, 3)
        if "peak_memory_bytes" in stage:
            row["peak memory"] = human_bytes(stage["peak_memory_bytes"])
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", help="CIFAR-10 shards (default: data/cifar10, else ../shared/datasets/cifar10)"
    )
    parser.add_argument("--method", default="mtt", choices=["mtt", "datm"], help="the preset's method")
    parser.add_argument("--smoke", action="store_true", help="digits at a tiny budget (CPU, seconds)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--expert-epochs", type=int, default=12)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--syn-steps", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--eval-epochs", type=int, default=300)
    parser.add_argument("--store", help="a store to use (default: a fresh temporary one)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args()

    preset, overrides = budget(args)
    cfg = load_config(preset, overrides)
    store = Store(args.store or tempfile.mkdtemp(prefix="condense-gpu-bench-"))
    progress = SILENT if args.quiet else Progress("bench")
    started = time.time()
    dataset = execute(dataset_job(), cfg, store, progress)
    plan = make_plan(cfg, store, dataset["key"])
    outcomes = [dataset, *(execute(job, cfg, store, progress) for job in plan.jobs)]
    summary = build_summary(cfg, store, plan, outcomes, new_run_id(), time.time() - started)
    train_count = store.meta("dataset", dataset["key"])["card"]["train_count"]
    rows = stage_rows(summary, outcomes, cfg, train_count)

    columns = [
        "stage",
        "seconds",
        "device",
        "images/s",
        "s/iteration",
        "s/eval run (distilled)",
        "peak memory",
    ]
    columns = [c for c in columns if any(c in row for row in rows)]
    widths = {c: max(len(c), *(len(str(row.get(c, "-"))) for row in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row.get(c, "-")).ljust(widths[c]) for c in columns))
    accuracy = summary["accuracy"]["convnet"]
    print(
        f"\n{summary['dataset']} ipc {cfg.ipc} {cfg.method}: {accuracy['mean']:.2f} ± {accuracy['std']:.2f} "
        f"(ConvNet, {cfg.evaluate.seeds} seeds, final epoch); random real "
        f"{summary['baselines']['random_real']['mean']:.2f}; {summary['seconds']:.1f} s end to end"
    )
    for name, device in summary["devices"].items():
        print(f"device {name}: {device}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        result = {
            "preset": preset,
            "method": cfg.method,
            "config": overrides,
            "stages": rows,
            "accuracy": accuracy,
            "seconds": summary["seconds"],
        }
        args.json.write_text(json.dumps({**result, "devices": summary["devices"]}, indent=2))


if __name__ == "__main__":
    main()
