import json
from pathlib import Path

import pytest

from condense.config import keyed
from condense.configure import cards, load_config, parse_override, preset_names, recipes, resolve, run_source
from condense.errors import ConfigError

EARLIER_PRESETS = Path(__file__).parent / "data" / "preset-configs.json"
"""Every preset file of the version before the recipes (commit 190d0d0), with each of its named
budgets, resolved and dumped as its cache keys see it (:func:`condense.config.keyed`)."""


def test_every_dataset_method_pair_validates_at_its_cpu_budget():
    names = preset_names()
    assert len(names) == sum(len(cards()) - len(r.not_for) for r in recipes().values())
    assert {"digits-mtt", "cifar10-mtt", "cifar100-dm", "tinyimagenet-rded"} <= set(names)
    for name in names:
        assert load_config(name).name == name


PAPER_CORRECTIONS = {
    # Values of the earlier paper budgets that the papers' official configs contradict, corrected in
    # the tables (each row's comment in condense/recipes/methods/ names its source). Nothing else moves.
    "cifar10-datm budget=paper": {"evaluate.batch_size": 128},
    "cifar10-datm budget=paper-ipc1": {"evaluate.batch_size": 128},
    "cifar10-datm budget=paper-ipc50": {"evaluate.batch_size": 128, "distill.window_growth_iterations": 2000},
    "cifar10-pad budget=paper": {"evaluate.batch_size": 128},
    "cifar10-pad budget=paper-ipc1": {"evaluate.batch_size": 128},
    "cifar10-pad budget=paper-ipc50": {
        "evaluate.batch_size": 128,
        "distill.window_growth_iterations": 2000,
        "distill.expert_epochs": 3,
        "distill.batch_syn": 1000,
    },
    "cifar10-ftd budget=paper": {"experts.gsam_alpha": 0.3},
    "cifar10-ftd budget=paper-ipc1": {"experts.gsam_alpha": 0.3, "distill.ema_decay": 0.9999},
    "cifar10-dream budget=paper": {"distill.batch_real": 128},
    "cifar10-rded budget=paper": {"evaluate.kd.final_lr_fraction": 0.5},
    "imagenet-sre2l budget=paper": {"evaluate.batch_size": 1024, "evaluate.kd.crop_scale": [0.08, 1.0]},
}


@pytest.mark.parametrize("case", sorted(json.loads(EARLIER_PRESETS.read_text())))
def test_earlier_preset_names_resolve_to_the_configs_they_always_did(case: str):
    # Same keyed dump = same cache keys: stores filled by the preset files stay warm (every CPU
    # budget exactly; a paper budget but for the corrections above).
    name, _, budget = case.partition(" ")
    expected = json.loads(EARLIER_PRESETS.read_text())[case]
    for dotted, value in PAPER_CORRECTIONS.get(case, {}).items():
        *sections, last = dotted.split(".")
        node = expected
        for section in sections:
            node = node[section]
        assert node[last] != value, f"{case}: {dotted} was already {value}"
        node[last] = value
    assert keyed(load_config(name, [budget] if budget else []), mode="json") == expected


def test_a_method_with_a_dataset_is_the_pair_and_a_bare_method_runs_on_digits():
    assert run_source("mtt", "cifar100", 10, "paper") == ("cifar100-mtt", ["ipc=10", "budget=paper"])
    assert run_source("cifar10-mtt", None, None, None) == ("cifar10-mtt", [])
    assert load_config("mtt") == load_config("digits-mtt")
    with pytest.raises(ConfigError, match="unknown dataset 'cifar1000' \\(did you mean cifar100"):
        run_source("mtt", "cifar1000", None, None)
    with pytest.raises(ConfigError, match="--dataset takes a method name"):
        run_source("cifar10-mtt", "cifar100", None, None)


def test_each_value_says_which_layer_set_it():
    res = resolve("cifar10-datm", ["budget=ipc1", "evaluate.seeds=2"])
    assert res.tree["ipc"] == 1
    assert res.source_of("dataset.path") == "dataset card cifar10"
    assert res.source_of("experts.optimizer") == "method datm"
    assert res.source_of("dataset.train_per_class") == "cpu budget (dataset card cifar10)"
    assert res.source_of("experts.num_experts") == "cpu budget datm"
    assert res.source_of("distill.lr_lr") == "cpu budget datm on cifar10 at IPC 1"
    assert res.source_of("evaluate.seeds") == "--set"
    assert res.source_of("evaluate.batch_size") == "default"
    paper = resolve("cifar10-mtt", ["budget=paper"])
    assert paper.source_of("distill.syn_steps").startswith("paper table mtt on cifar10 at IPC 1")


def test_the_ipc_picks_the_budget_row_and_the_paper_budget_keeps_the_pairs_ipc():
    # DATM's CPU run on CIFAR-10 is at IPC 10; asking for IPC 1 takes the IPC 1 row (its fixed window).
    assert load_config("cifar10-datm").ipc == 10
    at_one = load_config("cifar10-datm", ["ipc=1"])
    assert at_one.distill.lr_lr == 1e-7 and at_one.distill.initial_max_start_epoch is None
    assert at_one == load_config("cifar10-datm", ["budget=ipc1"]).model_copy(update={"budget": None})
    # --budget paper alone changes the scale, not the IPC; the earlier paper-ipc<N> names still work.
    assert load_config("cifar10-datm", ["budget=paper"]).ipc == 10
    assert load_config("cifar10-datm", ["budget=paper-ipc50"]).ipc == 50
    assert load_config("cifar10-datm", ["budget=paper", "ipc=50"]).distill == (
        load_config("cifar10-datm", ["budget=paper-ipc50"]).distill
    )
    with pytest.raises(ConfigError, match="unknown budget 'gpu'"):
        load_config("cifar10-mtt", ["budget=gpu"])


def test_a_cpu_run_of_a_new_pair_takes_the_methods_cpu_sizing():
    cfg = load_config("cifar100-mtt", ["ipc=10"])
    assert (cfg.dataset.name, cfg.dataset.train_per_class, cfg.ipc) == ("cifar100", 50, 10)
    assert (cfg.experts.num_experts, cfg.distill.iterations) == (3, 100)  # as CIFAR-10's CPU run


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
    with pytest.raises(ConfigError, match="unknown method 'mt' \\(did you mean mtt\\?\\); methods: mtt, ftd"):
        load_config("digits-mt")
    with pytest.raises(ConfigError, match="unknown dataset 'cifar' \\(did you mean cifar10, cifar100\\?\\)"):
        load_config("cifar-mtt")
    with pytest.raises(ConfigError, match="unknown preset 'digit-mt'.*<dataset>-<method>"):
        load_config("digit-mt")


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


def test_a_yaml_file_can_build_on_a_pair_and_keeps_its_budgets_and_rows(tmp_path: Path):
    path = tmp_path / "datm-long.yaml"
    path.write_text("base: cifar10-datm\ndistill: {iterations: 400}\nevaluate: {seeds: 5}\n")
    cfg = load_config(str(path), ["ipc=1"])
    assert (cfg.name, cfg.method, cfg.dataset.name) == ("datm-long", "datm", "cifar10")
    assert (cfg.distill.iterations, cfg.evaluate.seeds) == (400, 5)
    assert cfg.distill.lr_lr == load_config("cifar10-datm", ["ipc=1"]).distill.lr_lr == 1e-7  # the IPC 1 row
    paper = load_config(str(path), ["budget=paper"])
    assert paper.distill.iterations == 400 and paper.experts.num_experts == 100
    assert resolve(str(path)).source_of("distill.iterations") == f"file {path}"
    path.write_text("base: cifar10-dtm\n")
    with pytest.raises(ConfigError, match="base 'cifar10-dtm' is not a preset; unknown method 'dtm'"):
        load_config(str(path))


def test_presets_lists_the_cards_and_each_methods_paper_rows_and_exclusions():
    from typer.testing import CliRunner

    from condense_flows.cli import app

    out = CliRunner().invoke(app, ["presets"])
    assert out.exit_code == 0
    lines = out.output.splitlines()
    assert lines[0].startswith("digits ") and any(line.startswith("cifar100 ") for line in lines)
    mtt = lines.index(next(line for line in lines if line.startswith("mtt ")))
    assert lines[mtt + 1].split() == [
        "paper",
        *[f"{d}:{'/'.join(map(str, i))}" for d, i in recipes()["mtt"].paper_rows().items()],
    ]
    assert lines[mtt + 2].split() == ["not", "imagenet"]


def test_config_sources_name_each_values_layer():
    from typer.testing import CliRunner

    from condense_flows.cli import app

    out = CliRunner().invoke(
        app, ["config", "mtt", "--dataset", "cifar100", "--ipc", "10", "--budget", "paper", "--sources"]
    )
    assert out.exit_code == 0
    lines = dict(line.split(" = ", 1) for line in out.output.splitlines())
    assert lines["distill.syn_steps"].startswith("20  # paper table mtt on cifar100 at IPC 10")
    assert lines["dataset.path"] == '"data/cifar100-wds"  # dataset card cifar100'
    assert lines["evaluate.batch_size"] == "256  # default"
