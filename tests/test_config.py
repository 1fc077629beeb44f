from pathlib import Path

import pytest

from condense.configure import load_config, parse_override, preset_names
from condense.errors import ConfigError


def test_every_preset_validates():
    names = preset_names()
    assert "digits-mtt" in names and "cifar10-mtt" in names
    for name in names:
        assert load_config(name).name == name


def test_overrides_reach_nested_fields_and_parse_yaml_values():
    cfg = load_config(
        "digits-mtt", ["ipc=10", "distill.iterations=300", "evaluate.models=[convnet, resnet18]"]
    )
    assert cfg.ipc == 10
    assert cfg.distill.iterations == 300
    assert cfg.evaluate.models == ["convnet", "resnet18"]
    assert parse_override("dataset.path=/x/y") == ("dataset.path", "/x/y")


def test_a_section_given_as_a_mapping_changes_only_what_it_names():
    preset = load_config("digits-mtt")
    assert preset.experts.epochs != 20  # the schema's default: the preset sets its own
    assert load_config("digits-mtt", ["experts={}"]).experts == preset.experts
    changed = load_config("digits-mtt", ["experts={num_experts: 3}"]).experts
    assert changed == preset.experts.model_copy(update={"num_experts": 3})
    nested = load_config("digits-mtt", ["evaluate={kd: {temperature: 2.0}}"]).evaluate
    assert nested.kd.temperature == 2.0 and nested.epochs == preset.evaluate.epochs
    # null resets a section to the schema's defaults: a new method's settings, not the preset's.
    assert load_config("digits-mtt", ["experts=null"]).experts.epochs == 20
    switched = load_config("digits-dsa", ["method=dm", "distill=null"])
    assert switched.distill.lr_img == 1.0  # DM's default, not digits-dsa's 0.1


def test_typo_in_key_is_an_error_with_a_suggestion():
    with pytest.raises(
        ConfigError, match=r"unknown config key 'distill.iteratons' \(did you mean 'distill.iterations'"
    ):
        load_config("digits-mtt", ["distill.iteratons=5"])
    with pytest.raises(ConfigError, match="unknown config key 'ipcs'"):
        load_config("digits-mtt", ["ipcs=5"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("ipc=0", "'ipc'"),
        ("ipc=-3", "'ipc'"),
        ("ipc=many", "'ipc'"),
        ("method=nope", "unknown method 'nope'"),
        ("distill.max_start_epoch=30", "experts.epochs >= 32"),
        ("dsa.strategy=color_blur", "unknown DSA families"),
        ("noequals", "key=value"),
    ],
)
def test_bad_values_name_the_field(override: str, message: str):
    with pytest.raises(ConfigError, match=message):
        load_config("digits-mtt", [override])


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown preset 'digits-mt'.*digits-mtt"):
        load_config("digits-mt")


def test_yaml_file_in_place_of_a_preset(tmp_path: Path):
    path = tmp_path / "mine.yaml"
    path.write_text("method: mtt\nipc: 3\ndataset: {source: digits}\n")
    cfg = load_config(str(path))
    assert (cfg.ipc, cfg.name) == (3, "mine")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize(
    "override",
    [
        "evaluate.lr=.nan",
        "evaluate.lr=.inf",
        "distill.lr_img=.inf",
        "experts.weight_decay=.inf",
        "dsa.rotate=.nan",
        "dsa.flip=5",
        "dsa.cutout=-3",
        "dsa.scale=0.5",
    ],
)
def test_non_finite_and_out_of_range_numbers_are_refused(override):
    field = override.partition("=")[0]
    with pytest.raises(ConfigError, match=f"invalid config value for '{field}'"):
        load_config("digits-mtt", [override])


def test_a_setting_given_twice_is_refused_not_last_one_wins(tmp_path: Path):
    path = tmp_path / "twice.yaml"
    path.write_text("method: mtt\ndistill:\n  iterations: 5\n  iterations: 50\n")
    with pytest.raises(ConfigError, match="the key 'iterations' is given twice at line 4"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="--set distill: the key 'iterations' is given twice"):
        load_config("digits-mtt", ["distill={iterations: 1, iterations: 2}"])
    (tmp_path / "empty.yaml").write_text("\n# nothing\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_config(str(tmp_path / "empty.yaml"))
