"""A method defined outside the package, with the registration decorator and nothing else, runs
through the whole Prefect flow; the registry is read-only and refuses a name registered twice."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from pydantic import Field

import condense
from condense.config import Strict
from condense.errors import ConfigError
from condense.methods import METHODS, get_method, method_names, register_method
from condense.methods.base import Checkpoints, DistillInputs, SyntheticSet
from condense.prepare import load
from condense.progress import Progress
from condense.store import Store


class ClassMeansConfig(Strict):
    scale: float = Field(default=1.0, gt=0)


@register_method("test-class-means", config=ClassMeansConfig)
def class_means(inputs: DistillInputs, checkpoints: Checkpoints, progress: Progress) -> SyntheticSet:
    """Each class's mean real image (times ``scale``), ``ipc`` copies: the oldest baseline there is."""
    data = inputs.data
    means = torch.stack([data.train_x[data.train_y == c].mean(0) for c in range(data.num_classes)])
    images = means.repeat_interleave(inputs.ipc, 0) * inputs.method_cfg.scale
    return SyntheticSet(images=images, labels=torch.arange(data.num_classes).repeat_interleave(inputs.ipc))


CONFIG = {
    "method": "test-class-means",
    "ipc": 1,
    "dataset": {"source": "digits", "train_per_class": 20},
    "experts": {"num_experts": 1, "epochs": 2, "batch_size": 64},
    "distill": {"scale": 0.5},
    "evaluate": {"seeds": 1, "epochs": 10, "full_data_epochs": 1},
}


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    # A first start migrates a fresh database: minutes on a busy 2-core machine, not the default 30 s.
    with (
        prefect_test_harness(server_startup_timeout=300),
        temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}),
    ):
        yield


def test_a_method_registered_in_a_test_module_runs_through_the_flow(prefect_api, tmp_path: Path):
    from condense_flows.pipeline import pipeline

    config = tmp_path / "class-means.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    summary = pipeline(str(config), [], str(tmp_path / "store"), quiet=True)
    assert summary["method"] == "test-class-means" and summary["version"]["number"] == 1
    assert not any(stage["cached"] for stage in summary["stages"].values())

    ds = condense.load_distilled(summary["artifacts"]["run_dir"])
    data = load(Store(tmp_path / "store"), summary["keys"]["dataset"])
    expected = torch.stack([data.train_x[data.train_y == c].mean(0) for c in range(10)]) * 0.5
    assert ds.labels.tolist() == list(range(10))
    torch.testing.assert_close(ds.images, expected)
    again = pipeline(str(config), ["distill.scale=1.0"], str(tmp_path / "store"), quiet=True)
    assert again["stages"]["experts"]["cached"] and not again["stages"]["distill"]["cached"]
    doubled = condense.load_distilled(again["artifacts"]["run_dir"]).images
    torch.testing.assert_close(doubled, 2 * ds.images)


def test_the_registry_is_read_only_and_refuses_a_second_owner_of_a_name():
    assert "test-class-means" in method_names() and "mtt" in method_names()
    assert get_method("test-class-means").module == __name__
    with pytest.raises(TypeError):
        METHODS["mine"] = METHODS["mtt"]  # type: ignore[index]
    with pytest.raises(ValueError, match="registered twice"):
        register_method("mtt", config=ClassMeansConfig)(class_means)
    with pytest.raises(ConfigError, match="unknown method 'nope'; methods: .*test-class-means"):
        get_method("nope")
