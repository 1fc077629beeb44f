"""Differentiable Siamese Augmentation (DSA, Zhao & Bilen, ICML 2021), as in the DC/DSA/MTT code.

``dsa`` picks one family per call ('S' mode, as MTT) and draws per-image parameters from a CPU
generator seeded by the caller, so a real and a synthetic batch augmented with the same seed get the
same transform image by image, and the result does not depend on the device or the global RNG.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from condense.config import DSAConfig
from condense.devices import upload

__all__ = ["dsa"]


def _uniform(g: torch.Generator, n: int, k: int) -> torch.Tensor:
    """(n, k) float32 uniforms in [0, 1) on the CPU.

    Row i holds image i's parameters; the CPU generator fills row-major, so a batch of n and one of
    m > n share their first n rows (siamese across batch sizes).
    """
    return torch.rand(n, k, generator=g)


def _randint(g: torch.Generator, n: int, highs: tuple[int, ...]) -> torch.Tensor:
    """(n, len(highs)) integers, column j in [0, highs[j]), on the CPU; same row layout as ``_uniform``."""
    u = torch.rand(n, len(highs), generator=g, dtype=torch.float64)
    high = torch.tensor(highs, dtype=torch.float64)
    # clamp: u * high can round up to high.
    return torch.minimum((u * high).floor(), high - 1).long()


def _color(x: torch.Tensor, cfg: DSAConfig, g: torch.Generator) -> torch.Tensor:
    r = upload(_uniform(g, x.shape[0], 3).view(-1, 3, 1, 1, 1), x.device).to(x.dtype)
    x = x + (r[:, 0] - 0.5) * cfg.brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (r[:, 1] * cfg.saturation) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (r[:, 2] + cfg.contrast) + mean


def affine_grid(theta: torch.Tensor, height: int, width: int, align_corners: bool) -> torch.Tensor:
    """``F.affine_grid(theta, (n, c, height, width), align_corners)`` written elementwise: on CUDA
    affine_grid is a batched matrix multiply, which TF32 rounds to 10 bits of mantissa, and sampling
    positions that far off would make a GPU's augmentations differ from the CPU's."""

    def base(size: int) -> torch.Tensor:  # pixel centres in [-1, 1], computed as affine_grid does
        steps = torch.linspace(-1, 1, size, device=theta.device, dtype=theta.dtype)
        if size == 1:
            return torch.zeros_like(steps)
        return steps if align_corners else steps * ((size - 1) / size)

    xs, ys = base(width).view(1, 1, -1), base(height).view(1, -1, 1)
    t = theta.view(-1, 6, 1, 1)
    grid_x = t[:, 0] * xs + t[:, 1] * ys + t[:, 2]
    grid_y = t[:, 3] * xs + t[:, 4] * ys + t[:, 5]
    return torch.stack([grid_x, grid_y], dim=-1)


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = affine_grid(theta, x.shape[2], x.shape[3], align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def _scale(x: torch.Tensor, cfg: DSAConfig, g: torch.Generator) -> torch.Tensor:
    ratio = cfg.scale
    s = _uniform(g, x.shape[0], 2) * (ratio - 1.0 / ratio) + 1.0 / ratio
    zero = torch.zeros_like(s[:, 0])
    theta = torch.stack([s[:, 0], zero, zero, zero, s[:, 1], zero], dim=1).view(-1, 2, 3)
    return _affine(x, upload(theta, x.device).to(x.dtype))


def _rotate(x: torch.Tensor, cfg: DSAConfig, g: torch.Generator) -> torch.Tensor:
    angle = (_uniform(g, x.shape[0], 1)[:, 0] - 0.5) * 2 * cfg.rotate / 180 * math.pi
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    theta = torch.stack([cos, -sin, zero, sin, cos, zero], dim=1).view(-1, 2, 3)
    return _affine(x, upload(theta, x.device).to(x.dtype))


def _flip(x: torch.Tensor, cfg: DSAConfig, g: torch.Generator) -> torch.Tensor:
    flip = upload((_uniform(g, x.shape[0], 1) < cfg.flip).view(-1, 1, 1, 1), x.device)
    return torch.where(flip, x.flip(3), x)


def _crop(x: torch.Tensor, cfg: DSAConfig, g: torch.Generator) -> torch.Tensor:
    """DSA's "translation": shift by whole pixels with zero fill, as a gather from a padded copy."""
    n, _, h, w = x.shape
    sh, sw = int(h * cfg.crop + 0.5), int(w * cfg.crop + 0.5)
    shift = upload(_randint(g, n, (2 * sh + 1, 2 * sw + 1)) - torch.tensor([sh, sw]), x.device)
    # Indices into the 1-pixel zero-padded image; clamping sends every out-of-image read to the border.
    rows = (torch.arange(h, device=x.device) + shift[:, :1] + 1).clamp(0, h + 1)
    cols = (torch.arange(w, device=x.device) + shift[:, 1:] + 1).clamp(0, w + 1)
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    padded = F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)
    return padded[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def _cutout(x: torch.Tensor, cfg: DSAConfig, g: torch.Generator) -> torch.Tensor:
    """Zero a size x size square centred at a random pixel (clipped at the borders), as rand_cutout."""
    n, _, h, w = x.shape
    size_h, size_w = int(h * cfg.cutout + 0.5), int(w * cfg.cutout + 0.5)
    # DSA's centre range: one extra position for even sizes, so the square can touch both edges.
    centre = upload(_randint(g, n, (h + 1 - size_h % 2, w + 1 - size_w % 2)), x.device)
    top = centre[:, :1] - size_h // 2
    left = centre[:, 1:] - size_w // 2
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    in_rows = (rows >= top) & (rows < top + size_h)
    in_cols = (cols >= left) & (cols < left + size_w)
    hole = in_rows[:, None, :, None] & in_cols[:, None, None, :]
    return x * (~hole).to(x.dtype)


_FAMILIES: dict[str, Callable[[torch.Tensor, DSAConfig, torch.Generator], torch.Tensor]] = {
    "color": _color,
    "crop": _crop,
    "cutout": _cutout,
    "flip": _flip,
    "scale": _scale,
    "rotate": _rotate,
}


def dsa(x: torch.Tensor, cfg: DSAConfig, seed: int) -> torch.Tensor:
    """Apply one family drawn uniformly from ``cfg.strategy`` with per-image parameters.

    Everything random comes from ``torch.Generator().manual_seed(seed)`` on the CPU: the same seed
    and batch size give the same transform per index, whatever the pixels or the device.
    """
    g = torch.Generator().manual_seed(seed)
    families = cfg.strategy.split("_")
    family = families[int(torch.randint(len(families), (1,), generator=g))]
    return _FAMILIES[family](x, cfg, g).contiguous()
