"""Why a stage would recompute, without running anything: its key's preimage against the closest
artifact of that stage in the store.

Every committed artifact records what its key was made of (:meth:`Stage.preimage`: the config
slice, the digest of each module its code version holds, the keys of its inputs). For a planned job
whose key is not in the store, the artifact of the same stage whose preimage differs least names the
change: a module (``condense/training.py changed``), a setting (``iterations 100 -> 200``) or an
input (``input experts recomputes``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from condense.config import PipelineConfig
from condense.errors import CondenseError
from condense.prepare import STAGE as DATASET
from condense.stages.base import PREIMAGE, Job, get_stage
from condense.stages.plan import make_plan
from condense.store import Store


@dataclass
class Verdict:
    """One planned job: cached, or recomputed and why."""

    job: str
    key: str
    cached: bool
    reasons: list[str]

    def line(self, why: bool = True) -> str:
        """The job, its key and ``cached`` or ``recompute`` (with the reasons when ``why``)."""
        verdict = "cached" if self.cached else "recompute"
        if why and not self.cached:
            verdict += f": {'; '.join(self.reasons)}"
        return f"{self.job:<34} {self.key}  {verdict}"


def explain(cfg: PipelineConfig, store: Store) -> list[Verdict]:
    """Each job of ``cfg``'s plan: cached, or recompute with its reasons. Planning past the dataset
    needs its card; when the dataset itself recomputes, the card of a stored dataset of the same
    content (its source fingerprint) stands in, and without one the later stages are not listed."""
    dataset = get_stage(DATASET)
    params = dataset.resolve(cfg) if dataset.resolve else {}
    dataset_job = Job(DATASET, dataset.key(cfg, {}, params), params)
    verdicts = [_verdict(store, cfg, dataset_job)]
    card = None if verdicts[0].cached else _card_of_same_content(store, params)
    if not verdicts[0].cached and card is None:
        return verdicts
    plan = make_plan(cfg, store, dataset_job.key, card)
    verdicts += [_verdict(store, cfg, job) for job in plan.jobs if job.part is None]
    return verdicts


def _verdict(store: Store, cfg: PipelineConfig, job: Job) -> Verdict:
    # An instance is named by its params (evaluate-distilled-convnet-0+1); the dataset by its stage.
    name = job.stage if job.stage == DATASET else job.name.rsplit("-", 1)[0]
    if store.has(job.stage, job.key):
        return Verdict(name, job.key, True, [])
    mine = get_stage(job.stage).preimage(cfg, job.keys, job.params)
    # The artifact whose preimage differs least (the newest of equals) explains the recompute.
    found = [
        (differences(meta[PREIMAGE], mine, store), -changed)
        for changed, meta in _committed(store, job.stage)
        if isinstance(meta.get(PREIMAGE), dict)
    ]
    if not found:
        return Verdict(name, job.key, False, [f"no {job.stage} artifact in the store yet"])
    reasons, _ = min(found, key=lambda entry: (len(entry[0]), entry[1]))
    return Verdict(name, job.key, False, reasons or ["an unexplained difference"])


def _card_of_same_content(store: Store, params: dict[str, Any]) -> dict[str, Any] | None:
    """The card of a stored dataset prepared from the same source (fingerprint) and load mode: what
    the recomputed one will describe, unless the preparing code changed what it computes."""
    for _, meta in sorted(_committed(store, DATASET), key=lambda entry: -entry[0]):
        config = meta.get(PREIMAGE, {}).get("config", {})
        if params and all(config.get(k) == v for k, v in params.items()):
            return meta["card"]
    return None


def _committed(store: Store, stage: str) -> Iterator[tuple[float, dict[str, Any]]]:
    """(commit time, meta) of every intact committed artifact of ``stage`` in the store."""
    folder = store.root / stage
    for path in folder.iterdir() if folder.is_dir() else []:
        if path.name.startswith(".") or not store.has(stage, path.name):
            continue
        try:
            yield (path / "meta.json").stat().st_mtime, store.meta(stage, path.name)
        except CondenseError:
            continue


def differences(old: dict[str, Any], new: dict[str, Any], store: Store | None = None) -> list[str]:
    """What changed from preimage ``old`` to ``new``, one phrase each: modules, settings, inputs."""
    found = []
    old_code, new_code = old.get("code", {}), new.get("code", {})
    for module in sorted(old_code.keys() | new_code.keys()):
        path = module.replace(".", "/") + ".py"
        if module not in old_code:
            found.append(f"now runs {path}")
        elif module not in new_code:
            found.append(f"no longer runs {path}")
        elif old_code[module] != new_code[module]:
            found.append(f"{path} changed")
    old_config, new_config = dict(_flat(old.get("config"))), dict(_flat(new.get("config")))
    for field in sorted(old_config.keys() | new_config.keys()):
        if old_config.get(field, "unset") != new_config.get(field, "unset"):
            found.append(f"{field} {old_config.get(field, 'unset')} -> {new_config.get(field, 'unset')}")
    old_inputs, new_inputs = old.get("inputs", {}), new.get("inputs", {})
    for stage in sorted(old_inputs.keys() | new_inputs.keys()):
        if old_inputs.get(stage) != new_inputs.get(stage):
            keys = str(new_inputs.get(stage, "")).split(",")
            missing = store is not None and not all(store.has(stage, k) for k in keys if k)
            found.append(f"input {stage} {'recomputes' if missing else 'is another artifact'}")
    return found


def _flat(value: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """Dotted leaves of a nested config slice, values as short text."""
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _flat(child, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix or "config", repr(value) if isinstance(value, str) else str(value)
