import pytest
import torch

from condense.config import ModelConfig
from condense.models import ConvNet, FlatParams, build_model, default_depth, seeded


@pytest.mark.parametrize(("resolution", "depth"), [(8, 1), (16, 2), (32, 3), (64, 4)])
def test_convnet_depth_follows_resolution(resolution: int, depth: int):
    assert default_depth(resolution) == depth
    net = ConvNet(3, 10, resolution)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in net.modules()) == depth
    assert net(torch.randn(2, 3, resolution, resolution)).shape == (2, 10)
    assert net.embed(torch.randn(2, 3, resolution, resolution)).shape == (2, 128 * 16)


def test_convnet_uses_instance_norm_without_running_stats():
    net = ConvNet(1, 10, 32, ModelConfig(width=16))
    assert any(isinstance(m, torch.nn.GroupNorm) and m.num_groups == 16 for m in net.modules())
    assert not list(net.buffers())


def test_flat_params_functional_call_matches_the_module():
    net = ConvNet(1, 10, 8, ModelConfig(width=8))
    flat = FlatParams(net)
    theta = flat.flatten()
    assert theta.shape == (flat.numel,) == (sum(p.numel() for p in net.parameters()),)
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(flat(theta, x), net(x))
    other = ConvNet(1, 10, 8, ModelConfig(width=8))
    flat.load_into(theta, other)
    torch.testing.assert_close(other(x), net(x))


def test_flat_params_are_differentiable_through_an_sgd_step():
    net = ConvNet(1, 3, 8, ModelConfig(width=4))
    flat = FlatParams(net)
    theta = flat.flatten().requires_grad_(True)
    x = torch.randn(5, 1, 8, 8, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(flat(theta, x), torch.tensor([0, 1, 2, 0, 1]))
    (grad,) = torch.autograd.grad(loss, theta, create_graph=True)
    stepped = theta - 0.1 * grad
    (x_grad,) = torch.autograd.grad(stepped.pow(2).sum(), x)
    assert torch.isfinite(x_grad).all() and x_grad.abs().sum() > 0


def test_seeded_init_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = FlatParams(seeded(lambda: ConvNet(1, 10, 8), 7)).flatten()
    b = FlatParams(seeded(lambda: ConvNet(1, 10, 8), 7)).flatten()
    c = FlatParams(seeded(lambda: ConvNet(1, 10, 8), 8)).flatten()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(before, torch.random.get_rng_state())


@pytest.mark.parametrize(("channels", "resolution"), [(1, 8), (3, 32)])
def test_timm_architecture_adapted_to_small_images(channels: int, resolution: int):
    net = build_model("resnet18", channels, 10, resolution)
    assert net.conv1.stride == (1, 1) and net.conv1.kernel_size == (3, 3)
    assert isinstance(net.maxpool, torch.nn.Identity)
    assert net(torch.randn(2, channels, resolution, resolution)).shape == (2, 10)


def test_unknown_architecture_is_rejected():
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("resnet9000", 3, 10, 32)
