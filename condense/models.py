"""Networks: the ConvNet family of the distillation literature, any timm or torchvision classification
architecture, and the flat-parameter view that unrolled training (MTT) differentiates through.

Architecture names: ``convnet``; a bare name is timm's (``resnet18``, ``resnet18.a1_in1k``); the
``torchvision:`` prefix names one of torchvision's classification models (``torchvision:resnet18``), so
a name that both libraries define is never ambiguous.
"""

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
TORCHVISION = "torchvision:"
"""Prefix of torchvision's classification models: ``torchvision:resnet18``."""
NAMING = (
    "use 'convnet', a timm model name (e.g. resnet18) or torchvision:<name> for torchvision's "
    "classification models (e.g. torchvision:resnet18)"
)


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

    def block_activations(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Each block's activation after its ReLU (before pooling), shallowest first, and the
        penultimate features (:meth:`embed`) of the same forward pass."""
        activations = []
        for layer in self.features:
            x = layer(x)
            if isinstance(layer, nn.ReLU):
                activations.append(x)
        return activations, x.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


def _adapt_to_small_images(model: nn.Module, channels: int) -> None:
    """ResNet-style stems downsample 4x before the first block; for 8-64 px images the field uses a
    3x3 stride-1 stem and no max-pool (the 'modified ResNet-18' of SRe2L/RDED/CUDD). timm's and
    torchvision's ResNets (and ResNeXts, Wide ResNets) share the ``conv1``/``maxpool`` names; other
    architectures are left as they are."""
    conv1 = getattr(model, "conv1", None)
    if isinstance(conv1, nn.Conv2d):
        model.conv1 = nn.Conv2d(channels, conv1.out_channels, 3, stride=1, padding=1, bias=False)
        if hasattr(model, "maxpool"):
            model.maxpool = nn.Identity()


def _set_input_channels(model: nn.Module, channels: int) -> None:
    """Give the first convolution ``channels`` inputs (torchvision builds every model for RGB)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.in_channels != channels:
                parent, _, attr = name.rpartition(".")
                conv = nn.Conv2d(
                    channels,
                    module.out_channels,
                    module.kernel_size,  # type: ignore[arg-type]
                    module.stride,  # type: ignore[arg-type]
                    module.padding,  # type: ignore[arg-type]
                    module.dilation,  # type: ignore[arg-type]
                    bias=module.bias is not None,
                    padding_mode=module.padding_mode,
                )
                setattr(model.get_submodule(parent) if parent else model, attr, conv)
            return


def torchvision_name(name: str) -> str | None:
    """torchvision's name for ``torchvision:<name>``; None for any other architecture name."""
    return name[len(TORCHVISION) :] if name.startswith(TORCHVISION) else None


def torchvision_models() -> list[str]:
    """torchvision's classification models (no detection, segmentation, video or quantized ones)."""
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def check_architecture(name: str) -> None:
    """Raise ValueError (with the closest timm and torchvision names) unless ``name`` is ``convnet``,
    a timm model or ``torchvision:<name>`` of a torchvision classification model."""
    if name == CONVNET:
        return
    import timm

    bare = torchvision_name(name)
    if bare is not None and bare in torchvision_models():
        return
    if bare is None and timm.is_model(name):
        return
    wanted = name if bare is None else bare
    from_timm = difflib.get_close_matches(wanted, [CONVNET, *timm.list_models()], n=3)
    from_torchvision = [TORCHVISION + n for n in difflib.get_close_matches(wanted, torchvision_models(), n=3)]
    close = from_timm + from_torchvision if bare is None else from_torchvision + from_timm
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ValueError(f"unknown architecture {name!r}{hint}: {NAMING}")


def build_model(
    name: str,
    channels: int,
    num_classes: int,
    resolution: int,
    cfg: ModelConfig | None = None,
    seed: int = 0,
) -> nn.Module:
    """``convnet``, a timm name or ``torchvision:<name>``, initialised from ``seed`` (never downloads
    weights). Images up to 64 px get the small-image stem (:func:`_adapt_to_small_images`).

    Always seeded: stages run in concurrent threads, and a module built from the global RNG would
    draw in the middle of another thread's seeded construction and change its result.
    """
    return seeded(lambda: _build(name, channels, num_classes, resolution, cfg), seed)


def _build(name: str, channels: int, num_classes: int, resolution: int, cfg: ModelConfig | None) -> nn.Module:
    if name == CONVNET:
        return ConvNet(channels, num_classes, resolution, cfg)
    check_architecture(name)
    bare = torchvision_name(name)
    if bare is not None:
        return _build_torchvision(bare, channels, num_classes, resolution)
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=channels)
    if resolution <= 64:
        _adapt_to_small_images(model, channels)
    return model


# Their auxiliary heads are training-time extras: without them the model returns one tensor, as every
# other does, and its state_dict has the keys of torchvision's published weights.
_AUX_HEADS = {"googlenet", "inception_v3"}


def _build_torchvision(name: str, channels: int, num_classes: int, resolution: int) -> nn.Module:
    import torchvision

    extra: dict[str, bool] = {"aux_logits": False, "init_weights": True} if name in _AUX_HEADS else {}
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **extra)
    if resolution <= 64:
        _adapt_to_small_images(model, channels)
    _set_input_channels(model, channels)
    return model


_INIT_LOCK = threading.Lock()


def seeded(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Build a module whose random initialisation depends only on ``seed``.

    Module constructors draw from the global CPU RNG; the lock and fork_rng keep concurrent task
    threads from interleaving draws, and leave the caller's RNG state untouched. Only the CPU
    generator is seeded (``torch.manual_seed`` would reseed every GPU's too, under the feet of jobs
    running there).
    """
    with _INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
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
