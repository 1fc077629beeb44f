"""MTT vs FTD vs DATM vs PAD on one budget: accuracy, and what each piece measurably did.

    python bench/trajectory_methods.py                        # digits, IPC 10 (CPU, ~10 minutes)
    python bench/trajectory_methods.py --dataset cifar10 --ipc 1
    python bench/trajectory_methods.py --dataset cifar10 --ipc 10 --methods datm,pad --set budget=paper

Each row is the method's preset (``<dataset>-<method>``) at the given IPC (with the preset's budget
``ipc<N>`` when it has one, e.g. DATM's IPC 1 window), run through the pipeline's
stages directly (no Prefect) in one store, so rows share what they can (the dataset; DATM and PAD
share nothing else: PAD's experts train on ordered data). The presets of one dataset have the same
budget (experts, iterations, unrolled steps, evaluation). Accuracy is the final epoch, mean ± std
over the evaluation seeds; the random-real baseline gets the same labels regime as the distilled set
(hard for MTT/FTD, the experts' logits for DATM/PAD). Also printed: the start epochs drawn in the
first and last tenth of the run (DATM's window moving), how far the learned label logits moved, how
far FTD's average trails the raw images, the share of parameters matched (PAD), skipped iterations.
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

from condense import artifacts  # noqa: E402
from condense.configure import load_config  # noqa: E402
from condense.progress import SILENT, Progress  # noqa: E402
from condense.stages import dataset_job, execute, make_plan  # noqa: E402
from condense.store import Store  # noqa: E402
from condense.summary import build_summary, new_run_id  # noqa: E402


def run_row(preset: str, overrides: list[str], store: Store, progress: Any) -> dict[str, Any]:
    cfg = load_config(preset, overrides)
    started = time.time()
    dataset = execute(dataset_job(), cfg, store, progress)
    plan = make_plan(cfg, store, dataset["key"])
    outcomes = [dataset, *(execute(job, cfg, store, progress) for job in plan.jobs)]
    summary = build_summary(cfg, store, plan, outcomes, new_run_id(), time.time() - started)
    synthetic = artifacts.load_synthetic(store, plan.keys["distill"])
    starts = [h["start_epoch"] for h in synthetic.history]
    tenth = max(1, len(starts) // 10)
    stats = store.meta("distill", plan.keys["distill"]).get("stats", {})
    total = artifacts.load_buffer(store, plan.keys["experts"]).num_params
    return {
        "method": cfg.method,
        "ipc": cfg.ipc,
        "labels": cfg.evaluate.labels,
        "distilled": summary["accuracy"]["convnet"],
        "random_real": summary["baselines"]["random_real"],
        "full_data": summary["baselines"]["full_data"],
        "distill_seconds": summary["stages"]["distill"]["seconds"],
        "experts_seconds": summary["stages"]["experts"]["seconds"],
        "start_epochs_first_tenth": [min(starts[:tenth]), max(starts[:tenth])],
        "start_epochs_last_tenth": [min(starts[-tenth:]), max(starts[-tenth:])],
        "label_logits_moved": stats.get("label_logits_moved"),
        "ema_gap": stats.get("ema_gap"),
        "matched_share": stats.get("matched_parameters", total) / total,
        "skipped_iterations": stats.get("skipped_iterations", 0),
        "iterations": cfg.distill.iterations,
    }


def fmt(acc: dict[str, Any]) -> str:
    return f"{acc['mean']:.2f} ± {acc['std']:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="digits", choices=["digits", "cifar10"])
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--methods", default="mtt,ftd,datm,pad")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override every row")
    parser.add_argument("--store", help="a store to use (default: a fresh temporary one)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args()

    store = Store(args.store or tempfile.mkdtemp(prefix="condense-trajectory-bench-"))
    progress = SILENT if args.quiet else Progress("bench")
    rows = []
    for method in args.methods.split(","):
        preset = f"{args.dataset}-{method}"
        # The IPC picks the CPU budget's row for it (e.g. DATM's window at IPC 1).
        rows.append(run_row(preset, [f"ipc={args.ipc}", *args.set], store, progress))
        row = rows[-1]
        print(
            f"{row['method']:5} {fmt(row['distilled'])} vs random real {fmt(row['random_real'])}",
            file=sys.stderr,
        )

    table = []
    for r in rows:
        first, last = r["start_epochs_first_tenth"], r["start_epochs_last_tenth"]
        table.append(
            {
                "method": r["method"],
                "labels": r["labels"],
                "distilled": fmt(r["distilled"]),
                "random real": fmt(r["random_real"]),
                "full data": fmt(r["full_data"]),
                "distill s": f"{r['distill_seconds']:.1f}",
                "start epochs first/last tenth": f"{first[0]}..{first[1]} / {last[0]}..{last[1]}",
                "labels moved": "-" if r["label_logits_moved"] is None else f"{r['label_logits_moved']:.3f}",
                "ema gap": "-" if r["ema_gap"] is None else f"{r['ema_gap']:.3f}",
                "matched": f"{r['matched_share']:.0%}",
                "skipped": f"{r['skipped_iterations']}/{r['iterations']}",
            }
        )
    print(f"\n{args.dataset} IPC {args.ipc}, ConvNet, final epoch, mean ± std over seeds\n")
    widths = {c: max(len(c), *(len(row[c]) for row in table)) for c in table[0]}
    print("  ".join(c.ljust(w) for c, w in widths.items()))
    for row in table:
        print("  ".join(row[c].ljust(w) for c, w in widths.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"dataset": args.dataset, "ipc": args.ipc, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
