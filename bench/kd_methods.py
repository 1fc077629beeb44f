"""The KD-evaluated methods (RDED, SRe2L, CDA, CUDD) vs. random real images on CIFAR-10, with stage
timings and the size of stored (FKD-style) labels next to the images; plus MTT under its own recipe.

    python bench/kd_methods.py --data ../shared/datasets/cifar10 [--methods rded] [--ipc 1 10 50] [--mtt]
    python bench/kd_methods.py --methods rded sre2l cda cudd --ipc 10

Each (method, IPC) is one run of the real pipeline (``condense run cifar10-<method>``) into
``bench/out/store``, with ``relabel.mode=stored`` so the distilled set's labels are precomputed and
their bytes reported (the students replay them exactly; the baselines run the same teacher online,
same recipe). The presets share one teacher and one KD recipe, so the teacher, the full-data
baseline and the random-real baseline of each IPC are computed once (cached). IPC 50 trains
``--epochs50`` epochs instead of 300 to fit a CPU. ``--mtt`` adds the ``cifar10-mtt`` preset's row
(IPC 1, its own SGD + DSA hard-label recipe, 200 images per class). Recovery methods also print
their recovery diagnostics (teacher accuracy on the synthetic images, final BN loss, curricula).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from condense.report import human_bytes  # noqa: E402


def run(preset: str, store: str, overrides: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "condense_flows.cli", "run", preset, "--store", store, "--json", "-q"]
    for item in overrides:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit(proc.returncode)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cell(entry: dict[str, float] | None) -> str:
    return f"{entry['mean']:6.2f} ± {entry['std']:4.2f}" if entry else f"{'-':>13}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "cifar10"))
    parser.add_argument("--store", default=str(ROOT / "bench" / "out" / "store"))
    parser.add_argument("--methods", nargs="+", default=["rded"], choices=["rded", "sre2l", "cda", "cudd"])
    parser.add_argument("--ipc", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--epochs50", type=int, default=100, help="KD epochs at IPC >= 50 (CPU budget)")
    parser.add_argument("--mtt", action="store_true", help="add the cifar10-mtt preset's row (IPC 1)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    args = parser.parse_args()

    rows = []
    for ipc in args.ipc:
        for method in args.methods:
            extra = [f"dataset.path={args.data}", f"ipc={ipc}", "relabel.mode=stored", *args.overrides]
            if ipc >= 50:
                extra.append(f"evaluate.epochs={args.epochs50}")
            summary = run(f"cifar10-{method}", args.store, extra)
            rows.append((method, summary))
            print(f"{method} ipc {ipc} done in {summary['seconds']:.0f} s", file=sys.stderr, flush=True)
    if args.mtt:
        rows.append(("mtt", run("cifar10-mtt", args.store, [f"dataset.path={args.data}"])))

    print("\nCIFAR-10, ConvNet-3 test accuracy (%), mean ± std over fresh students (final epoch)")
    print(
        f"{'method':<6} {'ipc':>4} {'recipe':<7} {'distilled':>13} {'random_real':>13} {'full_data':>13}"
        " teacher"
    )
    for method, s in rows:
        base = s["baselines_by_arch"]["convnet"]
        cells = [s["accuracy"]["convnet"], base.get("random_real"), base.get("full_data")]
        teacher = s["teacher"]["test_accuracy"]
        print(
            f"{method:<6} {s['ipc']:>4} {s['evaluation_recipe']:<7} {' '.join(map(cell, cells))}"
            f" {teacher:6.2f}%"
        )

    names = list(dict.fromkeys(name for _, s in rows for name in s["stages"]))
    print("\nseconds per stage (c: cached, the time of the lookup)")
    print(f"{'method':<6} {'ipc':>4} " + " ".join(f"{n:>12}" for n in names) + f" {'total':>8}")
    for method, s in rows:
        stages = [s["stages"].get(n) for n in names]
        cells = [
            f"{'-':>12}" if t is None else f"{t['seconds']:>11.1f}{'c' if t['cached'] else ' '}"
            for t in stages
        ]
        print(f"{method:<6} {s['ipc']:>4} " + " ".join(cells) + f" {s['seconds']:>8.1f}")

    recovered = [(m, s) for m, s in rows if "final_bn_loss" in s["distill_stats"]]
    if recovered:
        print("\nrecovery: teacher accuracy on the synthetic images, final BN-statistics loss and CE")
        for method, s in recovered:
            st = s["distill_stats"]
            line = f"{method:<6} {s['ipc']:>4} {st['teacher_synthetic_accuracy']:6.2f}%"
            line += f" bn {st['final_bn_loss']:8.4f} ce {st['final_ce']:.4f}"
            for record in st.get("curricula", []):
                student = record.get("student_accuracy")
                line += f" | c{record['curriculum']} init {record['init']}"
                line += f" student {student:.2f}%" if student is not None else ""
            print(line)
        print("\nloss and crop-scale curves of the first batch (step: ce / bn / crop min scale)")
        for method, s in recovered:
            history = json.loads((Path(s["artifacts"]["synthetic"]).parent / "history.json").read_text())
            first = [h for h in history if h["batch"] == 0]
            points = [
                first[min(len(first) - 1, round(f * (len(first) - 1)))] for f in (0, 0.25, 0.5, 0.75, 1)
            ]
            cells = [f"{h['it']}: {h['ce']:.2f} / {h['bn']:.2f} / {h['crop_min_scale']:.2f}" for h in points]
            print(f"{method:<6} {s['ipc']:>4}  " + "  ".join(cells))

    print("\nstored labels (per epoch: crop box, flip, CutMix box and partner, teacher top-k probabilities)")
    print(f"{'ipc':>4} {'epochs':>6} {'top_k':>5} {'labels':>10} {'on disk':>10} {'images':>10} {'ratio':>7}")
    for _, s in rows:
        labels = s["labels"]
        if "label_bytes" not in labels:
            continue
        sizes = [human_bytes(labels[k]) for k in ("label_bytes", "label_disk_bytes", "image_bytes")]
        ratio = labels["label_bytes"] / labels["image_bytes"]
        top_k = labels["top_k"] or "all"
        print(
            f"{s['ipc']:>4} {labels['epochs']:>6} {top_k!s:>5} "
            + " ".join(f"{x:>10}" for x in sizes)
            + f" {ratio:6.1f}x"
        )


if __name__ == "__main__":
    main()
