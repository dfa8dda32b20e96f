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


SMALL = dict(base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(14,))


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_res_blocks=-1), "num_res_blocks must be an integer >= 1"),
    (dict(num_res_blocks=0), "num_res_blocks must be an integer >= 1"),
    (dict(base_channels=0), "base_channels must be an integer >= 2"),
    (dict(base_channels=-8), "base_channels must be an integer >= 2"),
    (dict(base_channels=7), "base_channels must be even"),
    (dict(base_channels=16.0), "base_channels must be an integer"),
    (dict(num_heads=0), "num_heads must be an integer >= 1"),
    (dict(num_heads=3), r"num_heads \(3\) must divide the channels of every attention layer, \[32"),
    (dict(in_channels=0), "in_channels must be an integer >= 1"),
    (dict(channel_mults=(1.5, 2)), r"channel_mults\[0\] must be an integer"),
    (dict(channel_mults=()), "channel_mults must be a non-empty sequence"),
    (dict(channel_mults=2), "channel_mults must be a sequence of integers"),
    (dict(attention_resolutions=("14",)), r"attention_resolutions\[0\] must be an integer"),
    (dict(attention_resolutions=(14.0,)), r"attention_resolutions\[0\] must be an integer"),
    (dict(dropout=-0.1), r"dropout must be in \[0, 1\)"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(dropout="0.1"), "dropout must be a finite real number"),
    (dict(num_classes=0), "num_classes must be an integer >= 1"),
    (dict(num_classes=10.0), "num_classes must be an integer >= 1"),
    (dict(image_size=0), "image_size must be an integer >= 1"),
    (dict(image_size=27), "image_size 27 is not divisible by 2"),
])
def test_unet_arguments_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UNet(**{**SMALL, **kwargs})


def test_minimal_unet_arguments_are_checked():
    for kwargs, message in ((dict(channels=0), "channels"), (dict(in_channels=1.0), "in_channels"),
                            (dict(time_dim=7), "time_dim must be even")):
        with pytest.raises(ValueError, match=message):
            MinimalUNet(**kwargs)


def test_building_blocks_check_their_arguments():
    with pytest.raises(ValueError, match="num_heads must be an integer >= 1"):
        AttentionBlock(8, num_heads=0)
    with pytest.raises(ValueError, match=r"t must have shape \(B,\)"):
        sinusoidal_embedding(torch.zeros(2, 1), 8)


def test_every_attention_layer_has_num_heads_heads():
    """num_heads must divide every attention layer's channels: no silent fall-back to one head."""
    model = UNet(**SMALL, num_heads=8)
    heads = {m.num_heads for m in model.modules() if isinstance(m, AttentionBlock)}
    assert heads == {8}


def test_labels_must_be_integers():
    from ddpm_lib.checks import trusted_inputs
    model = UNet(**SMALL, num_classes=10).eval()
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([1, 2])
    for y in (1.5, torch.tensor([1.0, 2.0]), torch.tensor([True, False])):
        with pytest.raises(ValueError, match="class labels y must be integers"):
            model(x, t, y)
    with trusted_inputs():     # a dtype check costs nothing: it runs there too
        with pytest.raises(ValueError, match="class labels y must be integers"):
            model(x, t, torch.tensor([1.0, 2.0]))
    assert model(x, t, torch.tensor([1, 2], dtype=torch.int32)).shape == x.shape
    assert model(x, t.double()).shape == x.shape       # whole-number float t, and y=None


def test_inputs_of_the_wrong_dtype_or_device():
    model = UNet(**SMALL).eval()
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"x_t has dtype torch.float64 .*x_t.float\(\)"):
        model(x.double(), t)
    for dtype in (torch.long, torch.uint8):
        with pytest.raises(ValueError, match=r"floating-point .*x_t.float\(\)"):
            model(x.to(dtype), t)
    with pytest.raises(ValueError, match="x_t is on meta but the network is on cpu"):
        model(x.to("meta"), t)
    for bad_t in (None, "5", torch.tensor([1.5, 2.0]), torch.tensor([True, False])):
        with pytest.raises(ValueError, match="t must|timesteps must"):
            model(x, bad_t)
    with torch.autocast("cpu", dtype=torch.bfloat16):      # autocast converts float32 x_t itself
        assert model(x, t).shape == x.shape
    assert model.to(torch.bfloat16)(x.bfloat16(), t).dtype == torch.bfloat16
