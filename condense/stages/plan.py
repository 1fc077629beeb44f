"""The plan of a run: which jobs, with which keys, in which order, derived from the declarations.

Planning starts from the stage that publishes (``export``) and follows ``reads`` backwards, so a
stage is in the plan exactly when something downstream reads it for this config: the experts when
the method matches trajectories or the teacher is the best expert, stored relabeling when the KD
recipe replays stored labels. Jobs come out in dependency order; each lists the jobs it waits for.
Adding a stage is its own module plus the ``reads`` of the stage that uses it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from condense import devices
from condense.config import PipelineConfig
from condense.errors import CondenseError, ConfigError
from condense.methods import get_method
from condense.prepare import STAGE as DATASET
from condense.prepare import check_ipc
from condense.stages.base import Job, Stage, all_stages, input_key, stage_key
from condense.stages.distill import check_shards
from condense.stages.relabel import check_top_k
from condense.store import Store

SINK = "export"


@dataclass
class Plan:
    """Jobs in dependency order; ``after[job.name]`` are the names of the jobs it waits for."""

    jobs: list[Job] = field(default_factory=list)
    after: dict[str, list[str]] = field(default_factory=dict)
    keys: dict[str, str | list[str]] = field(default_factory=dict)
    """Each planned stage's key, or the keys of its instances (a fanned-out stage)."""

    def artifacts(self) -> list[tuple[str, str]]:
        """(stage, key) of every artifact the plan reads or writes."""
        return [
            (stage, key)
            for stage, keys in self.keys.items()
            for key in ([keys] if isinstance(keys, str) else keys)
        ]

    def stages(self) -> list[str]:
        """Stage names in plan order."""
        return list(dict.fromkeys(job.stage for job in self.jobs))

    def summary_key(self, stage: str) -> str:
        """One key per stage for reports: its key, or a hash of its instances' keys."""
        keys = self.keys[stage]
        return keys if isinstance(keys, str) else stage_key(stage, {}, "", {"runs": input_key(keys)})


def check_streamable(cfg: PipelineConfig) -> None:
    """Before any work: the steps that would read a streamed training split whole, in one line."""
    whole = []
    if not get_method(cfg.method).streams:
        whole.append(f"method {cfg.method} (it does not declare streams=True)")
    if cfg.evaluate.recipe == "kd" and cfg.evaluate.full_data:
        whole.append("the KD recipe's full-data baseline (evaluate.full_data)")
    if whole:
        raise ConfigError(
            f"{' and '.join(whole)} read the whole training split into memory, which a streamed dataset "
            "never does: set dataset.load: memory, or evaluate.full_data: false under the KD recipe"
        )


def dataset_job() -> Job:
    """The first job: its key depends on the source's content, computed where the job runs."""
    return Job(stage=DATASET, key="")


def make_plan(
    cfg: PipelineConfig, store: Store, dataset_key: str, card: dict[str, Any] | None = None
) -> Plan:
    """Every job after the dataset stage, for ``cfg``, given the prepared dataset's key (and its card,
    read from the store when not given: a plan made before the dataset is prepared passes one)."""
    card = store.meta(DATASET, dataset_key)["card"] if card is None else card
    check_ipc(card, cfg.ipc)
    if cfg.evaluate.recipe == "kd":
        check_top_k(cfg, len(card["classes"]))  # before any work, not after the distillation
    if card.get("load") == "stream":
        check_streamable(cfg)
    check_shards(cfg, len(card["classes"]))
    spread = devices.fan_out(cfg.compute.device, cfg.compute.devices)
    stages = all_stages()
    plan = Plan(keys={DATASET: dataset_key})
    jobs_of: dict[str, list[str]] = {DATASET: []}
    visiting: set[str] = set()

    def add(name: str) -> None:
        if name in plan.keys:
            return
        if name in visiting:
            raise CondenseError(f"stage {name!r} reads itself through {sorted(visiting)}")
        visiting.add(name)
        stage = stages[name]
        instances = stage.instances(cfg) if stage.instances else [{}]
        for params in instances:
            for upstream in stage.reads(cfg, params):
                add(upstream)
        fans_out = spread if stage.instances else None
        keys: list[str] = []
        for i, params in enumerate(instances):
            keys.append(_add_instance(plan, jobs_of, stage, cfg, params, fans_out, spread, i, keys))
        plan.keys[name] = keys if stage.instances else keys[0]
        visiting.discard(name)

    add(SINK)
    return plan


def _add_instance(
    plan: Plan,
    jobs_of: dict[str, list[str]],
    stage: Stage,
    cfg: PipelineConfig,
    params: dict[str, Any],
    fans_out: list[str] | None,
    spread: list[str],
    index: int,
    earlier_keys: list[str],
) -> str:
    """Add an instance's jobs: its parts, spread over the devices in turn, then the instance itself
    (on device ``index`` in turn when the stage fans out over instances, else on ``compute.device``).
    ``earlier_keys``: the keys of the stage's instances added before it (links a chain reads)."""
    reads = stage.reads(cfg, params)
    keys: dict[str, str | list[str]] = {name: plan.keys[name] for name in reads}
    waits = [job for name in reads for job in jobs_of[name]]
    if stage.name in stage.inputs(cfg, params):
        assert stage.earlier is not None
        links = list(stage.earlier(cfg, params))
        if any(link >= index for link in links):
            raise CondenseError(f"stage {stage.name}: instance {index} reads a later one ({links})")
        keys[stage.name] = [earlier_keys[link] for link in links]
        waits = waits + [jobs_of[stage.name][link] for link in links]
    key = stage.key(cfg, keys, params)
    count = stage.part_count(cfg, params)
    parts = [
        Job(stage.name, key, params, keys, part=i, device=devices.in_turn(spread, i)) for i in range(count)
    ]
    for part in parts:
        plan.jobs.append(part)
        plan.after[part.name] = waits
    job = Job(stage.name, key, params, keys, device=devices.in_turn(fans_out, index) if fans_out else None)
    plan.jobs.append(job)
    plan.after[job.name] = waits + [p.name for p in parts]
    jobs_of.setdefault(stage.name, []).append(job.name)
    return key
