"""A stage's three faces agree: every setting its ``run`` reads is in its key, through its own config
slice or the slice of a stage it reads (whose key is in its key). Checked by running real pipelines
with a config that records what is read, and shown to catch a stage that reads an unlisted field."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from pydantic import BaseModel

from condense.configure import load_config
from condense.stages import base
from condense.stages.base import Context, Stage
from condense.store import Store
from tests.conftest import TINY, run_pipeline
from tests.test_kd_pipeline import TINY_RDED

FREE = ("compute.",)
"""Settings in no key by design: where and how fast a job runs (the device is in no key)."""
GUARDS = {"dataset": {"ipc"}}
"""Settings a stage only checks before it writes anything (the dataset refuses an ipc larger than a
class): they can stop it, never change what it writes."""


class Recorded:
    """A config section that records the dotted path of every field read through it (a section
    dumped whole records each field it dumps). ``isinstance`` sees the section's own class."""

    def __init__(self, model: BaseModel, path: str, reads: set[str]):
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_reads", reads)

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # noqa: D105 - isinstance(recorded, MTTConfig) holds
        return type(self._model)

    def _at(self, name: str) -> str:
        return f"{self._path}.{name}" if self._path else name

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._model, name)
        if name in type(self._model).model_fields:
            if isinstance(value, BaseModel):
                return Recorded(value, self._at(name), self._reads)
            self._reads.add(self._at(name))
            return value
        if name == "model_dump":
            return functools.partial(self._dump, value)
        return value

    def _dump(self, dump: Callable[..., Any], **kwargs: Any) -> Any:
        fields = set(type(self._model).model_fields)
        if kwargs.get("include") is not None:
            fields &= set(kwargs["include"])
        fields -= set(kwargs.get("exclude") or ())
        self._reads.update(
            f"{self._at(f)}.*" if isinstance(getattr(self._model, f), BaseModel) else self._at(f)
            for f in fields
        )
        return dump(**kwargs)

    def __eq__(self, other: object) -> bool:
        return self._model == (other._model if isinstance(other, Recorded) else other)

    __hash__ = None  # type: ignore[assignment]


def covered(read: str, allowed: set[str]) -> bool:
    """Whether ``read`` is one of ``allowed`` or lies in a section ``allowed`` holds whole."""
    return read.startswith(FREE) or any(
        read == a or (a.endswith(".*") and read.startswith(a[:-1])) or read.startswith(a + ".")
        for a in allowed
    )


def slice_reads(stage: Stage, cfg: Any, params: dict[str, Any]) -> set[str]:
    reads: set[str] = set()
    stage.config(Recorded(cfg, "", reads), params)
    return reads


def recording(monkeypatch: pytest.MonkeyPatch, stages: dict[str, Stage]) -> dict[str, set[str]]:
    """Replace every stage's ``run``/``run_part`` by one that reads through a :class:`Recorded` config;
    returns what each stage's runs read."""
    read: dict[str, set[str]] = {name: set() for name in stages}

    def wrap(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def run(ctx: Context, *args: Any) -> Any:
            real = ctx.cfg
            ctx.cfg = Recorded(real, "", read[name])  # type: ignore[assignment]
            try:
                return function(ctx, *args)
            finally:
                ctx.cfg = real

        return run

    for name, stage in stages.items():
        changes: dict[str, Any] = {"run": wrap(name, stage.run)}
        if stage.run_part is not None:
            changes["run_part"] = wrap(name, stage.run_part)
        monkeypatch.setitem(base._stages, name, replace(stage, **changes))
    return read


def unlisted(cfg: Any, stages: dict[str, Stage], read: dict[str, set[str]]) -> dict[str, list[str]]:
    """Per stage, the settings its runs read that no slice of its key holds."""

    def allowed(name: str, seen: frozenset[str] = frozenset()) -> set[str]:
        stage = stages[name]
        params_list = stage.instances(cfg) if stage.instances else [{}]
        out: set[str] = set()
        for params in params_list:
            if name == "dataset":
                params = {"fingerprint": "", "load": "memory"}
            out |= slice_reads(stage, cfg, params)
            for upstream in stage.reads(cfg, params):
                if upstream not in seen:
                    out |= allowed(upstream, seen | {name})
        return out

    found = {}
    for name, reads in read.items():
        keyed = allowed(name) | GUARDS.get(name, set()) if reads else set()
        found[name] = sorted(r for r in reads if not covered(r, keyed))
    return {name: reads for name, reads in found.items() if reads}


@pytest.mark.parametrize(
    ("preset", "overrides"),
    [
        ("digits-mtt", TINY),
        ("digits-rded", [*TINY_RDED, "relabel.mode=stored", "evaluate.epochs=2"]),
        # PDD's chain of stages and regenerated experts, and the staged evaluation.
        (
            "digits-pdd",
            [*TINY, "ipc=2", "distill.stages=2", "distill.synthetic_epochs=2", "evaluate.recipe=staged"],
        ),
    ],
)
def test_every_stage_reads_only_settings_in_its_key(tmp_path, monkeypatch, preset, overrides):
    stages = base.all_stages()
    read = recording(monkeypatch, stages)
    cfg = load_config(preset, overrides)
    run_pipeline(Store(tmp_path), cfg)
    ran = {name for name, reads in read.items() if reads}
    assert {"dataset", "distill", "evaluate", "export"} <= ran
    assert unlisted(cfg, stages, read) == {}


def test_the_check_finds_a_stage_that_reads_a_setting_outside_its_slice(tmp_path, monkeypatch):
    def config(cfg: Any, params: dict[str, Any]) -> dict[str, Any]:
        return {"seed": cfg.seed, "soft": cfg.soft_labels.model_dump(exclude={"temperature"})}

    def run(ctx: Context) -> dict[str, Any]:
        return {"ipc": ctx.cfg.ipc, "seed": ctx.cfg.seed, "t": ctx.cfg.soft_labels.temperature}

    sneaky = Stage(name="sneaky", run=run, config=config)
    stages = {"sneaky": sneaky}
    read = recording(monkeypatch, stages)
    cfg = load_config("digits-mtt", TINY)
    ctx = Context("sneaky", cfg, Store(tmp_path), "k", {}, {}, tmp_path)
    base._stages["sneaky"].run(ctx)
    assert read["sneaky"] == {"ipc", "seed", "soft_labels.temperature"}
    assert unlisted(cfg, stages, read) == {"sneaky": ["ipc", "soft_labels.temperature"]}
