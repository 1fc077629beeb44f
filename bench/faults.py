"""Fault injection: damage each kind of artifact in every way, rerun, and show what the user sees.

    python bench/faults.py                       # tiny digits runs, 11 artifact kinds x 4 faults
    python bench/faults.py --json bench/results/faults.json

Intact runs fill one store per pipeline: digits-mtt; digits-pad (EL2N difficulty scores, experts
trained easy-to-hard, learned label logits); digits-rded with stored relabeling (the replayed KD
plans and labels); a one-cell comparison (DM, IPC 1) and its leaderboard record. Then, per artifact
kind (trajectories, synthetic images, soft labels, teacher weights, an artifact's meta.json, a
version record, an export shard, learned label logits, difficulty scores, stored relabel plans, a
leaderboard record) and per fault (delete a file, truncate it, flip bytes in place, delete the
commit marker), a copy of that store is damaged and the same command rerun, twice if the first rerun
failed. The table says what the user saw (the last line on stderr, or the note the run printed), the
exit codes, and whether the result (accuracy, learned lr, the exported images; a leaderboard's
cells) equals the intact run's. No row may read "exit 0" with "no".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import condense  # noqa: E402

TINY = [
    "dataset.train_per_class=20",
    "experts.num_experts=2",
    "experts.epochs=4",
    "distill.iterations=6",
    "distill.syn_steps=4",
    "distill.max_start_epoch=2",
    "evaluate.seeds=2",
    "evaluate.epochs=20",
    "evaluate.full_data_epochs=2",
]
PIPELINES = {
    "mtt": ("digits-mtt", TINY),
    "pad": (
        "digits-pad",
        [
            *TINY,
            "ipc=2",
            "distill.initial_max_start_epoch=0",
            "distill.window_growth_iterations=4",
            "experts.schedule.add_end_epoch=1",
            "experts.schedule.rm_epoch_first=2",
            "experts.schedule.rm_epoch_second=3",
        ],
    ),
    "rded": (
        "digits-rded",
        [
            "dataset.train_per_class=20",
            "teacher.epochs=6",
            "distill.candidates=10",
            "relabel.mode=stored",
            "evaluate.seeds=2",
            "evaluate.epochs=6",
            "evaluate.full_data_epochs=1",
        ],
    ),
}
"""Each pipeline: (preset, overrides)."""
COMPARISON = {
    "name": "faults",
    "presets": "digits-{method}",
    "methods": ["dm"],
    "ipc": [1],
    "models": ["convnet"],
    "dataset": {"source": "digits", "name": "digits", "train_per_class": 20},
    "evaluate": {"seeds": 2, "full_data_epochs": 1},
    "recipes": {"hard": {"epochs": 4}},
    "settings": {"dm": {"distill": {"iterations": 4, "checkpoint_every": 2}}},
}
"""The ``compare`` pipeline: ``condense compare`` on this comparison."""
KINDS = {
    "trajectories": ("mtt", "experts", "trajectories.zarr/c"),
    "synthetic images": ("mtt", "distill", "synthetic.zarr/images/c"),
    "soft labels": ("mtt", "soft_labels", "labels.zarr/probs/c"),
    "teacher weights": ("mtt", "teacher", "weights.pt"),
    "meta.json": ("mtt", "distill", "meta.json"),
    "version record": ("mtt", "versions", ""),
    "export shard": ("mtt", "export", "distilled-000000.tar"),
    "learned logits": ("pad", "distill", "synthetic.zarr/label_logits/c"),
    "difficulty scores": ("pad", "difficulty", "difficulty.zarr"),
    "relabel plans": ("rded", "relabel", "labels.zarr"),
    "leaderboard record": ("compare", "leaderboards", ""),
}
"""Each artifact kind: (pipeline, stage, the file or folder under its artifact a fault hits)."""
FAULTS = ("delete file", "truncate", "flip bytes", "delete marker")


def run(store: Path, env: dict[str, str], pipeline: str) -> tuple[int, str, dict[str, Any] | None]:
    cli = [sys.executable, "-m", "condense_flows.cli"]
    if pipeline == "compare":
        spec = store.parent / "comparison.json"  # YAML's subset: the CLI reads it as YAML
        spec.write_text(json.dumps(COMPARISON))
        cmd = [*cli, "compare", str(spec), "--store", str(store), "--json"]
    else:
        preset, overrides = PIPELINES[pipeline]
        cmd = [*cli, "run", preset, "--store", str(store), "--json"]
        for item in overrides:
            cmd += ["--set", item]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    notes = [line for line in proc.stderr.splitlines() if "damaged" in line or "error" in line]
    summary = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None
    return proc.returncode, (notes[-1].strip() if notes else "-"), summary


def target(store: Path, summary: dict[str, Any], kind: str) -> tuple[Path, Path]:
    """(the file a fault hits, the commit marker that vouches for it)."""
    _, stage, inner = KINDS[kind]
    if kind in ("version record", "leaderboard record"):
        record = next((store / stage).rglob("v0001.json"))
        return record, record  # a record is its own marker
    folder = store / stage / summary["keys"][stage]
    path = folder / inner
    if path.is_dir():
        path = sorted(p for p in path.rglob("*") if p.is_file())[0]
    return path, folder / "meta.json"


def damage(path: Path, marker: Path, fault: str) -> None:
    if fault == "delete file":
        path.unlink()
    elif fault == "truncate":
        path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])
    elif fault == "flip bytes":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        marker.unlink()


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two runs' results agree: accuracies, the learned lr, and the exported set's images,
    labels, soft labels and learned label logits; of two comparisons, every cell's result."""
    if "cells" in a:
        return [_cell(c) for c in a["cells"]] == [_cell(c) for c in b["cells"]]
    if any(a.get(k) != b.get(k) for k in ("accuracy", "baselines", "learned_lr")):
        return False
    x, y = (condense.load_distilled(s["artifacts"]["run_dir"]) for s in (a, b))
    tensors = [(x.images, y.images), (x.labels, y.labels), (x.soft, y.soft), (x.label_logits, y.label_logits)]
    return all(
        (p is None and q is None) or (p is not None and q is not None and bool((p == q).all()))
        for p, q in tensors
    )


def _cell(cell: dict[str, Any]) -> tuple[Any, ...]:
    return cell["method"], cell["ipc"], cell["status"], cell["distill_key"], cell["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument(
        "--kinds",
        nargs="+",
        choices=list(KINDS),
        default=list(KINDS),
        metavar="KIND",
        help="artifact kinds to damage (default: all); quote names with spaces",
    )
    args = parser.parse_args()
    kinds = {kind: KINDS[kind] for kind in args.kinds}
    work = Path(tempfile.mkdtemp(prefix="condense-faults-"))
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect")}
    intact: dict[str, dict[str, Any]] = {}
    for pipeline in dict.fromkeys(p for p, _, _ in kinds.values()):
        code, seen, summary = run(work / f"intact-{pipeline}", env, pipeline)
        assert code == 0 and summary is not None, f"the intact {pipeline} run failed: {seen}"
        intact[pipeline] = summary
    rows = []
    for kind, (pipeline, _, _) in kinds.items():
        for fault in FAULTS:
            store = work / f"{kind}-{fault}".replace(" ", "_")
            shutil.copytree(work / f"intact-{pipeline}", store)
            damage(*target(store, intact[pipeline], kind), fault)
            first, seen, summary = run(store, env, pipeline)
            codes = [first]
            if summary is None:  # the run stopped; the fault must not stay in the way
                second, _, summary = run(store, env, pipeline)
                codes.append(second)
            equal = "yes" if summary is not None and same(summary, intact[pipeline]) else "no"
            rows.append({"artifact": kind, "fault": fault, "user saw": seen, "exit": codes, "equal": equal})
            print(
                f"{kind:<17} {fault:<13} exit {'/'.join(map(str, codes)):<5} equal {equal:<3}  {seen}",
                flush=True,
            )
    bad = [r for r in rows if r["exit"][0] == 0 and r["equal"] == "no"]
    print(f"\n{len(rows)} cases, {len(bad)} with exit 0 and a different result")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
