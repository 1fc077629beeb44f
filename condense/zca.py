"""ZCA whitening as MTT uses it (kornia ``ZCAWhitening(eps=0.1, compute_inv=True)``), in plain torch."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

__all__ = ["ZCA", "apply_zca", "fit_zca", "fit_zca_chunks", "invert_zca"]

CHUNK = 2048
"""Images per accumulation step of a fit (fixed: the chunking decides the float64 rounding)."""


@dataclass
class ZCA:
    """Fitted whitening of flattened images: ``(x - mean) @ transform``; ``inverse`` undoes it."""

    mean: torch.Tensor  # (D,)
    transform: torch.Tensor  # (D, D)
    inverse: torch.Tensor  # (D, D)


def fit_zca(x: torch.Tensor, eps: float = 0.1) -> ZCA:
    """Fit on (N, C, H, W) images: unbiased covariance, T = U diag(1/sqrt(S+eps)) U^T."""
    flat = x.detach().reshape(x.shape[0], -1)
    return fit_zca_chunks(lambda: flat.split(CHUNK), eps)


def fit_zca_chunks(chunks: Callable[[], Iterable[torch.Tensor]], eps: float = 0.1) -> ZCA:
    """:func:`fit_zca` over flattened images that need not fit in memory: ``chunks()`` is a fresh
    pass over them as (n_i, D) tensors, in a fixed order; it is called twice (the mean, then the
    covariance). Accumulated in float64 chunk by chunk, so D=3072 needs only a few D x D buffers, and
    the same images in the same chunks give the same bits however they are read."""
    mean: torch.Tensor | None = None
    n = 0
    for chunk in chunks():
        total = chunk.double().sum(0)
        mean = total if mean is None else mean + total
        n += len(chunk)
    if mean is None or n < 2:
        raise ValueError(f"fit_zca needs at least 2 images, got {n}")
    mean /= n
    cov = torch.zeros(len(mean), len(mean), dtype=torch.float64, device=mean.device)
    for chunk in chunks():
        centred = chunk.double() - mean
        cov.addmm_(centred.T, centred)
    cov /= n - 1
    s, u = torch.linalg.eigh(cov)
    # eigh can return tiny negative eigenvalues for rank-deficient data; the covariance is PSD.
    s = s.clamp(min=0) + eps
    transform = (u * s.rsqrt()) @ u.T
    inverse = (u * s.sqrt()) @ u.T
    return ZCA(mean=mean.float(), transform=transform.float(), inverse=inverse.float())


def _exact(x: torch.Tensor) -> torch.dtype:
    """float64 where matrix multiplies would round to TF32 (CUDA's fast mode), so that whitening
    gives the CPU's numbers on a GPU; the input's own type elsewhere."""
    return torch.float64 if x.is_cuda and torch.backends.cuda.matmul.allow_tf32 else x.dtype


def apply_zca(x: torch.Tensor, zca: ZCA) -> torch.Tensor:
    """Whiten (N, ...) images; same shape out, differentiable in x."""
    dtype = _exact(x)
    t = zca.transform.to(x.device, dtype)
    bias = -(zca.mean.to(x.device, dtype) @ t)
    # addmm folds the centring into the bias, so no centred copy of x is materialised.
    return torch.addmm(bias, x.reshape(x.shape[0], -1).to(dtype), t).reshape(x.shape).to(x.dtype)


def invert_zca(x: torch.Tensor, zca: ZCA) -> torch.Tensor:
    """Map whitened images back to pixel space; same shape out, differentiable in x."""
    return torch.addmm(zca.mean.to(x), x.reshape(x.shape[0], -1), zca.inverse.to(x)).reshape(x.shape)
