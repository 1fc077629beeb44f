"""Distillation methods side by side on one budget: accuracy, and what each piece measurably did.

    python bench/method_table.py                                   # digits, IPC 10, MTT FTD DATM PAD
    python bench/method_table.py --dataset cifar10 --ipc 1
    python bench/method_table.py --ipc 1 --methods dd,ratbptt,atbptt,ast,datadam,mtt,datm,dm
    python bench/method_table.py --dataset cifar10 --ipc 10 --methods datm,pad --set budget=paper
    python bench/method_table.py --ipc 10 --methods mtt,datm --pdd 2,5     # PDD over each, P = 2 and 5
    python bench/method_table.py --ipc 10 --methods rded,sre2l,cda,infer --teachers 1,3  # INFER, M teachers
    python bench/method_table.py --ipc 1 --methods mtt,datm --mdt 0.3    # masked distillation training

Each row is the method's preset (``<dataset>-<method>``) at the given IPC (with the preset's budget
``ipc<N>`` row when it has one, e.g. DATM's IPC 1 window), run through the pipeline's stages
directly (no Prefect) in one store, so rows share what they can (the dataset, experts of the same
recipe). The presets of one dataset have one CPU budget per family (experts, iterations, unrolled
steps) and one evaluation. Accuracy is the final epoch, mean ± std over the evaluation seeds; the
random-real baseline gets the same labels regime as the distilled set (hard, or the experts' logits
for learned labels). "What it did" is read from the set's history and statistics: the start epochs
drawn in the first and last tenth of the run (DATM's window moving), how far learned label logits
moved, FTD's average's gap, PAD's matched share and skipped iterations; DD's learned step sizes;
RaT-BPTT's and AT-BPTT's window positions and lengths early and late (AT-BPTT's stage); the matching
loss at the start and the end (DM, DataDAM).

``--pdd P1,P2`` adds, after each method PDD wraps, PDD over it with P stages at the same total IPC,
from the base's own preset (its budget a stage, its experts shared), evaluated both ways: ``staged``
(PDD's own: stage 1, then 1 + 2, ..., carrying the momentum) and the base's recipe on the whole set.
Its seconds are the stages' and the regenerated experts' jobs together. ``--teachers M1,M2`` runs
INFER with M self-trained teachers (the preset's, plus M - 1 ConvNets of other seeds: ``teacher.ensemble``)
instead of its preset's. "stored" is what a set costs to keep (INFER: real images as exported plus
float32 compensators) and how many images a student trains on. "ECE / T / MTS": the distilled set's
expected calibration error (%) as trained, after temperature scaling and after masked temperature
scaling, both fitted on the held-out calibration split; ``--mdt T`` adds, after each method that has
it, the same method with masked distillation training at mask ratio T (``distill.mask_ratio``).
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
from condense.methods import get_method, pdd  # noqa: E402
from condense.progress import SILENT, Progress  # noqa: E402
from condense.stages import dataset_job, execute, make_plan  # noqa: E402
from condense.store import Store  # noqa: E402
from condense.summary import build_summary, new_run_id  # noqa: E402


def tenths(values: list[Any]) -> tuple[list[Any], list[Any]]:
    """The first and the last tenth of a run's per-iteration values."""
    tenth = max(1, len(values) // 10)
    return values[:tenth], values[-tenth:]


def what_it_did(history: list[dict[str, Any]], stats: dict[str, Any], params: int | None) -> str:
    """One line on the pieces of a method at work, from its set's history and statistics."""
    parts = []
    if history and "start_epoch" in history[0]:
        first, last = tenths([h["start_epoch"] for h in history])
        parts.append(f"start epochs {min(first)}..{max(first)} -> {min(last)}..{max(last)}")
    if history and "window_start" in history[0]:
        first, last = tenths([(h["window_start"], h["window"]) for h in history])
        early = f"{min(s for s, _ in first)}..{max(s + w for s, w in first)}"
        late = f"{min(s for s, _ in last)}..{max(s + w for s, w in last)}"
        parts.append(f"windows {early} -> {late} (mean length {stats.get('mean_window', 0):.0f})")
        if "stage" in history[-1]:
            parts.append(f"stage {history[0]['stage']} -> {history[-1]['stage']}")
    if "step_size_mean" in stats:
        low, high, mean = stats["step_size_min"], stats["step_size_max"], stats["step_size_mean"]
        parts.append(f"{stats['steps']:.0f} learned step sizes {low:.3g}..{high:.3g} (mean {mean:.3g})")
    if stats.get("stages"):
        parts.append(f"stages of {stats['stages']} images/class, step sizes {stats['stage_lrs']}")
    if stats.get("label_logits_moved") is not None:
        parts.append(f"labels moved {stats['label_logits_moved']:.3f}")
    if stats.get("ema_gap") is not None:
        parts.append(f"ema gap {stats['ema_gap']:.3f}")
    if params and "matched_parameters" in stats:
        parts.append(f"matched {stats['matched_parameters'] / params:.0%}")
    if stats.get("skipped_iterations"):
        parts.append(f"skipped {stats['skipped_iterations']}/{len(history)}")
    if history and "loss" in history[0] and "start_epoch" not in history[0]:
        first, last = tenths([h["loss"] for h in history])
        parts.append(f"loss {sum(first) / len(first):.3g} -> {sum(last) / len(last):.3g}")
    return "; ".join(parts) or "-"


def stored_seconds(store: Store, plan: Any, stages: tuple[str, ...]) -> float:
    """What computing the stages' artifacts took when they were made (their parts' jobs included),
    so that a row whose set was cached by an earlier row still shows its cost."""
    total = 0.0
    for stage, key in plan.artifacts():
        if stage in stages:
            meta = store.meta(stage, key)
            total += meta["seconds"] + sum(part["seconds"] for part in meta.get("parts", []))
    return total


def calibration(store: Store, plan: Any) -> dict[str, float | None]:
    """The distilled set's mean ECE over its evaluation runs: plain, after temperature scaling, after
    masked temperature scaling (None where a run has none)."""
    runs = [
        run
        for key in plan.keys["evaluate"]
        if (meta := store.meta("evaluate", key))["subject"] == "distilled"
        for run in meta["runs"]
    ]
    out: dict[str, float | None] = {}
    for name in ("ece", "ece_scaled", "ece_masked"):
        values = [run.get(name) for run in runs]
        out[name] = None if None in values else round(sum(values) / len(values), 2)
    return out


def run_row(
    preset: str, overrides: list[str], store: Store, progress: Any, label: str = ""
) -> dict[str, Any]:
    cfg = load_config(preset, overrides)
    started = time.time()
    dataset = execute(dataset_job(), cfg, store, progress)
    plan = make_plan(cfg, store, dataset["key"])
    outcomes = [dataset, *(execute(job, cfg, store, progress) for job in plan.jobs)]
    summary = build_summary(cfg, store, plan, outcomes, new_run_id(), time.time() - started)
    synthetic = artifacts.load_synthetic(store, plan.keys["distill"])
    stats = dict(store.meta("distill", plan.keys["distill"]).get("stats", {}))
    if synthetic.stages is not None:
        stats["stages"] = list(synthetic.stages.ipc)
        stats["stage_lrs"] = ", ".join(f"{lr:.3g}" for lr in synthetic.stages.lrs)
    seconds = stored_seconds(store, plan, ("distill", "progressive"))
    experts = "experts" in get_method(cfg.method).needs
    params = artifacts.load_buffer(store, plan.keys["experts"]).num_params if experts else None
    return {
        "method": label or cfg.method,
        "evaluation": summary["evaluation_recipe"],
        "ipc": cfg.ipc,
        "labels": cfg.evaluate.labels,
        "distilled": summary["accuracy"]["convnet"],
        "random_real": summary["baselines"]["random_real"],
        "full_data": summary["baselines"]["full_data"],
        "distill_seconds": seconds,
        "experts_seconds": stored_seconds(store, plan, ("experts",)) if experts else None,
        "what_it_did": what_it_did(synthetic.history, stats, params),
        "iterations": getattr(cfg.distill, "iterations", None),
        "storage": summary["storage"],
        "calibration": calibration(store, plan),
    }


def write_rows(path: Path, dataset: str, ipc: int, overrides: list[str], rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({"dataset": dataset, "ipc": ipc, "overrides": overrides, "rows": rows}, indent=2)
    )


def stored(storage: dict[str, Any]) -> str:
    """Bytes kept (images; INFER's compensators) and the images a student trains on."""
    return f"{storage['image_bytes'] / 1024:.1f} KiB, trains on {storage['training_images']}"


def fmt(acc: dict[str, Any]) -> str:
    return f"{acc['mean']:.2f} ± {acc['std']:.2f}"


def table_text(dataset: str, ipc: int, rows: list[dict[str, Any]]) -> str:
    """The rows as the table this bench prints (and `bench/results/*.txt` keep)."""
    table = [
        {
            "method": r["method"],
            "evaluation": r.get("evaluation", "mtt"),
            "labels": r["labels"],
            "distilled": fmt(r["distilled"]),
            "random real": fmt(r["random_real"]),
            "full data": fmt(r["full_data"]),
            "distill s": f"{r['distill_seconds']:.1f}",
            "experts s": "-" if r["experts_seconds"] is None else f"{r['experts_seconds']:.1f}",
            "stored": stored(r["storage"]),
            "ECE / T / MTS": " / ".join("-" if v is None else f"{v:.2f}" for v in r["calibration"].values()),
            "what it did": r["what_it_did"],
        }
        for r in rows
    ]
    lines = [f"{dataset} IPC {ipc}, ConvNet, final epoch, mean ± std over seeds", ""]
    widths = {c: max(len(c), *(len(row[c]) for row in table)) for c in table[0]}
    lines.append("  ".join(c.ljust(w) for c, w in widths.items()))
    for row in table:
        lines.append("  ".join(row[c].ljust(w) for c, w in widths.items()))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="digits", choices=["digits", "cifar10"])
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--methods", default="mtt,ftd,datm,pad")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override every row")
    parser.add_argument(
        "--pdd", default="", metavar="P1,P2", help="add PDD over each method it wraps, P stages"
    )
    parser.add_argument(
        "--pdd-set", action="append", default=[], metavar="KEY=VALUE", help="override PDD rows"
    )
    parser.add_argument("--teachers", default="", metavar="M1,M2", help="INFER with M teachers instead")
    parser.add_argument("--mdt", default="", metavar="T1,T2", help="add MDT rows at these mask ratios")
    parser.add_argument("--store", help="a store to use (default: a fresh temporary one)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args()

    store = Store(args.store or tempfile.mkdtemp(prefix="condense-method-bench-"))
    progress = SILENT if args.quiet else Progress("bench")
    rows = []
    for method in args.methods.split(","):
        preset = f"{args.dataset}-{method}"
        # The IPC picks the CPU budget's row for it (e.g. DATM's window at IPC 1).
        common = [f"ipc={args.ipc}", *args.set]
        runs = [(method, common)]
        if args.mdt and "mask_ratio" in type(load_config(preset, common).distill).model_fields:
            runs += [
                (f"{method} MDT t={t}", [*common, f"distill.mask_ratio={t}"]) for t in args.mdt.split(",")
            ]
        if method == "infer" and args.teachers:
            runs = [
                (f"infer M={m}", [*common, f"teacher.ensemble={json.dumps(['convnet'] * (m - 1))}"])
                for m in (int(t) for t in args.teachers.split(","))
            ]
        for stages in [int(p) for p in args.pdd.split(",") if p] if method in pdd.BASES else []:
            wrapped = [
                *common,
                "method=pdd",
                f"distill.base={method}",
                f"distill.stages={stages}",
                *args.pdd_set,
            ]
            for recipe in ("staged", "mtt"):
                runs.append((f"pdd({method}) P={stages}", [*wrapped, f"evaluate.recipe={recipe}"]))
        for label, overrides in runs:
            row = run_row(preset, overrides, store, progress, label)
            rows.append(row)
            print(
                f"{row['method']:8} {fmt(row['distilled'])} vs random real {fmt(row['random_real'])}",
                file=sys.stderr,
            )
            # Written after every row, so a long table stopped part-way keeps the rows it has.
            if args.json:
                write_rows(args.json, args.dataset, args.ipc, args.set, rows)

    print("\n" + table_text(args.dataset, args.ipc, rows))


if __name__ == "__main__":
    main()
