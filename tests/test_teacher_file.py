"""A teacher given as a file of any ConvNet, timm or ``torchvision:`` architecture: the networks, the
checkpoint forms that load, the one-line errors of those that do not, and the teacher stage."""

from __future__ import annotations

import argparse
import pathlib
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from condense import artifacts, models, teacher
from condense.config import ModelConfig
from condense.configure import load_config
from condense.errors import ConfigError
from condense.store import Store
from tests.conftest import plan_for, run_jobs

TV_RESNET = "torchvision:resnet18"


def _randomise_norm_statistics(model: nn.Module, seed: int) -> nn.Module:
    """Running statistics away from (0, 1), so a teacher that did not get them answers differently."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def small_image_resnet18(channels: int, num_classes: int, seed: int = 123) -> nn.Module:
    """What SRe2L and RDED train for small images, written the way they write it (not via condense):
    torchvision's ResNet-18 with a 3x3 stride-1 stem and no max-pool."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return _randomise_norm_statistics(model, seed)


def imagenet_resnet18(num_classes: int = 1000, seed: int = 123) -> nn.Module:
    """``torchvision.models.resnet18()`` as a user saves it for ImageNet (random weights, no download)."""
    torch.manual_seed(seed)
    return _randomise_norm_statistics(
        torchvision.models.resnet18(weights=None, num_classes=num_classes), seed
    )


def _same_answers(a: nn.Module, b: nn.Module, x: torch.Tensor) -> bool:
    with torch.no_grad():
        return torch.allclose(a.eval()(x), b.eval()(x), atol=1e-5)


# ----------------------------------------------------------------------------- networks and names


def test_torchvision_names_build_seeded_networks_with_the_small_image_stem():
    a = models.build_model(TV_RESNET, 1, 10, 8, seed=0)
    b = models.build_model(TV_RESNET, 1, 10, 8, seed=0)
    c = models.build_model(TV_RESNET, 1, 10, 8, seed=1)
    assert isinstance(a, torchvision.models.ResNet)
    flat = [models.FlatParams(m).flatten() for m in (a, b, c)]
    assert torch.equal(flat[0], flat[1]) and not torch.equal(flat[0], flat[2])
    assert a.conv1.kernel_size == (3, 3) and a.conv1.stride == (1, 1) and a.conv1.in_channels == 1
    assert isinstance(a.maxpool, nn.Identity)
    assert a(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    # Above 64 px the ImageNet stem stays; the first convolution of any model takes the data's channels.
    big = models.build_model(TV_RESNET, 3, 10, 96)
    assert big.conv1.kernel_size == (7, 7) and isinstance(big.maxpool, nn.MaxPool2d)
    squeeze = models.build_model("torchvision:squeezenet1_1", 1, 7, 32)
    assert squeeze.features[0].in_channels == 1
    assert squeeze.eval()(torch.randn(2, 1, 32, 32)).shape == (2, 7)


def test_unknown_names_suggest_timm_and_torchvision_names():
    with pytest.raises(ValueError, match="unknown architecture") as typo:
        models.check_architecture("torchvision:resnt18")
    assert "torchvision:resnet18" in str(typo.value) and " resnet18," in str(typo.value)
    # A torchvision name without the prefix is not timm's: the message points at the prefixed name.
    with pytest.raises(ValueError) as bare:
        models.check_architecture("shufflenet_v2_x1_0")
    assert "torchvision:shufflenet_v2_x1_0" in str(bare.value) and "torchvision:<name>" in str(bare.value)
    models.check_architecture(TV_RESNET)
    models.check_architecture("resnet18")  # bare names stay timm's
    file = ["teacher.source=file", "teacher.path=observer.pt"]
    assert load_config("digits-rded", [*file, f"teacher.arch={TV_RESNET}"]).teacher.arch == TV_RESNET
    with pytest.raises(ConfigError, match="'teacher.arch'.*torchvision:resnet18"):
        load_config("digits-rded", [*file, "teacher.arch=torchvision:resnt18"])


# ----------------------------------------------------------------------------- files that load


def test_a_torchvision_imagenet_state_dict_loads(tmp_path: Path):
    source = imagenet_resnet18(num_classes=10)
    torch.save(source.state_dict(), tmp_path / "resnet18.pt")
    model = models.build_model(TV_RESNET, 3, 10, 72)  # above 64 px: the ImageNet stem
    x = torch.randn(2, 3, 72, 72)
    assert not _same_answers(model, source, x)
    loaded = teacher.load_teacher_file(tmp_path / "resnet18.pt", model, TV_RESNET)
    assert loaded is model and not loaded.training
    assert _same_answers(loaded, source, x)


def _prefixed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"module.{k}": v for k, v in state.items()}


@pytest.mark.parametrize(
    "form",
    [
        lambda s: {"state_dict": s, "epoch": 90, "best_acc1": torch.tensor(71.5), "arch": "resnet18"},
        lambda s: {"model": s, "epoch": 90, "args": argparse.Namespace(arch="resnet18", lr=0.1)},
        _prefixed,
        lambda s: {"model": _prefixed(s), "optimizer": {"state": {}, "param_groups": []}},
    ],
    ids=["state_dict", "model_with_args", "module_prefix", "model_with_module_prefix"],
)
def test_checkpoint_dicts_and_data_parallel_names_load(form, tmp_path: Path):
    source = small_image_resnet18(channels=1, num_classes=10)
    torch.save(form(source.state_dict()), tmp_path / "observer.pt")
    model = models.build_model(TV_RESNET, 1, 10, 8)
    x = torch.randn(4, 1, 8, 8)
    assert not _same_answers(model, source, x)
    teacher.load_teacher_file(tmp_path / "observer.pt", model, TV_RESNET)
    assert _same_answers(model, source, x)


# ----------------------------------------------------------------------------- files that do not


def _load_error(path: Path, model: nn.Module, arch: str | None) -> str:
    with pytest.raises(ConfigError) as err:
        teacher.load_teacher_file(path, model, arch)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_a_head_for_other_classes_is_one_line(tmp_path: Path):
    path = tmp_path / "imagenet.pt"
    torch.save(imagenet_resnet18().state_dict(), path)
    message = _load_error(path, models.build_model(TV_RESNET, 3, 10, 96), TV_RESNET)
    assert (
        message
        == f"teacher file {path} has a 1000-class head (fc.weight 1000x512) but the dataset has 10 classes"
    )
    # For small images the ImageNet stem does not fit either, and the line says why.
    small = _load_error(path, models.build_model(TV_RESNET, 3, 10, 32), TV_RESNET)
    assert small.startswith(f"teacher file {path} has a 1000-class head (fc.weight 1000x512)")
    assert "1 other tensor differs too, e.g. conv1.weight (64x3x7x7 in the file, 64x3x3x3 here)" in small
    assert "3x3 stride-1 stem" in small


def test_another_architecture_names_missing_and_unexpected_keys(tmp_path: Path):
    path = tmp_path / "convnet.pt"
    convnet = models.build_model(models.CONVNET, 1, 10, 8, ModelConfig(width=8))
    torch.save(convnet.state_dict(), path)
    resnet = models.build_model(TV_RESNET, 1, 10, 8)
    missing = [k for k in resnet.state_dict() if not k.endswith("num_batches_tracked")]
    message = _load_error(path, resnet, TV_RESNET)
    assert message == (
        f"teacher file {path} does not fit the teacher architecture ({TV_RESNET}): "
        f"{len(missing)} missing keys ({', '.join(missing[:3])}, ...); "
        f"{len(convnet.state_dict())} unexpected keys "
        "(features.0.weight, features.0.bias, features.1.weight, ...)"
    )
    # A deeper ResNet of the same family: only missing keys.
    torch.save(imagenet_resnet18().state_dict(), path)
    deeper = _load_error(
        path, models.build_model("torchvision:resnet34", 3, 1000, 96), "torchvision:resnet34"
    )
    assert "missing keys (layer1.2.conv1.weight" in deeper and "unexpected" not in deeper


def test_files_without_a_state_dict_are_one_line(tmp_path: Path):
    model = models.build_model(TV_RESNET, 1, 10, 8)
    torch.save({"epoch": 3, "arch": "resnet18"}, tmp_path / "empty.pt")
    assert "holds a dict with keys epoch, arch, not a state_dict" in _load_error(
        tmp_path / "empty.pt", model, TV_RESNET
    )
    weights = small_image_resnet18(1, 10).state_dict()
    torch.save({"model": weights, "root": pathlib.PurePosixPath("/data")}, tmp_path / "foreign.pt")
    message = _load_error(tmp_path / "foreign.pt", model, TV_RESNET)
    assert "not a readable state_dict" in message and "holds a pathlib.PurePosixPath object" in message


# ----------------------------------------------------------------------------- the teacher stage


def test_the_teacher_stage_loads_a_torchvision_file_and_readers_rebuild_it(tmp_path: Path):
    path = tmp_path / "observer.pt"
    source = small_image_resnet18(channels=1, num_classes=10)
    torch.save({"model": source.state_dict(), "args": argparse.Namespace(arch="resnet18")}, path)
    tiny = ["dataset.train_per_class=5", "teacher.source=file", f"teacher.path={path}"]
    cfg = load_config("digits-rded", [*tiny, f"teacher.arch={TV_RESNET}"])
    store = Store(tmp_path / "store")
    plan = plan_for(store, cfg)
    (outcome,) = run_jobs(store, cfg, plan, {"teacher"})
    assert outcome["meta"]["arch"] == TV_RESNET and outcome["meta"]["network"]["arch"] == TV_RESNET
    rebuilt = artifacts.load_teacher(store, plan.keys["teacher"])
    assert isinstance(rebuilt, torchvision.models.ResNet) and rebuilt.conv1.kernel_size == (3, 3)
    assert _same_answers(rebuilt, source, torch.randn(4, 1, 8, 8))
    # The architecture's name is part of the key: timm's resnet18 reads the same file (same names)
    # but is another network.
    timm_cfg = load_config("digits-rded", [*tiny, "teacher.arch=resnet18"])
    assert plan_for(store, timm_cfg).keys["teacher"] != plan.keys["teacher"]
    # An ImageNet file for this 10-class dataset fails in the stage with the one-line head error.
    torch.save(imagenet_resnet18().state_dict(), path)
    cfg = load_config("digits-rded", [*tiny, f"teacher.arch={TV_RESNET}"])
    with pytest.raises(ConfigError, match="has a 1000-class head"):
        run_jobs(store, cfg, plan_for(store, cfg), {"teacher"})
