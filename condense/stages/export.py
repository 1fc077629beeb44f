"""The export stage: the distilled set as WebDataset shards with a manifest (readable with plain
``webdataset``), its soft labels, its accuracy table, and a grid picture of the images."""

from __future__ import annotations

from typing import Any

from condense import artifacts, export, plots
from condense.config import PipelineConfig, keyed
from condense.scores import summarize
from condense.stages.base import Context, Params, Stage
from condense.store import Store


def accuracy_table(store: Store, evaluation_keys: list[str]) -> dict[str, dict[str, Any]]:
    """{arch: {subject: mean, std, runs}} over the evaluation runs, in the order they were planned."""
    runs: dict[str, dict[str, list[float]]] = {}
    for key in evaluation_keys:
        meta = store.meta("evaluate", key)
        accuracies = runs.setdefault(meta["arch"], {}).setdefault(meta["subject"], [])
        accuracies += [run["accuracy"] for run in meta["runs"]]
    return {arch: {s: summarize(accs) for s, accs in by_subject.items()} for arch, by_subject in runs.items()}


def run(ctx: Context) -> dict[str, Any]:
    cfg, store, keys = ctx.cfg, ctx.store, ctx.keys
    card = ctx.meta("dataset")["card"]
    arrays = artifacts.load_synthetic_arrays(store, str(keys["distill"]))
    soft = artifacts.load_soft_labels(store, str(keys["soft_labels"])).numpy()
    manifest = {
        "method": cfg.method,
        "ipc": cfg.ipc,
        "dataset": card["name"],
        "source_fingerprint": card["fingerprint"],
        "classes": card["classes"],
        "preprocessing": {"mean": card["mean"], "std": card["std"], "zca": card["zca"]},
        "learned_lr": ctx.meta("distill")["lr"],
        "config": keyed(cfg, mode="json", exclude={"compute"}),
        "accuracy": accuracy_table(store, list(keys["evaluate"])),
        "keys": {name: key for name, key in keys.items() if isinstance(key, str)},
    }
    shards = export.write_distilled(
        ctx.work,
        arrays["images"],
        arrays["pixels"],
        arrays["labels"],
        soft,
        manifest,
        label_logits=arrays.get("label_logits"),
        stages=artifacts.stages_of(arrays),
    )
    title = f"{card['name']} / {cfg.method} / ipc {cfg.ipc}: the distilled images"
    grid = plots.class_grid(arrays["pixels"], arrays["labels"], card["classes"], title)
    grid.save(ctx.work / export.GRID)
    return {"shards": [p.name for p in shards]}


def config(cfg: PipelineConfig, params: Params) -> dict[str, Any]:
    return keyed(cfg, mode="json", exclude={"compute"})  # the manifest records the config


STAGE = Stage(
    name="export",
    run=run,
    config=config,
    reads=lambda cfg, params: ("dataset", "distill", "soft_labels", "evaluate"),
)
