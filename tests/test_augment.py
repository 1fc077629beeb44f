"""DSA augmentation (condense.augment) and ZCA whitening (condense.zca)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from condense.augment import dsa
from condense.config import DSAConfig
from condense.zca import apply_zca, fit_zca, invert_zca

FAMILIES = ["color", "crop", "cutout", "flip", "scale", "rotate"]
LINEAR = ["crop", "cutout", "flip", "scale", "rotate"]  # geometric families: linear in the pixels
SHAPES = [(4, 1, 8, 8), (4, 3, 32, 32)]


def _images(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_same_seed_same_output_different_seeds_differ() -> None:
    x = _images((6, 3, 16, 16))
    cfg = DSAConfig()
    outs = [dsa(x, cfg, seed) for seed in range(6)]
    for seed, out in enumerate(outs):
        assert torch.equal(dsa(x, cfg, seed), out)
    assert sum(not torch.equal(outs[0], out) for out in outs[1:]) >= 4


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_shape_dtype_kept_and_image_changed(family: str, shape: tuple[int, ...]) -> None:
    x = _images(shape)
    y = dsa(x, DSAConfig(strategy=family, flip=1.0), seed=1)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert not torch.allclose(y, x)


def test_global_rng_untouched_and_ignored() -> None:
    x = _images((4, 3, 16, 16))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = dsa(x, DSAConfig(), seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)
    assert torch.equal(dsa(x, DSAConfig(), seed=5), a)


@pytest.mark.parametrize("family", LINEAR)
def test_siamese_same_transform_for_different_pixels(family: str) -> None:
    # Linear families: equal transforms on a, b and a + 2b iff dsa is linear across calls.
    cfg = DSAConfig(strategy=family)
    a, b = _images((8, 3, 16, 16), 1), _images((8, 3, 16, 16), 2)
    for seed in range(3):
        torch.testing.assert_close(dsa(a + 2 * b, cfg, seed), dsa(a, cfg, seed) + 2 * dsa(b, cfg, seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_siamese_across_batch_sizes_and_per_image(family: str) -> None:
    cfg = DSAConfig(strategy=family)
    x = _images((16, 3, 16, 16))
    torch.testing.assert_close(dsa(x[:5], cfg, 7), dsa(x, cfg, 7)[:5])
    # Parameters are per image: one picture repeated is not transformed identically everywhere.
    same = dsa(x[:1].expand(16, -1, -1, -1).contiguous(), cfg, 7)
    assert any(not torch.allclose(same[0], same[i]) for i in range(1, 16))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_first_and_second_order(family: str, shape: tuple[int, ...]) -> None:
    cfg = DSAConfig(strategy=family)
    x = _images(shape).requires_grad_()
    w = _images(shape, seed=3)
    (grad,) = torch.autograd.grad((dsa(x, cfg, 2) * w).sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # Second order, as in an unrolled inner loop: differentiate a gradient again.
    (grad,) = torch.autograd.grad((dsa(x, cfg, 2) ** 2 * w).sum(), x, create_graph=True)
    (hvp,) = torch.autograd.grad((grad * w).sum(), x)
    assert torch.isfinite(hvp).all() and hvp.abs().sum() > 0


@pytest.mark.parametrize("shape", SHAPES)
def test_flip_always_and_never(shape: tuple[int, ...]) -> None:
    x = _images(shape)
    assert torch.equal(dsa(x, DSAConfig(strategy="flip", flip=1.0), 0), x.flip(3))
    assert torch.equal(dsa(x, DSAConfig(strategy="flip", flip=0.0), 0), x)


@pytest.mark.parametrize("shape", SHAPES)
def test_zero_strength_geometry_is_identity(shape: tuple[int, ...]) -> None:
    x = _images(shape)
    assert torch.equal(dsa(x, DSAConfig(strategy="crop", crop=0.0), 0), x)
    assert torch.equal(dsa(x, DSAConfig(strategy="cutout", cutout=0.0), 0), x)
    torch.testing.assert_close(dsa(x, DSAConfig(strategy="rotate", rotate=0.0), 0), x)
    torch.testing.assert_close(dsa(x, DSAConfig(strategy="scale", scale=1.0), 0), x)


def test_crop_is_a_zero_filled_integer_shift_within_range() -> None:
    x = _images((12, 2, 8, 8)) + 5  # offset so zero fill is distinguishable from pixels
    y = dsa(x, DSAConfig(strategy="crop", crop=0.25), seed=4)  # shifts in [-2, 2]
    padded = F.pad(x, [2, 2, 2, 2])
    seen = set()
    for i in range(len(x)):
        shifts = [
            (dy, dx)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            if torch.equal(y[i], padded[i, :, 2 + dy : 10 + dy, 2 + dx : 10 + dx])
        ]
        assert len(shifts) == 1
        seen.add(shifts[0])
    assert len(seen) > 3


def test_cutout_zeroes_one_clipped_square() -> None:
    x = torch.ones(32, 3, 8, 8)
    y = dsa(x, DSAConfig(strategy="cutout", cutout=0.5), seed=0)  # side int(8 * 0.5 + 0.5) = 4
    assert torch.equal(y[:, :1].expand_as(y), y)  # same hole in every channel
    for img in y[:, 0]:
        rows, cols = (img == 0).any(1).nonzero(), (img == 0).any(0).nonzero()
        assert 1 <= len(rows) <= 4 and 1 <= len(cols) <= 4
        assert int((img == 0).sum()) == len(rows) * len(cols)  # a (clipped) rectangle
    assert (y == 0).flatten(1).sum(1).eq(4 * 4 * 3).any()  # unclipped squares occur too


def test_color_is_per_image_affine_on_grayscale() -> None:
    # One channel: saturation is a no-op, brightness then contrast is y = c * x + d with c in [0.5, 1.5).
    x = _images((8, 1, 8, 8))
    y = dsa(x, DSAConfig(strategy="color"), seed=0)
    xf, yf = x.flatten(1), y.flatten(1)
    xc, yc = xf - xf.mean(1, keepdim=True), yf - yf.mean(1, keepdim=True)
    c = (xc * yc).sum(1) / (xc * xc).sum(1)
    torch.testing.assert_close(yc, c[:, None] * xc, atol=1e-5, rtol=1e-5)
    assert ((c >= 0.5) & (c < 1.5)).all() and c.std() > 0.05


def test_one_family_per_call_chosen_at_random() -> None:
    x = _images((4, 3, 8, 8))
    cfg = DSAConfig(strategy="flip_cutout", flip=1.0)
    flipped = [torch.equal(dsa(x, cfg, seed), x.flip(3)) for seed in range(40)]
    assert 8 <= sum(flipped) <= 32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_matches_cpu(family: str) -> None:
    x = _images((8, 3, 32, 32))
    cfg = DSAConfig(strategy=family)
    y = dsa(x.cuda(), cfg, 11)
    assert y.is_cuda
    torch.testing.assert_close(y.cpu(), dsa(x, cfg, 11), atol=1e-4, rtol=1e-4)


def _correlated_data(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    d = 3 * 4 * 4
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    std = torch.logspace(-2, 0.5, d, dtype=torch.float64)  # variances 1e-4 .. 10
    z = torch.randn(n, d, generator=g, dtype=torch.float64) * std
    return (z @ q.T + 0.5).float().reshape(n, 3, 4, 4)


def test_zca_whitens_dominant_directions_and_round_trips() -> None:
    x = _correlated_data(3000)  # more than one fitting chunk
    zca = fit_zca(x)
    assert zca.mean.shape == (48,) and zca.transform.shape == zca.inverse.shape == (48, 48)
    assert zca.transform.dtype == torch.float32
    w = apply_zca(x, zca)
    assert w.shape == x.shape and w.dtype == x.dtype
    torch.testing.assert_close(invert_zca(w, zca), x, atol=1e-4, rtol=0)

    raw = torch.linalg.eigvalsh(torch.cov(x.flatten(1).double().T))
    white = torch.linalg.eigvalsh(torch.cov(w.flatten(1).double().T))
    # Whitened variances are S / (S + eps): ~1 where S >> eps, never above 1.
    torch.testing.assert_close(white, raw / (raw + 0.1), atol=1e-4, rtol=1e-3)
    assert white[raw > 2].min() > 0.95 and white.max() < 1 + 1e-4
    assert white[-1] / white[0] < (raw[-1] / raw[0]) / 50
    assert w.flatten(1).mean(0).abs().max() < 1e-4


def test_zca_matches_direct_formula() -> None:
    x = _correlated_data(300)
    flat = x.flatten(1).double()
    s, u = torch.linalg.eigh(torch.cov(flat.T))
    expected = (flat - flat.mean(0)) @ (u @ torch.diag((s + 0.1).rsqrt()) @ u.T)
    torch.testing.assert_close(apply_zca(x, fit_zca(x)).flatten(1).double(), expected, atol=1e-4, rtol=1e-4)
