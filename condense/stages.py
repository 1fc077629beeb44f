"""Each pipeline stage as (key, compute, store): plain functions, no Prefect.

A stage's key hashes its config, the source of the code it runs and its inputs' keys, so a rerun
finds finished work by key and redoes only what changed. ``tasks/`` wraps these as Prefect tasks;
a notebook can call them directly.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import zarr

from condense import (
    augment,
    crops,
    evaluate,
    experts,
    export,
    labels,
    models,
    prepare,
    relabel,
    teacher,
    training,
)
from condense.config import ModelConfig, PipelineConfig
from condense.errors import CondenseError, ConfigError
from condense.evaluate import KDRecipe, Recipe
from condense.methods import base as method_base
from condense.methods import get_method
from condense.methods.base import DistillInputs, SyntheticSet
from condense.progress import SILENT, Progress
from condense.store import (
    Store,
    code_version,
    disk_bytes,
    load_arrays,
    read_json,
    save_arrays,
    stage_key,
    write_json,
)

EXPERTS, TEACHER, DISTILL = "experts", "teacher", "distill"
SOFT_LABELS, RELABEL, EVALUATE = "soft_labels", "relabel", "evaluate"
TRAINING_CODE = (models, augment, training)
CHECKPOINT = "checkpoint.pt"


# ----------------------------------------------------------------------------- experts


def experts_key(cfg: PipelineConfig, dataset_key: str) -> str:
    config = {"experts": cfg.experts.model_dump(), "model": cfg.model.model_dump(), "seed": cfg.seed}
    if cfg.experts.dsa:
        config["dsa"] = cfg.dsa.model_dump()
    return stage_key(EXPERTS, config, code_version(*TRAINING_CODE, experts), {"dataset": dataset_key})


BUFFER = "trajectories.zarr"


def _chunk_folder(index: int) -> str:
    """Where expert ``index``'s trajectory lives in the buffer: its chunks (one per snapshot) are
    ``c/<index>/<snapshot>/0`` under the "/"-separated chunk key encoding the buffer is created with."""
    return f"{BUFFER}/c/{index}"


def open_experts(store: Store, key: str, cfg: PipelineConfig, dataset_key: str) -> None:
    """Create the (experts, snapshots, parameters) array that expert tasks fill, chunked per snapshot."""
    if store.has(EXPERTS, key):
        return
    store.pull(EXPERTS, key, f"{BUFFER}/zarr.json")
    path = store.partial(EXPERTS, key) / BUFFER
    if path.exists():
        return
    card = store.meta(prepare.STAGE, dataset_key)["card"]
    model = models.ConvNet(card["channels"], len(card["classes"]), card["resolution"], cfg.model)
    shape = (cfg.experts.num_experts, cfg.experts.epochs + 1, models.FlatParams(model).numel)
    tmp = path.with_name(f".{uuid.uuid4().hex}.tmp")
    zarr.create_array(
        str(tmp),
        shape=shape,
        chunks=(1, 1, shape[2]),
        dtype="float32",
        chunk_key_encoding={"name": "default", "separator": "/"},
    )
    try:
        os.rename(tmp, path)
    except OSError:  # another run created it first
        shutil.rmtree(tmp, ignore_errors=True)
    store.push(EXPERTS, key, f"{BUFFER}/zarr.json")


def record_expert(
    store: Store, key: str, cfg: PipelineConfig, dataset_key: str, index: int, progress: Progress = SILENT
) -> dict[str, Any]:
    """Train expert ``index`` (unless already recorded) and write its trajectory into the buffer."""
    if store.has(EXPERTS, key):
        return store.meta(EXPERTS, key)["experts"][index]
    done = f"expert-{index:04d}.json"
    store.pull(EXPERTS, key, done, f"{BUFFER}/zarr.json")
    work = store.partial(EXPERTS, key)
    if (work / done).exists():
        return read_json(work / done)
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
    zarr.open_array(str(work / BUFFER), mode="r+")[index] = trajectory.params
    record = {
        "index": index,
        "train_loss": trajectory.train_loss,
        "train_accuracy": trajectory.train_accuracy,
        "test_accuracy": trajectory.test_accuracy,
        "seconds": time.perf_counter() - started,
    }
    write_json(work / done, record)
    store.push(EXPERTS, key, _chunk_folder(index), done)  # the trajectory first: `done` vouches for it
    progress.note(
        f"expert {index}: train {trajectory.train_accuracy:.1f}% test {trajectory.test_accuracy:.1f}%"
    )
    return record


def finish_experts(store: Store, key: str, records: list[dict[str, Any]]) -> None:
    """Seal the buffer once every expert is recorded; the teacher is the best fit to the train set."""
    if store.has(EXPERTS, key):
        return
    store.pull(EXPERTS, key)  # trajectories recorded on other machines
    work = store.partial(EXPERTS, key)
    missing = [r["index"] for r in records if not (work / f"expert-{r['index']:04d}.json").exists()]
    if missing:
        raise CondenseError(f"experts {missing} were not recorded")
    for path in work.glob("expert-*.json"):
        path.unlink()
    teacher = max(records, key=lambda r: r["train_accuracy"])["index"]
    store.commit(EXPERTS, key, work, {"experts": records, "teacher": teacher})


def load_buffer(store: Store, key: str) -> experts.ExpertBuffer:
    return experts.ExpertBuffer(zarr.open_array(str(store.path(EXPERTS, key) / BUFFER), mode="r"))


# ----------------------------------------------------------------------------- teacher


def needs_experts(cfg: PipelineConfig) -> bool:
    """Experts are recorded when the method matches trajectories or the teacher is the best expert."""
    return get_method(cfg.method).needs_experts or cfg.teacher.source == "best_expert"


def teacher_architecture(cfg: PipelineConfig) -> tuple[str, ModelConfig]:
    """(arch, ConvNet config) of the teacher: the experts' ConvNet, or the teacher section's."""
    if cfg.teacher.source == "best_expert":
        return models.CONVNET, cfg.model
    return cfg.teacher.arch, teacher.teacher_model_config(cfg.teacher, cfg.model)


def _file_digest(path: str) -> str:
    target = Path(path).expanduser()
    if not target.is_file():
        raise ConfigError(f"teacher file not found: {target}")
    return hashlib.sha256(target.read_bytes()).hexdigest()


def teacher_key(cfg: PipelineConfig, dataset_key: str, experts_key_: str | None) -> str:
    t = cfg.teacher
    arch, model_cfg = teacher_architecture(cfg)
    config: dict[str, Any] = {"source": t.source, "arch": arch, "model": model_cfg.model_dump()}
    inputs = {"dataset": dataset_key}
    if t.source == "best_expert":
        inputs["experts"] = experts_key_ or ""
    elif t.source == "train":
        config.update(t.model_dump(exclude={"path", "source"}), seed=cfg.seed)
        if t.dsa:
            config["dsa"] = cfg.dsa.model_dump()
    else:
        config["file"] = _file_digest(t.path or "")
    return stage_key(TEACHER, config, code_version(*TRAINING_CODE, teacher), inputs)


def _build_teacher(cfg: PipelineConfig, card: dict[str, Any]) -> torch.nn.Module:
    arch, model_cfg = teacher_architecture(cfg)
    return models.build_model(arch, card["channels"], len(card["classes"]), card["resolution"], model_cfg)


def run_teacher(
    store: Store,
    key: str,
    cfg: PipelineConfig,
    dataset_key: str,
    experts_key_: str | None,
    progress: Progress = SILENT,
) -> dict[str, Any]:
    """Train, pick or load the teacher; stores its weights with its accuracy."""
    if store.has(TEACHER, key):
        return store.meta(TEACHER, key)
    data = prepare.load(store, dataset_key)
    started = time.perf_counter()
    meta: dict[str, Any] = {"source": cfg.teacher.source, "arch": teacher_architecture(cfg)[0]}
    if cfg.teacher.source == "best_expert":
        if experts_key_ is None:
            raise ConfigError("teacher.source 'best_expert' needs the experts stage")
        expert_meta = store.meta(EXPERTS, experts_key_)
        model = models.ConvNet(data.channels, data.num_classes, data.resolution, cfg.model)
        final = load_buffer(store, experts_key_).snapshot(expert_meta["teacher"], cfg.experts.epochs)
        model = models.FlatParams(model).load_into(final)
        meta["expert"] = expert_meta["teacher"]
    elif cfg.teacher.source == "train":
        model = teacher.train_teacher(data, cfg.teacher, cfg.model, cfg.dsa, cfg.seed, progress).model
    else:
        model = teacher.load_teacher_file(cfg.teacher.path or "", _build_teacher(cfg, data.card))
    meta["train_accuracy"] = training.accuracy(model, data.train_x, data.train_y)
    meta["test_accuracy"] = training.accuracy(model, data.test_x, data.test_y)
    meta["seconds"] = time.perf_counter() - started
    progress.note(f"teacher ({meta['arch']}, {meta['source']}): test {meta['test_accuracy']:.1f}%")
    with store.writing(TEACHER, key) as tmp:
        torch.save(model.state_dict(), tmp / "weights.pt")
        store.commit(TEACHER, key, tmp, meta)
    return store.meta(TEACHER, key)


def load_teacher(store: Store, key: str, cfg: PipelineConfig, dataset_key: str) -> torch.nn.Module:
    model = _build_teacher(cfg, store.meta(prepare.STAGE, dataset_key)["card"])
    model.load_state_dict(torch.load(store.path(TEACHER, key) / "weights.pt", weights_only=True))
    return model.eval()


# ----------------------------------------------------------------------------- distill


def distill_key(
    cfg: PipelineConfig, dataset_key: str, experts_key_: str | None, teacher_key_: str | None = None
) -> str:
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
    if teacher_key_ is not None:
        inputs["teacher"] = teacher_key_
    return stage_key(DISTILL, config, code_version(*TRAINING_CODE, method_base, *method.modules), inputs)


class TorchCheckpoints:
    """Resumable state as one file written atomically (temporary name, then rename); ``on_save``
    runs after each save (a remote store shares the checkpoint with other machines there)."""

    def __init__(self, path: Path, on_save: Callable[[], None] = lambda: None):
        self.path = path
        self.on_save = on_save

    def load(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        return torch.load(self.path, weights_only=True)

    def save(self, state: dict[str, Any]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)
        self.on_save()


def run_distill(
    store: Store,
    key: str,
    cfg: PipelineConfig,
    dataset_key: str,
    experts_key_: str | None,
    teacher_key_: str | None = None,
    progress: Progress = SILENT,
) -> dict[str, Any]:
    """Optimise the synthetic set (resuming from a checkpoint if a previous run was killed)."""
    if store.has(DISTILL, key):
        return store.meta(DISTILL, key)
    method = get_method(cfg.method)
    data = prepare.load(store, dataset_key)
    store.pull(DISTILL, key, CHECKPOINT)  # a run killed on another machine resumes here
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
            teacher=load_teacher(store, teacher_key_, cfg, dataset_key) if teacher_key_ else None,
        ),
        TorchCheckpoints(work / CHECKPOINT, lambda: store.push(DISTILL, key, CHECKPOINT)),
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
    (work / CHECKPOINT).unlink(missing_ok=True)
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


def soft_labels_key(cfg: PipelineConfig, distill_key_: str, teacher_key_: str) -> str:
    return stage_key(
        SOFT_LABELS,
        cfg.soft_labels.model_dump(),
        code_version(models, labels),
        {"distill": distill_key_, "teacher": teacher_key_},
    )


def run_soft_labels(
    store: Store, key: str, cfg: PipelineConfig, dataset_key: str, distill_key_: str, teacher_key_: str
) -> dict[str, Any]:
    """One soft label per synthetic image; the teacher's agreement is a sanity check of the set."""
    if store.has(SOFT_LABELS, key):
        return store.meta(SOFT_LABELS, key)
    model = load_teacher(store, teacher_key_, cfg, dataset_key)
    synthetic = load_synthetic(store, distill_key_)
    probs = labels.soft_labels(model, synthetic.images, cfg.soft_labels.temperature)
    agreement = float((probs.argmax(1) == synthetic.labels).float().mean() * 100)
    with store.writing(SOFT_LABELS, key) as tmp:
        save_arrays(tmp / "labels.zarr", {"probs": probs.numpy()})
        store.commit(SOFT_LABELS, key, tmp, {"teacher_agreement": agreement})
    return store.meta(SOFT_LABELS, key)


def load_soft_labels(store: Store, key: str) -> torch.Tensor:
    return torch.from_numpy(load_arrays(store.path(SOFT_LABELS, key) / "labels.zarr")["probs"])


# ----------------------------------------------------------------------------- relabel (stored, FKD)


def uses_stored_labels(cfg: PipelineConfig) -> bool:
    return cfg.evaluate.recipe == "kd" and cfg.relabel.mode == "stored"


def _kd_label_config(cfg: PipelineConfig) -> dict[str, Any]:
    """Everything that shapes the KD labels: augmentation, temperature, batches, epochs, top-k."""
    return {
        "kd": cfg.evaluate.kd.model_dump(),
        "relabel": cfg.relabel.model_dump(),
        "epochs": cfg.evaluate.epochs,
        "batch_size": cfg.evaluate.batch_size,
    }


def relabel_key(cfg: PipelineConfig, distill_key_: str, teacher_key_: str) -> str:
    config = {**_kd_label_config(cfg), "seed": cfg.seed}
    inputs = {"distill": distill_key_, "teacher": teacher_key_}
    return stage_key(RELABEL, config, code_version(models, crops, relabel), inputs)


def _check_top_k(cfg: PipelineConfig, num_classes: int) -> None:
    if cfg.relabel.top_k is not None and cfg.relabel.top_k > num_classes:
        raise ConfigError(f"relabel.top_k {cfg.relabel.top_k} exceeds the number of classes ({num_classes})")


def _stitch_factor(store: Store, distill_key_: str) -> int:
    return int(store.meta(DISTILL, distill_key_).get("stats", {}).get("factor", 1))


def run_relabel(
    store: Store,
    key: str,
    cfg: PipelineConfig,
    keys: dict[str, str],
    progress: Progress = SILENT,
) -> dict[str, Any]:
    """FKD-style stored labels for the distilled set: per epoch, each image's crop box and flip, the
    batch's CutMix, and the teacher's top-k probabilities, so students train without the teacher."""
    if store.has(RELABEL, key):
        return store.meta(RELABEL, key)
    data = prepare.load(store, keys["dataset"])
    _check_top_k(cfg, data.num_classes)
    synthetic = load_synthetic(store, keys["distill"])
    started = time.perf_counter()
    arrays = relabel.relabel(
        load_teacher(store, keys["teacher"], cfg, keys["dataset"]),
        synthetic.images,
        relabel.KDAugment.from_config(cfg.evaluate.kd, _stitch_factor(store, keys["distill"])),
        cfg.evaluate.epochs,
        cfg.evaluate.batch_size,
        cfg.evaluate.kd.temperature,
        cfg.relabel.top_k,
        cfg.relabel.fp16,
        cfg.seed,
        progress,
    )
    images = synthetic.images
    with store.writing(RELABEL, key) as tmp:
        save_arrays(tmp / "labels.zarr", arrays, chunks={n: (1, *a.shape[1:]) for n, a in arrays.items()})
        meta = {
            "epochs": cfg.evaluate.epochs,
            "top_k": cfg.relabel.top_k or data.num_classes,
            "label_bytes": int(sum(a.nbytes for a in arrays.values())),
            "label_disk_bytes": disk_bytes(tmp / "labels.zarr"),
            "image_bytes": int(images.numel()),  # uint8 pixels, as exported
            "seconds": time.perf_counter() - started,
        }
        store.commit(RELABEL, key, tmp, meta)
    return store.meta(RELABEL, key)


def stored_labels(store: Store, key: str, num_classes: int, batch_size: int) -> relabel.StoredLabels:
    group = zarr.open_group(str(store.path(RELABEL, key) / "labels.zarr"), mode="r")
    return relabel.StoredLabels({name: group[name] for name in group.array_keys()}, num_classes, batch_size)


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


def kd_recipe(cfg: PipelineConfig, subject: str, factor: int) -> KDRecipe:
    kd = cfg.evaluate.kd
    return KDRecipe(
        epochs=cfg.evaluate.full_data_epochs if subject == "full_data" else cfg.evaluate.epochs,
        lr=kd.lr,
        weight_decay=kd.weight_decay,
        final_lr_fraction=kd.final_lr_fraction,
        batch_size=cfg.evaluate.batch_size,
        temperature=kd.temperature,
        augment=relabel.KDAugment.from_config(kd, factor),
    )


def _kd_fields(cfg: PipelineConfig, subject: str) -> dict[str, Any]:
    """What a KD-recipe run's result depends on; the full-data baseline is shared across IPCs."""
    stored = subject == "distilled" and uses_stored_labels(cfg)
    return {
        "recipe": "kd",
        "kd": cfg.evaluate.kd.model_dump(),
        "epochs": cfg.evaluate.full_data_epochs if subject == "full_data" else cfg.evaluate.epochs,
        "batch_size": cfg.evaluate.batch_size,
        "top_k": cfg.relabel.top_k,
        "fp16": cfg.relabel.fp16,
        "labels": "stored" if stored else "online",
    }


def evaluation_key(cfg: PipelineConfig, subject: str, arch: str, index: int, inputs: dict[str, str]) -> str:
    if cfg.evaluate.recipe == "kd":
        fields = _kd_fields(cfg, subject)
    else:
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
    code = code_version(*TRAINING_CODE, evaluate, labels, crops, relabel)
    return stage_key(EVALUATE, config, code, inputs)


def evaluation_inputs(cfg: PipelineConfig, subject: str, keys: dict[str, str]) -> dict[str, str]:
    """What an evaluation run depends on (full data under the MTT recipe: only the dataset)."""
    inputs = {"dataset": keys["dataset"]}
    if subject == "distilled":
        inputs["distill"] = keys["distill"]
    if cfg.evaluate.recipe == "kd":
        if subject == "distilled" and uses_stored_labels(cfg):
            inputs["relabel"] = keys["relabel"]
        else:
            inputs["teacher"] = keys["teacher"]
    elif cfg.evaluate.labels == "soft":
        if subject == "distilled":
            inputs["soft_labels"] = keys["soft_labels"]
        elif subject == "random_real":
            inputs["teacher"] = keys["teacher"]
    return inputs


def _subject_set(
    store: Store,
    cfg: PipelineConfig,
    subject: str,
    data: prepare.PreparedDataset,
    keys: dict[str, str],
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """(inputs, hard labels, learned lr) of the set an evaluation run trains on."""
    if subject == "distilled":
        synthetic = load_synthetic(store, keys["distill"])
        return synthetic.images, synthetic.labels, synthetic.lr
    if subject == "random_real":
        x, y = evaluate.random_real_subset(data, cfg.ipc, seed)
        return x, y, None
    return data.train_x, data.train_y, None


def _train_kd(
    store: Store,
    cfg: PipelineConfig,
    subject: str,
    arch: str,
    data: prepare.PreparedDataset,
    x: torch.Tensor,
    keys: dict[str, str],
    seed: int,
    progress: Progress,
) -> dict[str, float]:
    """The KD recipe: replay stored labels for the distilled set when relabel is stored, else run the
    teacher online (baselines always: they are drawn per seed), quantised the same way."""
    _check_top_k(cfg, data.num_classes)
    factor = _stitch_factor(store, keys["distill"]) if subject == "distilled" else 1
    kd = kd_recipe(cfg, subject, factor)
    if subject == "distilled" and uses_stored_labels(cfg):
        stored = stored_labels(store, keys["relabel"], data.num_classes, kd.batch_size)
        plans, targets = stored.plan, stored.targets
    else:
        model = load_teacher(store, keys["teacher"], cfg, keys["dataset"])
        plans = relabel.online_plans(len(x), kd.batch_size, kd.augment, seed, cfg.relabel.fp16)
        targets = relabel.online_labels(model, kd.temperature, cfg.relabel.top_k, cfg.relabel.fp16)
    return evaluate.train_and_test_kd(arch, data, x, kd, seed, plans, targets, cfg.model, progress)


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
    x, targets, learned_lr = _subject_set(store, cfg, subject, data, keys, seed)
    if cfg.evaluate.recipe == "kd":
        result = _train_kd(store, cfg, subject, arch, data, x, keys, seed, progress)
    else:
        if cfg.evaluate.labels == "soft" and subject == "distilled":
            targets = load_soft_labels(store, keys["soft_labels"])
        elif cfg.evaluate.labels == "soft" and subject == "random_real":
            model = load_teacher(store, keys["teacher"], cfg, keys["dataset"])
            targets = labels.soft_labels(model, x, cfg.soft_labels.temperature)
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
