"""Networks: the ConvNet family of the distillation literature, any timm architecture, and the
flat-parameter view that unrolled training (MTT) differentiates through."""

from __future__ import annotations

import difflib
import math
import threading
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call

from condense.config import ModelConfig

CONVNET = "convnet"


def default_depth(resolution: int) -> int:
    """Blocks needed to bring the feature map down to 4x4 (32 px -> 3, 64 px -> 4), at least 1."""
    return max(1, round(math.log2(max(resolution, 8) / 4)))


def _norm(kind: str, width: int) -> nn.Module:
    if kind == "instancenorm":
        # MTT's instance norm is GroupNorm with one group per channel: no running statistics,
        # so the functional unroll has no buffers to carry.
        return nn.GroupNorm(width, width, affine=True)
    if kind == "batchnorm":
        return nn.BatchNorm2d(width)
    return nn.Identity()


class ConvNet(nn.Module):
    """ConvNet-D: D x [conv3x3(width) -> norm -> ReLU -> avgpool2], flatten, linear."""

    def __init__(self, channels: int, num_classes: int, resolution: int, cfg: ModelConfig | None = None):
        super().__init__()
        cfg = cfg or ModelConfig()
        depth = cfg.depth or default_depth(resolution)
        if resolution >> depth < 1:
            raise ValueError(f"depth {depth} is too deep for {resolution}px images")
        layers: list[nn.Module] = []
        in_ch = channels
        for _ in range(depth):
            layers += [
                nn.Conv2d(in_ch, cfg.width, 3, padding=1),
                _norm(cfg.norm, cfg.width),
                nn.ReLU(inplace=False),
                nn.AvgPool2d(2),
            ]
            in_ch = cfg.width
        self.features = nn.Sequential(*layers)
        side = resolution >> depth
        self.classifier = nn.Linear(cfg.width * side * side, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (flattened), used by feature-based samplers and matching."""
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


def _adapt_timm_to_small_images(model: nn.Module, channels: int) -> None:
    """ResNet-style stems downsample 4x before the first block; for 8-64 px images the field uses a
    3x3 stride-1 stem and no max-pool (the 'modified ResNet-18' of SRe2L/RDED/CUDD)."""
    conv1 = getattr(model, "conv1", None)
    if isinstance(conv1, nn.Conv2d):
        model.conv1 = nn.Conv2d(channels, conv1.out_channels, 3, stride=1, padding=1, bias=False)
        if hasattr(model, "maxpool"):
            model.maxpool = nn.Identity()


def check_architecture(name: str) -> None:
    """Raise ValueError (with the closest names) unless ``name`` is ``convnet`` or a timm model."""
    if name == CONVNET:
        return
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, [CONVNET, *timm.list_models()], n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown architecture {name!r}{hint}: use 'convnet' or a timm model name")


def build_model(
    name: str,
    channels: int,
    num_classes: int,
    resolution: int,
    cfg: ModelConfig | None = None,
    seed: int = 0,
) -> nn.Module:
    """``convnet`` or any timm architecture name, initialised from ``seed`` (no hub weights).

    Always seeded: stages run in concurrent threads, and a module built from the global RNG would
    draw in the middle of another thread's seeded construction and change its result.
    """
    return seeded(lambda: _build(name, channels, num_classes, resolution, cfg), seed)


def _build(name: str, channels: int, num_classes: int, resolution: int, cfg: ModelConfig | None) -> nn.Module:
    if name == CONVNET:
        return ConvNet(channels, num_classes, resolution, cfg)
    import timm

    check_architecture(name)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=channels)
    if resolution <= 64:
        _adapt_timm_to_small_images(model, channels)
    return model


_INIT_LOCK = threading.Lock()


def seeded(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Build a module whose random initialisation depends only on ``seed``.

    Module constructors draw from the global RNG; the lock and fork_rng keep concurrent task
    threads from interleaving draws, and leave the caller's RNG state untouched.
    """
    with _INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


class FlatParams:
    """All of a module's parameters as one flat vector, and back.

    MTT's student is a point in this flat space: each unrolled SGD step is ``theta - lr * grad``,
    and the forward pass runs the module with views of ``theta`` via ``torch.func.functional_call``.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.names = [n for n, _ in module.named_parameters()]
        self.shapes = [p.shape for _, p in module.named_parameters()]
        self.sizes = [p.numel() for _, p in module.named_parameters()]
        self.numel = sum(self.sizes)

    def flatten(self, module: nn.Module | None = None) -> torch.Tensor:
        params = dict((module or self.module).named_parameters())
        return torch.cat([params[n].detach().reshape(-1) for n in self.names])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        chunks = torch.split(flat, self.sizes)
        return {n: c.view(s) for n, c, s in zip(self.names, chunks, self.shapes, strict=True)}

    def load_into(self, flat: torch.Tensor, module: nn.Module | None = None) -> nn.Module:
        target = module or self.module
        with torch.no_grad():
            for name, value in self.unflatten(flat).items():
                target.get_parameter(name).copy_(value)
        return target

    def __call__(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.module, self.unflatten(flat), (x,))
