"""The noise predictor eps_theta(x_t, t): time embedding, residual blocks, attention, U-Net.

Two networks live here:

* :class:`MinimalUNet`, the smallest network that works: two resolution levels and the
  time embedding added as a per-channel bias. The U-Net chapter starts from it.
* :class:`UNet`, the network of Ho et al. (2020) in a configurable size: residual blocks
  with GroupNorm and time conditioning, self-attention at low resolution, skip
  connections between the down and up paths, and optional class conditioning with a
  learned "null" class for classifier-free guidance.

Both map ``(x_t, t) -> eps``: x_t of shape (B, C, H, W), t an integer tensor of shape (B,)
(0-based timesteps), eps of shape (B, C, H, W).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import check_values, integer, integer_dtype, integers, real

Tensor = torch.Tensor


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Transformer-style sinusoidal embedding of timesteps (Vaswani et al. 2017).

    Component pairs ``(sin(t w_k), cos(t w_k))`` with frequencies
    ``w_k = max_period ** (-k / (dim/2))``, k = 0 .. dim/2 - 1.
    ``t``: (B,) integers or floats. Returns (B, dim) float32.
    Taught in chapter 4, "The time embedding".
    """
    _check_embedding_dim("the embedding dimension", dim)
    if t.ndim != 1:
        raise ValueError(f"timesteps t must have shape (B,), got {tuple(t.shape)}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def _check_embedding_dim(name: str, dim) -> int:
    """A sinusoidal embedding is made of (sin, cos) pairs: its size must be an even integer >= 2."""
    dim = integer(name, dim, minimum=2)
    if dim % 2:
        raise ValueError(f"{name} must be even (the sinusoidal time embedding is made of sin/cos "
                         f"pairs), got {dim}")
    return dim


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding followed by a two-layer MLP: (B,) -> (B, dim).
    Taught in chapter 4, "The time embedding"."""

    def __init__(self, dim: int, sinusoid_dim: int | None = None):
        super().__init__()
        self.sinusoid_dim = sinusoid_dim or dim
        self.mlp = nn.Sequential(nn.Linear(self.sinusoid_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        # in the MLP's dtype, so a network converted with .half() or .bfloat16() works too
        return self.mlp(sinusoidal_embedding(t, self.sinusoid_dim).to(self.mlp[0].weight.dtype))


def _groups(channels: int, max_groups: int = 32, min_group_size: int = 4) -> int:
    """GroupNorm groups for ``channels``: the most (at most ``max_groups``) that divide
    ``channels`` and keep at least ``min_group_size`` channels in each group."""
    for g in range(min(max_groups, channels // min_group_size), 1, -1):
        if channels % g == 0:
            return g
    return 1


class ResBlock(nn.Module):
    """A residual block conditioned on the embedding ``emb`` (time, and class if any),
    as in Ho et al. (2020)::

        h = conv1(SiLU(GroupNorm(x))) + Linear(SiLU(emb))     # one bias per channel
        out = skip(x) + conv2(Dropout(SiLU(GroupNorm(h))))

    GroupNorm subtracts each group's mean, so it removes the part of the bias shared by a
    group; groups of several channels (see ``_groups``) keep the rest, the time signal.
    (B, C_in, H, W), (B, D) -> (B, C_out, H, W).
    Taught in chapter 4, "Residual blocks".
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_channels), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_channels)
        self.norm2 = nn.GroupNorm(_groups(out_channels), out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, with a residual connection.
    (B, C, H, W) -> (B, C, H, W). Taught in chapter 4, "Self-attention at low resolution"."""

    def __init__(self, channels: int, num_heads: int = 1):
        super().__init__()
        if channels % integer("num_heads", num_heads, minimum=1) != 0:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.num_heads, C // self.num_heads, H * W).unbind(1)
        # (B, heads, H*W, C/heads) for scaled_dot_product_attention
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(B, C, H, W))


class Downsample(nn.Module):
    """Halve H and W with a stride-2 convolution.
    Taught in chapter 4, "Down, up and the skip connections"."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour upsampling, then a convolution.
    Taught in chapter 4, "Down, up and the skip connections"."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _check_input(x: Tensor, t: Tensor, in_channels: int, divisor: int, weight: Tensor):
    """Validate (x_t, t) for a network whose first layer has ``weight``; return t as a (B,)
    tensor on x's device. Shape, dtype and device checks only (free); the one value check,
    integral float timesteps, runs where :func:`ddpm_lib.checks.check_values` allows."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(f"x_t must be a tensor of shape (B, C, H, W), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    B, C, H, W = x.shape
    if C != in_channels:
        raise ValueError(f"the network expects {in_channels} input channel(s), got x_t with {C}")
    if H % divisor or W % divisor:
        raise ValueError(f"H and W must be divisible by {divisor} for this network's "
                         f"{int(math.log2(divisor))} downsampling step(s), got {H}x{W}")
    _check_input_dtype(x, weight)
    if t is None or isinstance(t, (str, bytes)):
        raise ValueError(f"t must be integer timesteps, an int or a tensor of shape ({B},), "
                         f"got {t!r}")
    t = torch.as_tensor(t, device=x.device)
    if t.is_complex() or t.dtype == torch.bool or (t.is_floating_point() and check_values()
                                                    and not torch.equal(t, t.round())):
        raise ValueError(f"timesteps must be integers (0-based), got dtype {t.dtype}")
    if t.ndim == 0:
        t = t.expand(B)
    if t.shape != (B,):
        raise ValueError(f"t must have shape ({B},) for a batch of {B}, got {tuple(t.shape)}")
    return t


def _check_input_dtype(x: Tensor, weight: Tensor) -> None:
    """x_t must be a float tensor on the network's device, of its weights' dtype (under
    autocast, any float dtype but float64: autocast converts it)."""
    if x.device != weight.device:
        raise ValueError(f"x_t is on {x.device} but the network is on {weight.device}: "
                         f"move one of them, e.g. x_t.to({str(weight.device)!r})")
    if not x.is_floating_point():
        raise ValueError("x_t must be a floating-point tensor (images in [-1, 1]), "
                         f"got dtype {x.dtype}: convert it with x_t.float()")
    if x.dtype != weight.dtype and (x.dtype == torch.float64
                                    or not torch.is_autocast_enabled(x.device.type)):
        raise ValueError(f"x_t has dtype {x.dtype} but the network's weights are {weight.dtype}: "
                         f"convert it with x_t.to({weight.dtype}) (x_t.float() for float32)")


class MinimalUNet(nn.Module):
    """The smallest useful noise predictor: two resolution levels and a skip connection,
    the time embedding added as a per-channel bias after each block.

    (B, C, H, W), (B,) -> (B, C, H, W); H and W must be even.
    Taught in chapter 4, "A minimal U-Net".
    """

    def __init__(self, in_channels: int = 1, channels: int = 32, time_dim: int = 64):
        super().__init__()
        in_channels = integer("in_channels", in_channels, minimum=1)
        channels = integer("channels", channels, minimum=1)
        time_dim = _check_embedding_dim("time_dim", time_dim)
        self.in_channels = in_channels
        self.time_embedding = TimeEmbedding(time_dim)
        self.enc = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1), nn.SiLU())
        self.down = nn.Sequential(nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1), nn.SiLU())
        self.mid = nn.Sequential(nn.Conv2d(2 * channels, 2 * channels, 3, padding=1), nn.SiLU())
        self.up = nn.ConvTranspose2d(2 * channels, channels, 4, stride=2, padding=1)
        self.dec = nn.Sequential(nn.Conv2d(2 * channels, channels, 3, padding=1), nn.SiLU())
        self.out = nn.Conv2d(channels, in_channels, 3, padding=1)
        # the time embedding becomes one bias per channel at each level
        self.bias_enc = nn.Linear(time_dim, channels)
        self.bias_mid = nn.Linear(time_dim, 2 * channels)
        self.bias_dec = nn.Linear(time_dim, channels)

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        t = _check_input(x_t, t, self.in_channels, 2, self.out.weight)
        emb = self.time_embedding(t)
        h1 = self.enc(x_t) + self.bias_enc(emb)[:, :, None, None]            # (B, c, H, W)
        h2 = self.mid(self.down(h1)) + self.bias_mid(emb)[:, :, None, None]  # (B, 2c, H/2, W/2)
        h = self.dec(torch.cat([self.up(h2), h1], dim=1)) + self.bias_dec(emb)[:, :, None, None]
        return self.out(h)                                                   # (B, C, H, W)


class UNet(nn.Module):
    """The DDPM U-Net (Ho et al. 2020), configurable. Taught in chapter 4, "The DDPM U-Net";
    class conditioning in chapter 9, "A class label as a second input".

    Args:
        in_channels: image channels C (1 for Fashion-MNIST, 3 for CIFAR-10).
        base_channels: channels at the first level; level i has ``base_channels * channel_mults[i]``.
        channel_mults: one multiplier per resolution level; there are ``len(channel_mults) - 1``
            downsamplings, so H and W must be divisible by ``2 ** (len(channel_mults) - 1)``.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attention_resolutions: the spatial sizes (H) at which self-attention is used,
            e.g. ``(7,)`` for the 7x7 level of a 28x28 image.
        dropout: dropout rate inside the residual blocks.
        num_classes: if set, the network is class-conditional: ``forward(x_t, t, y)`` with
            labels y in ``0 .. num_classes - 1``; the extra label ``num_classes`` (or y=None)
            is the learned null class used by classifier-free guidance.
        image_size: H (= W) of the inputs, used to place attention.
        num_heads: attention heads.

    ``forward(x_t, t, y=None)``: (B, C, H, W), (B,), (B,) -> eps of shape (B, C, H, W).
    """

    def __init__(self, in_channels: int = 1, base_channels: int = 64, channel_mults=(1, 2, 2),
                 num_res_blocks: int = 2, attention_resolutions=(7,), dropout: float = 0.1,
                 num_classes: int | None = None, image_size: int = 28, num_heads: int = 4):
        super().__init__()
        in_channels = integer("in_channels", in_channels, minimum=1)
        base_channels = _check_embedding_dim("base_channels", base_channels)
        channel_mults = integers("channel_mults", channel_mults, minimum=1)
        if not channel_mults:
            raise ValueError("channel_mults must be a non-empty sequence of positive ints "
                             "(one per level), got ()")
        num_res_blocks = integer("num_res_blocks", num_res_blocks, minimum=1)
        attention_resolutions = integers("attention_resolutions", attention_resolutions, minimum=1)
        if num_classes is not None:
            num_classes = integer("num_classes", num_classes, minimum=1)
        image_size = integer("image_size", image_size, minimum=1)
        num_heads = integer("num_heads", num_heads, minimum=1)
        if image_size % 2 ** (len(channel_mults) - 1):
            raise ValueError(f"image_size {image_size} is not divisible by 2**{len(channel_mults) - 1}, "
                             f"needed for {len(channel_mults)} levels")
        if not 0 <= real("dropout", dropout) < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        _check_heads(num_heads, base_channels, channel_mults, attention_resolutions, image_size)
        self.config = dict(in_channels=in_channels, base_channels=base_channels,
                           channel_mults=list(channel_mults), num_res_blocks=num_res_blocks,
                           attention_resolutions=list(attention_resolutions), dropout=dropout,
                           num_classes=num_classes, image_size=image_size, num_heads=num_heads)
        self.in_channels, self.num_classes = in_channels, num_classes
        self.divisor = 2 ** (len(channel_mults) - 1)
        emb_dim = 4 * base_channels
        self.time_embedding = TimeEmbedding(emb_dim, sinusoid_dim=base_channels)
        # label num_classes is the "null" label: no class information
        self.class_embedding = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None

        def level_blocks(c_in, c_out, res):
            return ResBlock(c_in, c_out, emb_dim, dropout), (
                AttentionBlock(c_out, num_heads) if res in attention_resolutions else nn.Identity())

        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels = [base_channels]
        ch, res = base_channels, image_size
        for i, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                block, attn = level_blocks(ch, base_channels * mult, res)
                self.down.append(nn.ModuleList([block, attn]))
                ch = base_channels * mult
                skip_channels.append(ch)
            if i < len(channel_mults) - 1:
                self.down.append(Downsample(ch))
                skip_channels.append(ch)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, dropout),
                                  AttentionBlock(ch, num_heads),
                                  ResBlock(ch, ch, emb_dim, dropout)])
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(channel_mults))):
            for _ in range(num_res_blocks + 1):
                block, attn = level_blocks(ch + skip_channels.pop(), base_channels * mult, res)
                self.up.append(nn.ModuleList([block, attn]))
                ch = base_channels * mult
            if i > 0:
                self.up.append(Upsample(ch))
                res *= 2
        self.norm_out = nn.GroupNorm(_groups(ch), ch)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)

    def forward(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        t = _check_input(x_t, t, self.in_channels, self.divisor, self.conv_in.weight)
        emb = self.time_embedding(t)
        if self.class_embedding is not None:
            if y is None:
                y = torch.full_like(t, self.num_classes, dtype=torch.long)
            y = torch.as_tensor(y, device=x_t.device)
            integer_dtype("class labels y", y, "; convert them with y.long()")
            if y.shape != t.shape:
                raise ValueError(f"labels y must have shape {tuple(t.shape)}, got {tuple(y.shape)}")
            # (a value check reads the labels back from the GPU: skipped where checks.py says)
            if y.numel() and check_values() and (y.min() < 0 or y.max() > self.num_classes):
                raise ValueError(f"labels must lie in 0..{self.num_classes - 1} "
                                 f"(or {self.num_classes} for 'no class')")
            emb = emb + self.class_embedding(y.long())
        elif y is not None:
            raise ValueError("this UNet is unconditional (num_classes=None) but labels y were given")

        h = self.conv_in(x_t)
        skips = [h]
        for layer in self.down:
            if isinstance(layer, Downsample):
                h = layer(h)
            else:
                block, attn = layer
                h = attn(block(h, emb))
            skips.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, emb)), emb)
        for layer in self.up:
            if isinstance(layer, Upsample):
                h = layer(h)
            else:
                block, attn = layer
                h = attn(block(torch.cat([h, skips.pop()], dim=1), emb))
        return self.conv_out(F.silu(self.norm_out(h)))


def _check_heads(num_heads: int, base_channels: int, channel_mults, attention_resolutions,
                 image_size: int) -> None:
    """num_heads must divide the channels of every attention layer: the levels whose size is in
    ``attention_resolutions`` and the middle block (the last level's channels)."""
    sizes = [image_size // 2 ** i for i in range(len(channel_mults))]
    channels = {base_channels * m for m, size in zip(channel_mults, sizes)
                if size in attention_resolutions}
    channels.add(base_channels * channel_mults[-1])
    if any(c % num_heads for c in channels):
        raise ValueError(f"num_heads ({num_heads}) must divide the channels of every attention "
                         f"layer, {sorted(channels)} here: choose a num_heads that divides "
                         f"{math.gcd(*channels)}")


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters. Used in chapter 4, "Parameters of the minimal network"
    and "Where the parameters live"."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
