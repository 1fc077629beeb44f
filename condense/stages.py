"""Each pipeline stage as (key, compute, store): plain functions, no Prefect.

A stage's key hashes its config, the source of the code it runs and its inputs' keys, so a rerun
finds finished work by key and redoes only what changed. ``tasks/`` wraps these as Prefect tasks;
a notebook can call them directly.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import torch
import zarr

from condense import augment, evaluate, experts, export, labels, models, prepare, training
from condense.config import PipelineConfig
from condense.errors import CondenseError
from condense.evaluate import Recipe
from condense.methods import base as method_base
from condense.methods import get_method
from condense.methods.base import DistillInputs, SyntheticSet
from condense.progress import SILENT, Progress
from condense.store import Store, code_version, load_arrays, read_json, save_arrays, stage_key, write_json

EXPERTS, DISTILL, SOFT_LABELS, EVALUATE = "experts", "distill", "soft_labels", "evaluate"
TRAINING_CODE = (models, augment, training)


# ----------------------------------------------------------------------------- experts


def experts_key(cfg: PipelineConfig, dataset_key: str) -> str:
    config = {"experts": cfg.experts.model_dump(), "model": cfg.model.model_dump(), "seed": cfg.seed}
    if cfg.experts.dsa:
        config["dsa"] = cfg.dsa.model_dump()
    return stage_key(EXPERTS, config, code_version(*TRAINING_CODE, experts), {"dataset": dataset_key})


def _buffer_path(work: Path) -> Path:
    return work / "trajectories.zarr"


def open_experts(store: Store, key: str, cfg: PipelineConfig, dataset_key: str) -> None:
    """Create the (experts, snapshots, parameters) array that expert tasks fill, chunked per snapshot."""
    if store.has(EXPERTS, key):
        return
    path = _buffer_path(store.partial(EXPERTS, key))
    if path.exists():
        return
    card = store.meta(prepare.STAGE, dataset_key)["card"]
    model = models.ConvNet(card["channels"], len(card["classes"]), card["resolution"], cfg.model)
    shape = (cfg.experts.num_experts, cfg.experts.epochs + 1, models.FlatParams(model).numel)
    tmp = path.with_name(f".{uuid.uuid4().hex}.tmp")
    zarr.create_array(str(tmp), shape=shape, chunks=(1, 1, shape[2]), dtype="float32")
    try:
        os.rename(tmp, path)
    except OSError:  # another run created it first
        shutil.rmtree(tmp, ignore_errors=True)


def record_expert(
    store: Store, key: str, cfg: PipelineConfig, dataset_key: str, index: int, progress: Progress = SILENT
) -> dict[str, Any]:
    """Train expert ``index`` (unless already recorded) and write its trajectory into the buffer."""
    if store.has(EXPERTS, key):
        return store.meta(EXPERTS, key)["experts"][index]
    work = store.partial(EXPERTS, key)
    done = work / f"expert-{index:04d}.json"
    if done.exists():
        return read_json(done)
    data = prepare.load(store, dataset_key)
    started = time.perf_counter()
    trajectory = experts.train_expert(
        data,
        cfg.model,
        cfg.experts,
        cfg.dsa,
        experts.expert_seed(cfg.seed, index),
        on_epoch=lambda e, loss: progress.step(e, cfg.experts.epochs, f"expert {index} loss {loss:.4f}"),
    )
    zarr.open_array(str(_buffer_path(work)), mode="r+")[index] = trajectory.params
    record = {
        "index": index,
        "train_loss": trajectory.train_loss,
        "train_accuracy": trajectory.train_accuracy,
        "test_accuracy": trajectory.test_accuracy,
        "seconds": time.perf_counter() - started,
    }
    write_json(done, record)
    progress.note(
        f"expert {index}: train {trajectory.train_accuracy:.1f}% test {trajectory.test_accuracy:.1f}%"
    )
    return record


def finish_experts(store: Store, key: str, records: list[dict[str, Any]]) -> None:
    """Seal the buffer once every expert is recorded; the teacher is the best fit to the train set."""
    if store.has(EXPERTS, key):
        return
    work = store.partial(EXPERTS, key)
    missing = [r["index"] for r in records if not (work / f"expert-{r['index']:04d}.json").exists()]
    if missing:
        raise CondenseError(f"experts {missing} were not recorded")
    for path in work.glob("expert-*.json"):
        path.unlink()
    teacher = max(records, key=lambda r: r["train_accuracy"])["index"]
    store.commit(EXPERTS, key, work, {"experts": records, "teacher": teacher})


def load_buffer(store: Store, key: str) -> experts.ExpertBuffer:
    return experts.ExpertBuffer(zarr.open_array(str(_buffer_path(store.path(EXPERTS, key))), mode="r"))


# ----------------------------------------------------------------------------- distill


def distill_key(cfg: PipelineConfig, dataset_key: str, experts_key_: str | None) -> str:
    method = get_method(cfg.method)
    config = {
        "method": cfg.method,
        "distill": cfg.distill.model_dump(),
        "ipc": cfg.ipc,
        "seed": cfg.seed,
        "model": cfg.model.model_dump(),
        "dsa": cfg.dsa.model_dump(),
    }
    inputs = {"dataset": dataset_key}
    if experts_key_ is not None:
        inputs["experts"] = experts_key_
    return stage_key(DISTILL, config, code_version(*TRAINING_CODE, method_base, *method.modules), inputs)


class TorchCheckpoints:
    """Resumable state as one file written atomically (temporary name, then rename)."""

    def __init__(self, path: Path):
        self.path = path

    def load(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        return torch.load(self.path, weights_only=True)

    def save(self, state: dict[str, Any]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)


def run_distill(
    store: Store,
    key: str,
    cfg: PipelineConfig,
    dataset_key: str,
    experts_key_: str | None,
    progress: Progress = SILENT,
) -> dict[str, Any]:
    """Optimise the synthetic set (resuming from a checkpoint if a previous run was killed)."""
    if store.has(DISTILL, key):
        return store.meta(DISTILL, key)
    method = get_method(cfg.method)
    data = prepare.load(store, dataset_key)
    work = store.partial(DISTILL, key)
    started = time.perf_counter()
    result = method.distill(
        DistillInputs(
            data=data,
            ipc=cfg.ipc,
            seed=cfg.seed,
            method_cfg=cfg.distill,
            model_cfg=cfg.model,
            dsa_cfg=cfg.dsa,
            experts=load_buffer(store, experts_key_) if experts_key_ else None,
        ),
        TorchCheckpoints(work / "checkpoint.pt"),
        progress,
    )
    save_arrays(
        work / "synthetic.zarr",
        {
            "images": result.images.numpy(),
            "labels": result.labels.numpy(),
            "pixels": data.to_pixels(result.images).numpy(),
        },
    )
    write_json(work / "history.json", result.history)
    (work / "checkpoint.pt").unlink(missing_ok=True)
    meta = {
        "lr": result.lr,
        "method": cfg.method,
        "ipc": cfg.ipc,
        "seconds": time.perf_counter() - started,
        "stats": result.stats,
    }
    store.commit(DISTILL, key, work, meta)
    return store.meta(DISTILL, key)


def load_synthetic(store: Store, key: str) -> SyntheticSet:
    arrays = load_arrays(store.path(DISTILL, key) / "synthetic.zarr", ["images", "labels"])
    return SyntheticSet(
        images=torch.from_numpy(arrays["images"]),
        labels=torch.from_numpy(arrays["labels"]).long(),
        lr=store.meta(DISTILL, key)["lr"],
        history=read_json(store.path(DISTILL, key) / "history.json"),
    )


# ----------------------------------------------------------------------------- soft labels


def soft_labels_key(cfg: PipelineConfig, distill_key_: str, experts_key_: str) -> str:
    return stage_key(
        SOFT_LABELS,
        cfg.soft_labels.model_dump(),
        code_version(models, labels),
        {"distill": distill_key_, "experts": experts_key_},
    )


def _teacher(store: Store, experts_key_: str, dataset_key: str, cfg: PipelineConfig) -> torch.nn.Module:
    data_card = store.meta(prepare.STAGE, dataset_key)["card"]
    meta = store.meta(EXPERTS, experts_key_)
    model = models.ConvNet(
        data_card["channels"], len(data_card["classes"]), data_card["resolution"], cfg.model
    )
    final = load_buffer(store, experts_key_).snapshot(meta["teacher"], cfg.experts.epochs)
    return models.FlatParams(model).load_into(final)


def run_soft_labels(
    store: Store, key: str, cfg: PipelineConfig, dataset_key: str, distill_key_: str, experts_key_: str
) -> dict[str, Any]:
    if store.has(SOFT_LABELS, key):
        return store.meta(SOFT_LABELS, key)
    teacher = _teacher(store, experts_key_, dataset_key, cfg)
    synthetic = load_synthetic(store, distill_key_)
    probs = labels.soft_labels(teacher, synthetic.images, cfg.soft_labels.temperature)
    agreement = float((probs.argmax(1) == synthetic.labels).float().mean() * 100)
    with store.writing(SOFT_LABELS, key) as tmp:
        save_arrays(tmp / "labels.zarr", {"probs": probs.numpy()})
        meta = {
            "teacher_expert": store.meta(EXPERTS, experts_key_)["teacher"],
            "teacher_agreement": agreement,
        }
        store.commit(SOFT_LABELS, key, tmp, meta)
    return store.meta(SOFT_LABELS, key)


def load_soft_labels(store: Store, key: str) -> torch.Tensor:
    return torch.from_numpy(load_arrays(store.path(SOFT_LABELS, key) / "labels.zarr")["probs"])


# ----------------------------------------------------------------------------- evaluate

SUBJECTS = ("distilled", "random_real", "full_data")


def eval_seed(cfg: PipelineConfig, index: int) -> int:
    return cfg.seed * 1000 + 500 + index


def _recipe_fields(cfg: PipelineConfig, subject: str) -> dict[str, Any]:
    """The evaluation recipe of ``subject``; ``lr`` may still be ``"learned"``."""
    ev = cfg.evaluate
    soft = ev.labels == "soft" and subject != "full_data"
    return {
        "epochs": ev.full_data_epochs if subject == "full_data" else ev.epochs,
        "lr": ev.lr if subject == "distilled" else ev.baseline_lr,
        "batch_size": ev.batch_size,
        "momentum": ev.momentum,
        "weight_decay": ev.weight_decay,
        "dsa": cfg.dsa if ev.dsa else None,
        "temperature": cfg.soft_labels.temperature if soft else None,
    }


def recipe(cfg: PipelineConfig, subject: str, learned_lr: float | None) -> Recipe:
    """The recipe with its learning rate resolved (a method without a learned lr gets ``baseline_lr``)."""
    fields = _recipe_fields(cfg, subject)
    if fields["lr"] == "learned":
        fields["lr"] = learned_lr if learned_lr is not None else cfg.evaluate.baseline_lr
    return Recipe(**fields)


def evaluation_key(cfg: PipelineConfig, subject: str, arch: str, index: int, inputs: dict[str, str]) -> str:
    fields = _recipe_fields(cfg, subject)
    fields["dsa"] = fields["dsa"].model_dump() if fields["dsa"] else None
    config = {
        "subject": subject,
        "arch": arch,
        "seed": eval_seed(cfg, index),
        "recipe": fields,
        "model": cfg.model.model_dump() if arch == models.CONVNET else None,
        "ipc": cfg.ipc if subject == "random_real" else None,
    }
    return stage_key(EVALUATE, config, code_version(*TRAINING_CODE, evaluate, labels), inputs)


def evaluation_inputs(
    cfg: PipelineConfig, subject: str, dataset_key: str, distill_key_: str, labels_key: str, experts_key_: str
) -> dict[str, str]:
    """What an evaluation run depends on: full data only on the dataset (cached per dataset)."""
    inputs = {"dataset": dataset_key}
    soft = cfg.evaluate.labels == "soft"
    if subject == "distilled":
        inputs["distill"] = distill_key_
        if soft:
            inputs["soft_labels"] = labels_key
    elif subject == "random_real" and soft:
        inputs["teacher"] = experts_key_
    return inputs


def run_evaluation(
    store: Store,
    key: str,
    cfg: PipelineConfig,
    subject: str,
    arch: str,
    index: int,
    keys: dict[str, str],
    progress: Progress = SILENT,
) -> dict[str, Any]:
    """One fresh network trained on ``subject`` and tested on the real test split."""
    if store.has(EVALUATE, key):
        return store.meta(EVALUATE, key)
    data = prepare.load(store, keys["dataset"])
    seed = eval_seed(cfg, index)
    learned_lr = None
    if subject == "distilled":
        synthetic = load_synthetic(store, keys["distill"])
        x, targets, learned_lr = synthetic.images, synthetic.labels, synthetic.lr
        if cfg.evaluate.labels == "soft":
            targets = load_soft_labels(store, keys["soft_labels"])
    elif subject == "random_real":
        x, targets = evaluate.random_real_subset(data, cfg.ipc, seed)
        if cfg.evaluate.labels == "soft":
            targets = labels.soft_labels(
                _teacher(store, keys["experts"], keys["dataset"], cfg), x, cfg.soft_labels.temperature
            )
    else:
        x, targets = data.train_x, data.train_y
    result = evaluate.train_and_test(
        arch, data, x, targets, recipe(cfg, subject, learned_lr), seed, cfg.model, progress
    )
    with store.writing(EVALUATE, key) as tmp:
        store.commit(EVALUATE, key, tmp, {"subject": subject, "arch": arch, "index": index, **result})
    return store.meta(EVALUATE, key)


# ----------------------------------------------------------------------------- export

EXPORT = "export"


def export_key(distill_key_: str, labels_key: str, evaluation_keys: list[str]) -> str:
    inputs = {
        "distill": distill_key_,
        "soft_labels": labels_key,
        "evaluations": ",".join(sorted(evaluation_keys)),
    }
    return stage_key(EXPORT, {}, code_version(export), inputs)


def run_export(
    store: Store,
    key: str,
    cfg: PipelineConfig,
    keys: dict[str, str],
    accuracy: dict[str, Any],
) -> dict[str, Any]:
    """Shards + manifest + grid PNG of the distilled set, with its accuracy table."""
    if store.has(EXPORT, key):
        return store.meta(EXPORT, key)
    card = store.meta(prepare.STAGE, keys["dataset"])["card"]
    arrays = load_arrays(store.path(DISTILL, keys["distill"]) / "synthetic.zarr")
    soft = load_soft_labels(store, keys["soft_labels"]).numpy()
    manifest = {
        "method": cfg.method,
        "ipc": cfg.ipc,
        "dataset": card["name"],
        "source_fingerprint": card["fingerprint"],
        "classes": card["classes"],
        "preprocessing": {"mean": card["mean"], "std": card["std"], "zca": card["zca"]},
        "learned_lr": store.meta(DISTILL, keys["distill"])["lr"],
        "config": cfg.model_dump(mode="json"),
        "accuracy": accuracy,
        "keys": keys,
    }
    with store.writing(EXPORT, key) as tmp:
        shards = export.write_distilled(
            tmp, arrays["images"], arrays["pixels"], arrays["labels"], soft, manifest
        )
        per_row = cfg.ipc if cfg.ipc > 1 else len(card["classes"])  # one row per class; IPC 1 as one row
        export.image_grid(arrays["pixels"], per_row=per_row).save(tmp / "grid.png")
        store.commit(EXPORT, key, tmp, {"shards": [p.name for p in shards]})
    return store.meta(EXPORT, key)


def evaluation_set_key(evaluation_keys: list[str]) -> str:
    """One key for the whole evaluation stage (the summary's ``stages.evaluate.key``)."""
    return stage_key(EVALUATE, {}, "", {"runs": ",".join(sorted(evaluation_keys))})
