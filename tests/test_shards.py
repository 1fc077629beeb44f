"""One distillation on many workers (``compute.shards``): the shards of RDED, DM and DataDAM (by
class) and of SRe2L, CDA and CUDD's first curriculum (by IPC index) run as separate jobs, on threads
or on a local Dask cluster, and their merge is the unsharded set byte for byte, whatever the count;
a killed shard reruns alone; a method that cannot shard says so before any work."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from condense.configure import load_config
from condense.errors import ConfigError
from condense.stages import base, execute
from condense.store import Store
from tests.conftest import KillAfter, plan_for, run_jobs

SMALL = ["compute.device=cpu", "dataset.train_per_class=30", "teacher.epochs=3", "model.width=16"]
METHODS = {
    # (preset, overrides): at least 3 units of work for 3 shards (10 classes; IPC 3)
    "rded": ("digits-rded", ["ipc=2", "distill.candidates=12"]),
    "sre2l": ("digits-sre2l", ["ipc=3", "distill.iterations=4"]),
    "cda": ("digits-cda", ["ipc=3", "distill.iterations=4"]),
    # the first curriculum (3 images per class) shards; the second follows in the merge job
    "cudd": (
        "digits-cudd",
        ["ipc=4", "distill.iterations=4", "distill.curricula=[3,1]", "distill.student_epochs=1"],
    ),
    "dm": (
        "digits-dm",
        ["ipc=2", "distill.iterations=6", "distill.checkpoint_every=3", "distill.batch_real=16"],
    ),
    "datadam": (
        "digits-datadam",
        ["ipc=2", "distill.iterations=6", "distill.checkpoint_every=3", "distill.batch_real=16"],
    ),
}


def config(method: str, shards: int, *extra: str):
    preset, overrides = METHODS[method]
    return load_config(preset, [*SMALL, *overrides, f"compute.shards={shards}", "compute.cpu_jobs=2", *extra])


def artifact_bytes(store: Store, key: str, stage: str = "distill") -> dict[str, object]:
    """Every file of the artifact (a set's images, labels, pixels, history; relabeling's arrays) as
    bytes, and what its meta says of it; the meta's timings and part records differ by how it ran."""
    folder = store.path(stage, key)
    files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    meta = store.meta(stage, key)
    fields = ("lr", "method", "ipc", "stats", "input_std") if stage == "distill" else ("label_bytes", "top_k")
    return {
        **{name: data for name, data in files.items() if name != "meta.json"},
        "meta": {field: meta[field] for field in fields},
    }


def distil_on_threads(store: Store, cfg) -> tuple[str, list[dict]]:
    """The plan's teacher, then every distill shard at once on a thread each, then the merge."""
    plan = plan_for(store, cfg)
    run_jobs(store, cfg, plan, {"experts", "teacher"})
    jobs = [job for job in plan.jobs if job.stage == "distill"]
    shards, merge = [job for job in jobs if job.part is not None], [job for job in jobs if job.part is None]
    with ThreadPoolExecutor(max(1, len(shards))) as pool:
        outcomes = list(pool.map(lambda job: execute(job, cfg, store), shards))
    outcomes += [execute(job, cfg, store) for job in merge]
    return str(plan.keys["distill"]), outcomes


@pytest.fixture(scope="module")
def unsharded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, dict[str, bytes]]]:
    out = {}
    for method in METHODS:
        store = Store(tmp_path_factory.mktemp(f"{method}-whole"))
        key, outcomes = distil_on_threads(store, config(method, 1))
        assert [o["part"] for o in outcomes] == [None]  # one job, no shards
        out[method] = (key, artifact_bytes(store, key))
    return out


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("shards", [2, 3])
def test_sharded_on_threads_is_the_unsharded_set_byte_for_byte(method, shards, unsharded, tmp_path):
    store = Store(tmp_path / "store")
    key, outcomes = distil_on_threads(store, config(method, shards))
    whole_key, whole = unsharded[method]
    assert key == whole_key  # the shard count is in no key: either run's set serves the other
    assert sorted(o["part"] for o in outcomes if o["part"] is not None) == list(range(shards))
    units = [o["meta"]["units"] for o in sorted(outcomes[:-1], key=lambda o: o["part"])]
    assert units[0][0] == 0 and all(a[1] == b[0] for a, b in zip(units, units[1:], strict=False))
    assert artifact_bytes(store, key) == whole
    assert not list(store.path("distill", key).glob("shard-*"))  # the partial sets are merged away


def distil_on_dask(client, store: Store, cfg) -> tuple[str, list[dict]]:
    """The plan's teacher here, then every distill job on the cluster: the shards at once (a worker
    process each), then the merge."""
    plan = plan_for(store, cfg)
    run_jobs(store, cfg, plan, {"experts", "teacher"})
    jobs = [job for job in plan.jobs if job.stage == "distill"]
    parts = [client.submit(execute, job, cfg, store, pure=False) for job in jobs if job.part is not None]
    outcomes = client.gather(parts)
    merge = next(job for job in jobs if job.part is None)
    return str(plan.keys["distill"]), [
        *outcomes,
        client.submit(execute, merge, cfg, store, pure=False).result(),
    ]


@pytest.mark.parametrize(
    ("method", "shards"), [("rded", 3), ("sre2l", 2), ("cda", 3), ("dm", 2), ("cudd", 2)]
)
def test_sharded_on_a_local_dask_cluster_is_the_unsharded_set(method, shards, tmp_path):
    # The reference runs on a worker too: a Dask worker computes with one torch thread, and a float
    # reduction split over another number of threads rounds differently (2e-7 here), sharded or not.
    distributed = pytest.importorskip("distributed")
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster,
        distributed.Client(cluster) as client,
    ):
        key, _ = distil_on_dask(client, Store(tmp_path / "whole"), config(method, 1))
        store = Store(tmp_path / "split")
        split_key, outcomes = distil_on_dask(client, store, config(method, shards))
    assert split_key == key
    assert [o["part"] for o in outcomes] == [*range(shards), None] and not any(o["cached"] for o in outcomes)
    assert artifact_bytes(store, key) == artifact_bytes(Store(tmp_path / "whole"), key)


@pytest.mark.parametrize("method", ["sre2l", "dm", "cudd"])
def test_a_killed_shard_reruns_alone_and_the_merge_is_unchanged(method, unsharded, tmp_path, monkeypatch):
    cfg = config(method, 3)
    store = Store(tmp_path / "store")
    plan = plan_for(store, cfg)
    run_jobs(store, cfg, plan, {"experts", "teacher"})
    first, second, third = [job for job in plan.jobs if job.stage == "distill" and job.part is not None]
    execute(first, cfg, store)
    original = base.TorchCheckpoints
    with monkeypatch.context() as patch:  # the second shard is killed at its first checkpoint
        patch.setattr(base, "TorchCheckpoints", lambda path, *hook: KillAfter(original(path, *hook), 1))
        with pytest.raises(KeyboardInterrupt):
            execute(second, cfg, store)
    assert list(store.partial("distill", first.key).glob("checkpoint-2of3.pt"))  # its progress is kept
    outcomes = run_jobs(store, cfg, plan, {"distill"})
    assert [(o["part"], o["cached"]) for o in outcomes] == [(0, True), (1, False), (2, False), (None, False)]
    key, whole = unsharded[method]
    assert artifact_bytes(store, key) == whole


def test_parts_of_another_shard_count_are_not_taken_for_these(unsharded, tmp_path):
    store = Store(tmp_path / "store")
    two, three = config("cda", 2), config("cda", 3)
    plan = plan_for(store, two)
    run_jobs(store, two, plan, {"teacher"})
    execute(next(j for j in plan.jobs if j.stage == "distill" and j.part == 0), two, store)  # 2 of 3 units
    # The count changed before the rest ran: the first of three shards is computed, not the old half.
    key, outcomes = distil_on_threads(store, three)
    assert [o["cached"] for o in outcomes if o["part"] is not None] == [False, False, False]
    assert artifact_bytes(store, key) == unsharded["cda"][1]


@pytest.mark.parametrize(
    ("preset", "message"),
    [
        ("digits-mtt", "method mtt cannot be sharded \\(each iteration matches one expert trajectory"),
        ("digits-dsa", "method dsa cannot be sharded \\(each iteration's network trains on every class"),
    ],
)
def test_a_method_that_cannot_shard_refuses_before_any_work(preset, message):
    with pytest.raises(ConfigError, match=message):
        load_config(preset, ["compute.shards=2"])
    assert load_config(preset, ["compute.shards=1"]).compute.shard_count() == 1


def test_dm_with_batchnorm_refuses_shards_since_its_statistics_span_the_classes():
    with pytest.raises(ConfigError, match="DM with BatchNorm embeds every class in one batch"):
        load_config("digits-dm", ["compute.shards=2", "model.norm=batchnorm"])
    assert load_config("digits-dm", ["compute.shards=2"]).compute.shard_count() == 2


def test_more_shards_than_units_is_refused_at_planning(tmp_path: Path):
    with pytest.raises(ConfigError, match="compute.shards 4 exceeds the sre2l distillation's units \\(IPC 3"):
        plan_for(Store(tmp_path / "store"), config("sre2l", 4))
    auto = load_config("digits-rded", ["compute.shards=auto", "compute.cpu_jobs=2"])
    assert auto.compute.shard_count() == 2


STORED = ["relabel.mode=stored", "evaluate.epochs=6", "evaluate.batch_size=16", "relabel.top_k=3"]


def relabel_on_threads(store: Store, cfg) -> str:
    """The plan's teacher and set, then the relabeling shards on two threads, then their join."""
    plan = plan_for(store, cfg)
    run_jobs(store, cfg, plan, {"teacher", "distill"})
    jobs = [job for job in plan.jobs if job.stage == "relabel"]
    shards = cfg.compute.shard_count()
    assert len(jobs) == (shards + 1 if shards > 1 else 1)  # the shards, then their join
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda job: execute(job, cfg, store), [j for j in jobs if j.part is not None]))
    for job in jobs:
        if job.part is None:
            execute(job, cfg, store)
    return str(plan.keys["relabel"])


@pytest.mark.parametrize("shards", [2, 3])
def test_sharded_stored_relabeling_is_the_unsharded_labels_byte_for_byte(shards, tmp_path):
    whole, split = Store(tmp_path / "whole"), Store(tmp_path / "split")
    key = relabel_on_threads(whole, config("sre2l", 1, *STORED))
    assert relabel_on_threads(split, config("sre2l", shards, *STORED)) == key
    assert artifact_bytes(split, key, "relabel") == artifact_bytes(whole, key, "relabel")
    assert not list(split.path("relabel", key).glob("labels-*"))


def test_more_relabeling_shards_than_stored_epochs_is_refused_at_planning(tmp_path):
    cfg = config("sre2l", 3, *STORED, "relabel.stored_epochs=2")
    with pytest.raises(ConfigError, match="compute.shards 3 exceeds the 2 stored epochs"):
        plan_for(Store(tmp_path / "store"), cfg)


def test_auto_shards_under_dask_are_one_per_worker_of_the_cluster():
    distributed = pytest.importorskip("distributed")
    from condense_flows.cli import LOCAL_DASK_WORKERS, dask_workers

    with distributed.LocalCluster(n_workers=3, processes=False, dashboard_address=None) as cluster:
        assert dask_workers(cluster.scheduler_address) == 3
    assert dask_workers(None) == LOCAL_DASK_WORKERS == 2
