"""What each stage leaves in the store, and how to read it back: one place per format.

Readers import little on purpose. The code version of a stage covers every ``condense`` module it
imports (:mod:`condense.codeversion`), so the evaluation stage, which reads teachers and synthetic
sets, must not import the code that trains them: an edit to teacher training changes the teacher's
key, and through it the keys of the evaluations that use a teacher, never the full-data baselines
that do not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from condense import devices, models
from condense.config import ModelConfig
from condense.store import Store, load_arrays, read_json, save_arrays, write_json
from condense.synthetic import Stages, StepSchedule, SyntheticSet

BUFFER = "trajectories.zarr"
TEACHER_WEIGHTS = "weights.pt"
SYNTHETIC = "synthetic.zarr"
HISTORY = "history.json"
SOFT_LABELS = "labels.zarr"
STORED_LABELS = "labels.zarr"


# ----------------------------------------------------------------------------- experts


class ExpertBuffer:
    """Read access to stored trajectories, an (experts, snapshots, parameters) array.

    Backed by zarr chunked per snapshot, so drawing ``(expert, epoch)`` reads one vector, never the
    whole buffer (paper-scale buffers are gigabytes).
    """

    def __init__(self, params: np.ndarray | torch.Tensor | object):
        self._params = params
        self.num_experts, self.num_snapshots, self.num_params = params.shape  # type: ignore[attr-defined]

    @property
    def nbytes(self) -> int:
        return self.num_experts * self.num_snapshots * self.num_params * 4

    def snapshot(self, expert: int, epoch: int) -> torch.Tensor:
        """One snapshot's parameters: a view on the device when resident, else read from the store."""
        if isinstance(self._params, torch.Tensor):
            return self._params[expert, epoch]
        return torch.from_numpy(np.asarray(self._params[expert, epoch]))  # type: ignore[index]

    def resident(self, device: torch.device, budget_bytes: int) -> ExpertBuffer:
        """The whole buffer read once onto ``device`` when it fits in ``budget_bytes``, so that every
        iteration slices it there (no store read, no copy); else this buffer, read per draw."""
        if self.nbytes > budget_bytes or isinstance(self._params, torch.Tensor):
            return self
        return ExpertBuffer(devices.upload(torch.from_numpy(np.asarray(self._params[:])), device))  # type: ignore[index]


def create_buffer(path: Path, experts: int, snapshots: int, params: int) -> None:
    """The (experts, snapshots, parameters) trajectory array, chunked per snapshot under the "/"
    chunk key encoding, so expert ``i``'s chunks live under ``c/<i>/`` (see :func:`expert_chunks`)."""
    zarr.create_array(
        str(path),
        shape=(experts, snapshots, params),
        chunks=(1, 1, params),
        dtype="float32",
        chunk_key_encoding={"name": "default", "separator": "/"},
        zarr_format=3,
    )


def expert_chunks(index: int) -> str:
    """Where expert ``index``'s trajectory lives in the buffer (relative to the artifact)."""
    return f"{BUFFER}/c/{index}"


def load_buffer(store: Store, key: str, stage: str = "experts") -> ExpertBuffer:
    """The trajectories of the experts stage's artifact ``key`` (or of another stage that writes a
    buffer: PDD's regenerated experts)."""
    return ExpertBuffer(zarr.open_array(str(store.path(stage, key) / BUFFER), mode="r", zarr_format=3))


# ----------------------------------------------------------------------------- teacher


class Ensemble(torch.nn.Module):
    """Teachers of different architectures as one teacher: the mean of their logits (``teacher.ensemble``).
    Whatever runs a teacher (labels, KD, recovery) runs this; INFER also reaches its ``members``."""

    def __init__(self, members: list[torch.nn.Module]):
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(x) for member in self.members]).mean(0)


def teacher_members(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The networks of a teacher: an ensemble's members, else the teacher itself."""
    return list(model.members) if isinstance(model, Ensemble) else [model]


def save_teacher(work: Path, model: torch.nn.Module) -> None:
    torch.save({name: t.detach().cpu() for name, t in model.state_dict().items()}, work / TEACHER_WEIGHTS)


def teacher_description(arch: str, model_cfg: ModelConfig, card: dict[str, Any]) -> dict[str, Any]:
    """What rebuilds the teacher's network: stored in its meta, so a reader needs no teacher code."""
    return {
        "arch": arch,
        "model": model_cfg.model_dump(),
        "channels": card["channels"],
        "num_classes": len(card["classes"]),
        "resolution": card["resolution"],
    }


def ensemble_description(members: list[dict[str, Any]]) -> dict[str, Any]:
    """What rebuilds an :class:`Ensemble`: its members' descriptions (:func:`teacher_description`)."""
    return {"members": members}


def teacher_network(net: dict[str, Any]) -> torch.nn.Module:
    """The untrained network a teacher description (:func:`teacher_description`, or an ensemble's)
    describes."""
    if "members" in net:
        return Ensemble([teacher_network(member) for member in net["members"]])
    return models.build_model(
        net["arch"], net["channels"], net["num_classes"], net["resolution"], ModelConfig(**net["model"])
    )


def load_teacher(store: Store, key: str) -> torch.nn.Module:
    """The stored teacher (or ensemble of teachers) in eval mode, rebuilt from its meta's description."""
    model = teacher_network(store.meta("teacher", key)["network"])
    weights = torch.load(store.path("teacher", key) / TEACHER_WEIGHTS, map_location="cpu", weights_only=True)
    model.load_state_dict(weights)
    return model.eval()


# ----------------------------------------------------------------------------- synthetic set


SCHEDULE_ARRAYS = ("schedule_indices", "schedule_step_sizes", "schedule_init_seeds")
"""Where a set's :class:`StepSchedule` is stored (DD's; a set stored without them has none)."""
STAGE_ARRAYS = ("stage_ipc", "stage_lr")
"""Where a set's :class:`Stages` are stored (PDD's; a set stored without them has none)."""
SYNTHETIC_ARRAYS = ("images", "labels", "pixels", "label_logits", *SCHEDULE_ARRAYS, *STAGE_ARRAYS)


def _schedule_arrays(schedule: StepSchedule | None) -> dict[str, torch.Tensor]:
    if schedule is None:
        return {}
    indices, step_sizes, init_seeds = SCHEDULE_ARRAYS
    arrays = {indices: schedule.indices, step_sizes: schedule.step_sizes}
    if schedule.init_seeds is not None:
        arrays[init_seeds] = schedule.init_seeds
    return arrays


def _schedule(arrays: dict[str, np.ndarray]) -> StepSchedule | None:
    indices, step_sizes, init_seeds = SCHEDULE_ARRAYS
    if indices not in arrays:
        return None
    seeds = arrays.get(init_seeds)
    return StepSchedule(
        torch.from_numpy(arrays[indices]).long(),
        torch.from_numpy(arrays[step_sizes]),
        None if seeds is None else torch.from_numpy(seeds).long(),
    )


def _stage_arrays(stages: Stages | None) -> dict[str, torch.Tensor]:
    if stages is None:
        return {}
    ipc, lrs = STAGE_ARRAYS
    return {
        ipc: torch.tensor(stages.ipc, dtype=torch.int64),
        lrs: torch.tensor(stages.lrs, dtype=torch.float64),
    }


def stages_of(arrays: dict[str, np.ndarray]) -> Stages | None:
    """The :class:`Stages` stored among a set's arrays (:func:`load_synthetic_arrays`); None: none."""
    ipc, lrs = STAGE_ARRAYS
    if ipc not in arrays:
        return None
    return Stages(tuple(arrays[ipc].tolist()), tuple(arrays[lrs].tolist()))


def save_synthetic(work: Path, result: SyntheticSet, pixels: torch.Tensor) -> None:
    arrays = {"images": result.images, "labels": result.labels, "pixels": pixels}
    if result.label_logits is not None:
        arrays["label_logits"] = result.label_logits
    clash = set(result.arrays) & set(SYNTHETIC_ARRAYS)
    if clash:
        raise ValueError(f"a method's own arrays may not be named {sorted(clash)}")
    arrays.update(result.arrays)
    arrays.update(_schedule_arrays(result.schedule))
    arrays.update(_stage_arrays(result.stages))
    save_arrays(work / SYNTHETIC, {name: t.detach().cpu().numpy() for name, t in arrays.items()})
    write_json(work / HISTORY, result.history)


def load_synthetic(store: Store, key: str, stage: str = "distill") -> SyntheticSet:
    """The set of the distill stage's artifact ``key`` (or of another stage that writes one: PDD's
    stages)."""
    folder = store.path(stage, key)
    arrays = load_arrays(folder / SYNTHETIC)
    return SyntheticSet(
        images=torch.from_numpy(arrays["images"]),
        labels=torch.from_numpy(arrays["labels"]).long(),
        label_logits=torch.from_numpy(arrays["label_logits"]) if "label_logits" in arrays else None,
        lr=store.meta(stage, key)["lr"],
        history=read_json(folder / HISTORY),
        arrays={k: torch.from_numpy(a) for k, a in arrays.items() if k not in SYNTHETIC_ARRAYS},
        schedule=_schedule(arrays),
        stages=stages_of(arrays),
    )


def load_synthetic_arrays(store: Store, key: str) -> dict[str, np.ndarray]:
    """images (network inputs), labels, pixels (viewable [0, 1]), for methods that learn them
    label_logits, a learned step schedule (:data:`SCHEDULE_ARRAYS`), stages (:data:`STAGE_ARRAYS`) and
    any arrays of the method's own (:attr:`SyntheticSet.arrays`), as numpy arrays."""
    return load_arrays(store.path("distill", key) / SYNTHETIC)


def stitch_factor(store: Store, distill_key: str) -> int:
    """Patches per side of a stitched set (RDED's factor; 1 for every other method)."""
    return int(store.meta("distill", distill_key).get("stats", {}).get("factor", 1))


# ----------------------------------------------------------------------------- labels


def save_soft_labels(work: Path, probs: torch.Tensor) -> None:
    save_arrays(work / SOFT_LABELS, {"probs": probs.detach().cpu().numpy()})


def load_soft_labels(store: Store, key: str) -> torch.Tensor:
    return torch.from_numpy(load_arrays(store.path("soft_labels", key) / SOFT_LABELS)["probs"])


def save_stored_labels(work: Path, arrays: dict[str, np.ndarray]) -> None:
    """Relabeling's per-epoch plans and top-k probabilities, chunked per epoch (one read per epoch)."""
    save_arrays(work / STORED_LABELS, arrays, chunks={n: (1, *a.shape[1:]) for n, a in arrays.items()})


def load_stored_labels(store: Store, key: str) -> dict[str, zarr.Array]:
    """Relabeling's columns, opened lazily (``relabel.StoredLabels`` reads one epoch at a time)."""
    group = zarr.open_group(str(store.path("relabel", key) / STORED_LABELS), mode="r", zarr_format=3)
    return {name: group[name] for name in group.array_keys()}
