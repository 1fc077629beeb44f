"""Memory flat in the dataset's size on the streamed path (issue 13), at test size: the dataset stage,
loading, one shuffled epoch and a random-real draw in a fresh process per (size, path); its peak
resident memory must stay within 10% from 1x to 4x the images when streamed, and grow by at least
the added images' float32 bytes in memory. ``bench/streaming.py`` is the full benchmark (100 classes
of 64 px, teacher training, RDED)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from condense.datasets.generate import write_shards
from tests.conftest import ROOT

CLASSES, PER_CLASS, SIDE = 10, 200, 32

CHILD = """
import json, sys
from pathlib import Path

import torch

from condense.config import DatasetConfig
from condense.evaluate import random_real_subset
from condense.prepare import load
from condense.stages.dataset import prepare
from condense.store import Store

shards, root, mode = sys.argv[1:4]
cfg = DatasetConfig(source="webdataset", path=shards, load=mode, workers=0, shuffle_buffer=256)
store = Store(root)
key, _ = prepare(cfg, store, ipc=5)
data = load(store, key, cfg)
seen = sum(len(y) for _, y in data.batches("train", 64, torch.Generator().manual_seed(0)))
drawn, _ = random_real_subset(data, 5, seed=0)
status = Path("/proc/self/status").read_text().splitlines()
peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
print(json.dumps({"seen": seen, "drawn": len(drawn), "peak": peak}))
"""


def _peak(shards: Path, store: Path, mode: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(shards), str(store), mode],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        # A fixed mmap threshold: glibc's moving one lets fragmentation move the high-water mark.
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(4 * 2**20)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_streamed_peak_memory_is_flat_in_the_dataset_size(tmp_path: Path) -> None:
    peaks: dict[tuple[str, int], int] = {}
    for size in (1, 4):
        shards = write_shards(tmp_path / f"x{size}", CLASSES, PER_CLASS * size, 5, SIDE, per_shard=500)
        for mode in ("memory", "stream"):
            out = _peak(shards, tmp_path / f"store-{mode}-{size}", mode)
            assert out["seen"] == CLASSES * PER_CLASS * size and out["drawn"] == CLASSES * 5
            peaks[mode, size] = out["peak"]
    added = CLASSES * PER_CLASS * 3 * 3 * SIDE * SIDE * 4  # the extra images as float32 inputs
    assert peaks["stream", 4] < 1.10 * peaks["stream", 1], peaks
    assert peaks["memory", 4] - peaks["memory", 1] > added, peaks
