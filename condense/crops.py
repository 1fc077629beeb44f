"""Box-level augmentations of the decoupled methods (RDED, SRe2L, FKD), with their parameters as data.

Every random choice (a random-resized-crop box, a flip, a CutMix box, a patch permutation) is drawn
first as numbers and applied second, so the same numbers can be stored and replayed later: that is
what FKD-style stored relabeling needs. Boxes are fractions of the image side, ``(top, left,
height, width)``, so they do not depend on the resolution they are applied at.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from condense.augment import affine_grid
from condense.devices import upload


def random_resized_boxes(
    n: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> torch.Tensor:
    """(n, 4) RandomResizedCrop boxes: area fraction uniform in ``scale``, log aspect ratio uniform in
    ``ratio``. A side that would exceed the image is clamped to it (where torchvision retries and
    then falls back to a centre crop)."""
    u = torch.rand(n, 4, generator=generator, dtype=torch.float64)
    area = scale[0] + u[:, 0] * (scale[1] - scale[0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + u[:, 1] * (log_hi - log_lo))
    width = torch.sqrt(area * aspect).clamp(max=1.0)
    height = torch.sqrt(area / aspect).clamp(max=1.0)
    top = u[:, 2] * (1 - height)
    left = u[:, 3] * (1 - width)
    return torch.stack([top, left, height, width], dim=1).float()


def crop_resize(
    x: torch.Tensor, boxes: torch.Tensor, size: int, flips: torch.Tensor | None = None
) -> torch.Tensor:
    """Cut ``boxes`` (n, 4) out of ``x`` (n, C, H, W), resize each to ``size`` x ``size`` (bilinear)
    and mirror those with ``flips`` set; one batched ``grid_sample``."""
    top, left, height, width = upload(boxes, x.device).to(x.dtype).unbind(1)
    sign = torch.ones_like(width) if flips is None else 1 - 2 * upload(flips, x.device).to(x.dtype)
    zero = torch.zeros_like(width)
    # Output coordinate u in [-1, 1] maps to input 2 * (left + (u + 1) / 2 * width) - 1.
    theta = torch.stack(
        [width * sign, zero, 2 * left + width - 1, zero, height, 2 * top + height - 1], dim=1
    ).view(-1, 2, 3)
    grid = affine_grid(theta, size, size, align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def cutmix_boxes(n: int, beta: float, prob: float, generator: torch.Generator) -> torch.Tensor:
    """(n, 4) CutMix boxes, one per batch: lambda ~ Beta(beta, beta), a square-ish box of area
    1 - lambda centred uniformly and clipped to the image (as in the CutMix paper's code); an empty
    box (no mixing) with probability 1 - ``prob``."""
    u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    lam = _beta(beta, n, generator) if beta > 0 else torch.ones(n, dtype=torch.float64)
    cut = torch.sqrt(1 - lam)
    cy, cx = u[:, 0], u[:, 1]
    top, bottom = (cy - cut / 2).clamp(0, 1), (cy + cut / 2).clamp(0, 1)
    left, right = (cx - cut / 2).clamp(0, 1), (cx + cut / 2).clamp(0, 1)
    applied = torch.rand(n, generator=generator, dtype=torch.float64) < prob
    boxes = torch.stack([top, left, bottom - top, right - left], dim=1)
    return torch.where(applied[:, None], boxes, torch.zeros_like(boxes)).float()


def _beta(concentration: float, n: int, generator: torch.Generator) -> torch.Tensor:
    """Beta(a, a) samples drawn from ``generator`` (torch.distributions would use the global RNG):
    G1 / (G1 + G2) with G1, G2 ~ Gamma(a)."""
    a = torch.full((n,), concentration, dtype=torch.float64)
    g1 = torch._standard_gamma(a, generator=generator)
    g2 = torch._standard_gamma(a, generator=generator)
    return g1 / (g1 + g2)


def pixel_box(box: torch.Tensor, side: int) -> tuple[int, int, int, int]:
    """A fractional box as integer rows/columns ``(y0, y1, x0, x1)`` of a ``side`` x ``side`` image."""
    top, left, height, width = (float(v) for v in box)
    y0, x0 = round(top * side), round(left * side)
    return y0, max(y0, round((top + height) * side)), x0, max(x0, round((left + width) * side))


def cutmix(x: torch.Tensor, partner: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Paste the ``box`` region of ``x[partner]`` into ``x`` (one box for the whole batch)."""
    y0, y1, x0, x1 = pixel_box(box, x.shape[-1])
    if y1 == y0 or x1 == x0:
        return x
    mixed = x.clone()
    mixed[:, :, y0:y1, x0:x1] = x[partner][:, :, y0:y1, x0:x1]
    return mixed


def shuffle_patches(x: torch.Tensor, perms: torch.Tensor, factor: int) -> torch.Tensor:
    """Rearrange each image's ``factor`` x ``factor`` grid of patches by its row of ``perms``
    (n, factor^2): RDED's ShufflePatches for stitched images."""
    if factor == 1:
        return x
    n, c, h, w = x.shape
    ph, pw = h // factor, w // factor
    grid = (
        x.view(n, c, factor, ph, factor, pw).permute(0, 2, 4, 1, 3, 5).reshape(n, factor * factor, c, ph, pw)
    )
    grid = grid[torch.arange(n, device=x.device)[:, None], upload(perms.long(), x.device)]
    return grid.view(n, factor, factor, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)


def stitch(patches: torch.Tensor, factor: int) -> torch.Tensor:
    """Tile consecutive groups of ``factor``^2 patches (row-major) into one image each."""
    if factor == 1:
        return patches
    m, c, ph, pw = patches.shape
    grid = patches.view(m // factor**2, factor, factor, c, ph, pw)
    return grid.permute(0, 3, 1, 4, 2, 5).reshape(-1, c, factor * ph, factor * pw)
