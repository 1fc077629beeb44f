"""Host synchronisations per step of every hot loop: where the host waits for the device.

    python bench/host_syncs.py                      # on the CPU's checking device (no GPU needed)
    python bench/host_syncs.py --device cuda        # on a GPU: torch's own sync debug mode counts
    python bench/host_syncs.py --json bench/results/host-syncs.json

Each loop runs twice with a different length (epochs or iterations) on a small digits set; the
difference of the two counts over the difference of steps is the steady state per step, free of
set-up (initialisation, the test pass). A step is one optimiser step (one batch) of a training loop,
one outer iteration of a distillation; ``steps/log`` is how many steps one progress line covers.

``--device check`` counts on :mod:`condense.devicecheck`'s checking device, by kind: ``scalar``
(``.item()``, ``float()``), ``to_host``, ``to_device`` (blocking copies) and ``shape`` (outputs whose
size depends on the data). ``--device cuda`` counts what ``torch.cuda.set_sync_debug_mode`` reports
(one total: the kinds are not told apart). Goal: at most one per logged step.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from condense import devicecheck, relabel, teacher  # noqa: E402
from condense.artifacts import ExpertBuffer  # noqa: E402
from condense.config import (  # noqa: E402
    DatasetConfig,
    DSAConfig,
    ExpertsConfig,
    KDRecipeConfig,
    ModelConfig,
    TeacherConfig,
)
from condense.datasets.generate import write_shards  # noqa: E402
from condense.evaluate import KDRecipe, Recipe, train_and_test_kd, train_and_test_seeds  # noqa: E402
from condense.experts import train_expert  # noqa: E402
from condense.methods import get_method  # noqa: E402
from condense.methods.base import DistillInputs  # noqa: E402
from condense.prepare import load  # noqa: E402
from condense.progress import SILENT  # noqa: E402
from condense.stages.dataset import prepare  # noqa: E402
from condense.store import Store  # noqa: E402

MODEL = ModelConfig(width=8)
DSA = DSAConfig()
BATCH = 20
"""Batch of the training loops: 200 digits make 10 steps an epoch."""


class Memory:
    """Checkpoints kept in memory."""

    state: dict[str, Any] | None = None

    def load(self) -> dict[str, Any] | None:
        return self.state

    def save(self, state: dict[str, Any]) -> None:
        self.state = state


class Counting:
    """Counts host waits of a block on ``device``: the checking device's counts, or CUDA's sync
    debug mode (each synchronising call warns once)."""

    def __init__(self, device: str):
        self.device = device

    @contextlib.contextmanager
    def block(self) -> Iterator[dict[str, int]]:
        counts: dict[str, int] = {}
        if self.device == "check":
            with devicecheck.simulated() as syncs:
                yield counts
                counts.update(syncs.as_dict(), total=syncs.total)
            return
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield counts
                torch.cuda.synchronize()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts["total"] = sum("synchroniz" in str(w.message) for w in caught)

    @property
    def torch_device(self) -> torch.device:
        return devicecheck.DEVICE if self.device == "check" else torch.device(self.device)


Loop = Callable[[Any, int], None]
"""Run the loop ``length`` epochs or iterations long on the data of the given device."""


def per_step(
    counting: Counting, data: Any, loop: Loop, lengths: tuple[int, int], steps: int
) -> dict[str, Any]:
    """Steady-state waits per step: the count's growth from ``lengths[0]`` to ``lengths[1]``, over
    the ``steps`` that growth adds."""
    counts = []
    for length in lengths:
        with counting.block() as counted:
            loop(data.to(counting.torch_device), length)
        counts.append(counted)
    return {kind: round((counts[1][kind] - counts[0][kind]) / steps, 2) for kind in counts[0]}


def loops(data: Any, trained: torch.nn.Module, experts: ExpertBuffer, device: torch.device) -> dict[str, Any]:
    """name -> (loop, (short, long) lengths, steps the long one adds, steps per progress line)."""

    def expert(d: Any, epochs: int) -> None:
        train_expert(d, MODEL, ExpertsConfig(num_experts=1, epochs=epochs, batch_size=BATCH), DSA, seed=0)

    recipe = Recipe(epochs=1, lr=0.01, batch_size=BATCH, momentum=0.9, weight_decay=5e-4, dsa=DSA)
    x, y = data.train_x[::2], data.train_y[::2]  # 100 images: 5 steps an epoch

    def evaluation(norm: str, seeds: list[int]) -> Loop:
        def run(d: Any, epochs: int) -> None:
            r = Recipe(**{**recipe.__dict__, "epochs": epochs})
            xs, ys = [x.to(device)] * len(seeds), [y.to(device)] * len(seeds)
            train_and_test_seeds("convnet", d, xs, ys, r, seeds, ModelConfig(width=8, norm=norm))

        return run

    augment = relabel.KDAugment.from_config(KDRecipeConfig())

    def kd(d: Any, epochs: int) -> None:
        model, images = copy.deepcopy(trained).to(device), x.to(device)
        plans = relabel.online_plans(len(images), BATCH, augment, seed=0, fp16=True)
        targets = relabel.online_labels(model, 4.0, None, fp16=True)
        kd_recipe = KDRecipe(epochs, 1e-3, 0.01, 0.0, BATCH, 4.0, augment)
        train_and_test_kd("convnet", d, images, kd_recipe, 0, plans, targets, MODEL)

    def method(name: str, **settings: Any) -> Loop:
        def run(d: Any, iterations: int) -> None:
            m = get_method(name)
            cfg = m.config_cls(**{**settings, "iterations": iterations})
            needs = {"experts": experts if "experts" in m.needs else None}
            needs["teacher"] = copy.deepcopy(trained).to(device) if "teacher" in m.needs else None
            m.distill(DistillInputs(d, 1, 0, cfg, MODEL, DSA, **needs), Memory(), SILENT)

        return run

    trajectory = {"syn_steps": 10, "expert_epochs": 1, "max_start_epoch": 1, "checkpoint_every": 1000}
    return {
        "expert epoch": (expert, (1, 2), 10, 10),
        "evaluation, 2 stacked seeds": (evaluation("instancenorm", [0, 1]), (1, 2), 5, 5),
        "evaluation, one network": (evaluation("batchnorm", [0]), (1, 2), 5, 5),
        "KD recipe": (kd, (1, 2), 5, 5),
        "MTT iteration (unrolled)": (method("mtt", **trajectory), (1, 3), 2, 1),
        "MTT iteration (constant)": (method("mtt", **trajectory, memory="constant"), (1, 3), 2, 1),
        "DATM iteration": (method("datm", **trajectory, initial_max_start_epoch=1), (1, 3), 2, 1),
        "DM iteration": (method("dm", batch_real=8, checkpoint_every=1000), (1, 3), 2, 1),
        "DSA iteration": (method("dsa", batch_real=8, checkpoint_every=1000), (1, 3), 2, 1),
        "SRe2L recover step": (method("sre2l", min_teacher_accuracy=0, checkpoint_every=1000), (2, 4), 2, 1),
    }


def stream_epoch(shards: Path, root: Path) -> tuple[Any, Loop]:
    """A streamed split read epoch after epoch: the data path under every streamed loop."""
    cfg = DatasetConfig(source="webdataset", path=str(shards), load="stream", workers=0)
    store = Store(root)
    stream = load(store, prepare(cfg, store)[0], cfg)

    def run(d: Any, epochs: int) -> None:
        generator = torch.Generator().manual_seed(0)
        for _ in range(epochs):
            for inputs, labels in d.batches("train", BATCH, generator):
                (inputs.sum() + labels.sum()).detach()

    return stream, run


def measure(device: str) -> list[dict[str, Any]]:
    counting = Counting(device)
    root = Path(tempfile.mkdtemp(prefix="host-syncs-"))
    store = Store(root / "digits")
    data = load(store, prepare(DatasetConfig(train_per_class=20), store, 1)[0])
    trained = teacher.train_teacher(
        data, TeacherConfig(source="train", epochs=4, batch_size=64, dsa=False), MODEL, DSA, seed=0
    ).model
    cfg = ExpertsConfig(num_experts=1, epochs=2, batch_size=BATCH)
    experts = ExpertBuffer(np.stack([train_expert(data, MODEL, cfg, DSA, seed=s).params for s in range(2)]))
    rows = []
    for name, (loop, lengths, steps, per_log) in loops(data, trained, experts, counting.torch_device).items():
        try:
            counts = per_step(counting, data, loop, lengths, steps)
        except Exception as err:  # noqa: BLE001 - a loop that fails on the device is a result too
            counts = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:100]}"}
        rows.append({"loop": name, "steps/log": per_log, **counts})
    shards = write_shards(root / "shards", 4, 50, 10, 8, per_shard=50)
    stream, run = stream_epoch(shards, root / "stream")
    rows.append(
        {"loop": "stream epoch (per batch)", "steps/log": 1, **per_step(counting, stream, run, (1, 2), 10)}
    )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    kinds = [k for k in ("total", *devicecheck.SYNC_KINDS, "async_copies") if any(k in r for r in rows)]
    header = ["loop", "steps/log", *kinds]
    lines = [header]
    for row in rows:
        counts = [row["error"]] if "error" in row else [f"{row[k]:g}" for k in kinds]
        lines.append([row["loop"], str(row["steps/log"]), *counts])
    # An error runs on past the columns instead of widening them.
    widths = [max(len(line[i]) for line in lines if len(line) == len(header)) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=False)) for line in lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="check", help="check (the CPU's checking device) or cuda[:N]")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    if args.device != "check" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {args.device} needs CUDA, and this machine has none")
    rows = measure(args.device)
    print(f"host waits per step ({args.device}; goal: at most 1 per logged step)\n")
    print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": args.device, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
