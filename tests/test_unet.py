import pytest
import torch

from ddpm_lib.unet import AttentionBlock, MinimalUNet, ResBlock, UNet, count_parameters, sinusoidal_embedding


def test_sinusoidal_embedding():
    t = torch.tensor([0, 1, 500])
    e = sinusoidal_embedding(t, 8)
    assert e.shape == (3, 8)
    assert torch.allclose(e[0], torch.tensor([0, 0, 0, 0, 1, 1, 1, 1.0]))
    # first frequency is 1: sin(t), last is 10000**(-3/4)
    assert e[1, 0].item() == pytest.approx(torch.sin(torch.tensor(1.0)).item())
    assert e[2, 3].item() == pytest.approx(torch.sin(torch.tensor(500 * 10000 ** (-3 / 4))).item(), abs=1e-6)
    # distinct timesteps get distinct embeddings
    all_t = sinusoidal_embedding(torch.arange(1000), 64)
    assert torch.cdist(all_t, all_t).add(torch.eye(1000) * 10).min() > 0.01
    with pytest.raises(ValueError):
        sinusoidal_embedding(t, 7)


def test_blocks_keep_shapes():
    x, emb = torch.randn(2, 16, 7, 7), torch.randn(2, 32)
    assert ResBlock(16, 24, 32)(x, emb).shape == (2, 24, 7, 7)
    assert AttentionBlock(16, num_heads=4)(x).shape == x.shape


@pytest.mark.parametrize("net", [
    lambda: MinimalUNet(),
    lambda: UNet(base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(14,)),
    lambda: UNet(in_channels=3, base_channels=16, channel_mults=(1, 2, 2), num_res_blocks=1,
                 attention_resolutions=(8,), image_size=32),
])
def test_output_shape_and_time_dependence(net):
    torch.manual_seed(0)
    model = net().eval()
    c, size = model.in_channels, (32 if model.in_channels == 3 else 28)
    x = torch.randn(2, c, size, size)
    out0 = model(x, torch.tensor([0, 0]))
    out1 = model(x, torch.tensor([999, 999]))
    assert out0.shape == x.shape
    assert (out0 - out1).abs().mean() > 1e-4  # the network sees time


def test_class_conditional_unet():
    torch.manual_seed(0)
    model = UNet(base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(), num_classes=10).eval()
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([10, 10])
    a, b = model(x, t, torch.tensor([0, 0])), model(x, t, torch.tensor([5, 5]))
    assert (a - b).abs().mean() > 1e-5
    assert torch.equal(model(x, t), model(x, t, torch.tensor([10, 10])))  # None = null class
    with pytest.raises(ValueError, match="labels"):
        model(x, t, torch.tensor([11, 0]))
    with pytest.raises(ValueError, match="unconditional"):
        UNet(base_channels=16, channel_mults=(1,), num_res_blocks=1, attention_resolutions=())(x, t, torch.tensor([1, 1]))


def test_ddpm_cifar_network_size():
    """The configuration of Ho et al. (2020) for CIFAR-10 has 35.7M parameters."""
    model = UNet(in_channels=3, base_channels=128, channel_mults=(1, 2, 2, 2), num_res_blocks=2,
                 attention_resolutions=(16,), dropout=0.1, image_size=32)
    assert count_parameters(model) == pytest.approx(35.7e6, rel=0.01)


def test_bad_inputs_raise():
    model = UNet(base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=())
    with pytest.raises(ValueError, match="channel"):
        model(torch.randn(2, 3, 28, 28), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="shape"):
        model(torch.randn(1, 28, 28), torch.tensor([1]))
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(2, 1, 27, 27), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="t must have shape"):
        model(torch.randn(2, 1, 28, 28), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="divisible"):
        UNet(channel_mults=(1, 2, 2, 2), image_size=28)
    with pytest.raises(ValueError, match="dropout"):
        UNet(dropout=1.5)
