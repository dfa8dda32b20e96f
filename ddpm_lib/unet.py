"""The noise predictor eps_theta(x_t, t): the networks, assembled from the
blocks of :mod:`ddpm_lib.layers`.

* :class:`MinimalUNet`, the smallest network that works: two resolution
  levels and the time embedding added as a per-channel bias. The U-Net
  chapter starts from it.
* :class:`UNet`, the network of Ho et al. (2020) in a configurable size:
  residual blocks with GroupNorm and time conditioning, self-attention at
  low resolution, skip connections between the down and up paths, and
  optional class conditioning with a learned "null" class for
  classifier-free guidance.

Both map ``(x_t, t) -> eps``: x_t of shape (B, C, H, W), t an integer tensor
of shape (B,) (0-based timesteps), eps of shape (B, C, H, W). Chapter 4
prints them, so lines are at most 76 characters.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import check_values, integer, integer_dtype, integers, real
from .layers import (
    AttentionBlock,
    Downsample,
    ResBlock,
    TimeEmbedding,
    Upsample,
    _check_embedding_dim,
    _groups,
    sinusoidal_embedding,
)

Tensor = torch.Tensor


def _check_input(
    x: Tensor, t: Tensor, in_channels: int, divisor: int, weight: Tensor
):
    """Validate (x_t, t) for a network whose first layer has ``weight``;
    return t as a (B,) tensor on x's device. Shape, dtype and device
    checks only (free); the one value check, integral float timesteps,
    runs where :func:`ddpm_lib.checks.check_values` allows."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        is_tensor = isinstance(x, torch.Tensor)
        got = tuple(x.shape) if is_tensor else type(x).__name__
        raise ValueError(
            f"x_t must be a tensor of shape (B, C, H, W), got {got}"
        )
    B, C, H, W = x.shape
    if C != in_channels:
        raise ValueError(
            f"the network expects {in_channels} input channel(s), got x_t "
            f"with {C}"
        )
    if H % divisor or W % divisor:
        raise ValueError(
            f"H and W must be divisible by {divisor} for this network's "
            f"{int(math.log2(divisor))} downsampling step(s), got {H}x{W}"
        )
    _check_input_dtype(x, weight)
    if t is None or isinstance(t, (str, bytes)):
        raise ValueError(
            "t must be integer timesteps, an int or a tensor of shape "
            f"({B},), got {t!r}"
        )
    t = torch.as_tensor(t, device=x.device)
    if (
        t.is_complex()
        or t.dtype == torch.bool
        or (
            t.is_floating_point()
            and check_values()
            and not torch.equal(t, t.round())
        )
    ):
        raise ValueError(
            f"timesteps must be integers (0-based), got dtype {t.dtype}"
        )
    if t.ndim == 0:
        t = t.expand(B)
    if t.shape != (B,):
        raise ValueError(
            f"t must have shape ({B},) for a batch of {B}, got "
            f"{tuple(t.shape)}"
        )
    return t


def _check_input_dtype(x: Tensor, weight: Tensor) -> None:
    """x_t must be a float tensor on the network's device, of its weights'
    dtype (under autocast, any float dtype but float64: autocast converts
    it)."""
    if x.device != weight.device:
        raise ValueError(
            f"x_t is on {x.device} but the network is on {weight.device}: "
            f"move one of them, e.g. x_t.to({str(weight.device)!r})"
        )
    if not x.is_floating_point():
        raise ValueError(
            "x_t must be a floating-point tensor (images in [-1, 1]), "
            f"got dtype {x.dtype}: convert it with x_t.float()"
        )
    if x.dtype != weight.dtype and (
        x.dtype == torch.float64
        or not torch.is_autocast_enabled(x.device.type)
    ):
        raise ValueError(
            f"x_t has dtype {x.dtype} but the network's weights are "
            f"{weight.dtype}: "
            f"convert it with x_t.to({weight.dtype}) (x_t.float() for "
            "float32)"
        )


class MinimalUNet(nn.Module):
    """The smallest useful noise predictor: two resolution levels and a skip
    connection, the time embedding added as a per-channel bias after each
    block.

    (B, C, H, W), (B,) -> (B, C, H, W); H and W must be even. Taught in
    chapter 4, "A minimal U-Net"."""

    def __init__(
        self, in_channels: int = 1, channels: int = 32, time_dim: int = 64
    ):
        super().__init__()
        in_channels = integer("in_channels", in_channels, minimum=1)
        channels = integer("channels", channels, minimum=1)
        time_dim = _check_embedding_dim("time_dim", time_dim)
        self.in_channels = in_channels
        self.time_embedding = TimeEmbedding(time_dim)
        self.enc = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1), nn.SiLU()
        )
        self.down = nn.Sequential(
            nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1),
            nn.SiLU(),
        )
        self.mid = nn.Sequential(
            nn.Conv2d(2 * channels, 2 * channels, 3, padding=1), nn.SiLU()
        )
        self.up = nn.ConvTranspose2d(
            2 * channels, channels, 4, stride=2, padding=1
        )
        self.dec = nn.Sequential(
            nn.Conv2d(2 * channels, channels, 3, padding=1), nn.SiLU()
        )
        self.out = nn.Conv2d(channels, in_channels, 3, padding=1)
        # the time embedding becomes one bias per channel at each level
        self.bias_enc = nn.Linear(time_dim, channels)
        self.bias_mid = nn.Linear(time_dim, 2 * channels)
        self.bias_dec = nn.Linear(time_dim, channels)

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        t = _check_input(x_t, t, self.in_channels, 2, self.out.weight)
        emb = self.time_embedding(t)
        # (B, c, H, W)
        h1 = self.enc(x_t) + self.bias_enc(emb)[:, :, None, None]
        # (B, 2c, H/2, W/2)
        h2 = self.mid(self.down(h1)) + self.bias_mid(emb)[:, :, None, None]
        h = (
            self.dec(torch.cat([self.up(h2), h1], dim=1))
            + self.bias_dec(emb)[:, :, None, None]
        )
        return self.out(h)  # (B, C, H, W)


class UNet(nn.Module):
    """The DDPM U-Net (Ho et al. 2020), configurable. Taught in chapter 4,
    "The DDPM U-Net"; class conditioning in chapter 9, "A class label as a
    second input".

    Args:
        in_channels: image channels C (1 for Fashion-MNIST, 3 for CIFAR-10).
        base_channels: channels at the first level; level i has
            ``base_channels * channel_mults[i]``.
        channel_mults: one multiplier per resolution level; there are
            ``len(channel_mults) - 1`` downsamplings, so H and W must be
            divisible by ``2 ** (len(channel_mults) - 1)``.
        num_res_blocks: residual blocks per level on the way down (one
            more on the way up).
        attention_resolutions: the spatial sizes (H) at which
            self-attention is used, e.g. ``(7,)`` for the 7x7 level of a
            28x28 image.
        dropout: dropout rate inside the residual blocks.
        num_classes: if set, the network is class-conditional:
            ``forward(x_t, t, y)`` with labels y in
            ``0 .. num_classes - 1``; the extra label ``num_classes`` (or y=None) is the learned null
            class used by classifier-free guidance.
        image_size: H (= W) of the inputs, used to place attention.
        num_heads: attention heads.

    ``forward(x_t, t, y=None)``: (B, C, H, W), (B,), (B,) -> eps of shape
    (B, C, H, W).
    """

    def __init__(
        self,
        in_channels: int = 1,
        base_channels: int = 64,
        channel_mults=(1, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions=(7,),
        dropout: float = 0.1,
        num_classes: int | None = None,
        image_size: int = 28,
        num_heads: int = 4,
    ):
        super().__init__()
        in_channels = integer("in_channels", in_channels, minimum=1)
        base_channels = _check_embedding_dim("base_channels", base_channels)
        channel_mults = integers("channel_mults", channel_mults, minimum=1)
        if not channel_mults:
            raise ValueError(
                "channel_mults must be a non-empty sequence of positive "
                "ints "
                "(one per level), got ()"
            )
        num_res_blocks = integer(
            "num_res_blocks", num_res_blocks, minimum=1
        )
        attention_resolutions = integers(
            "attention_resolutions", attention_resolutions, minimum=1
        )
        if num_classes is not None:
            num_classes = integer("num_classes", num_classes, minimum=1)
        image_size = integer("image_size", image_size, minimum=1)
        num_heads = integer("num_heads", num_heads, minimum=1)
        if image_size % 2 ** (len(channel_mults) - 1):
            raise ValueError(
                f"image_size {image_size} is not divisible by "
                f"2**{len(channel_mults) - 1}, "
                f"needed for {len(channel_mults)} levels"
            )
        if not 0 <= real("dropout", dropout) < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        _check_heads(
            num_heads,
            base_channels,
            channel_mults,
            attention_resolutions,
            image_size,
        )
        self.config = dict(
            in_channels=in_channels,
            base_channels=base_channels,
            channel_mults=list(channel_mults),
            num_res_blocks=num_res_blocks,
            attention_resolutions=list(attention_resolutions),
            dropout=dropout,
            num_classes=num_classes,
            image_size=image_size,
            num_heads=num_heads,
        )
        self.in_channels, self.num_classes = in_channels, num_classes
        self.divisor = 2 ** (len(channel_mults) - 1)
        emb_dim = 4 * base_channels
        self.time_embedding = TimeEmbedding(
            emb_dim, sinusoid_dim=base_channels
        )
        # label num_classes is the "null" label: no class information
        self.class_embedding = (
            nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        )

        def level_blocks(c_in, c_out, res):
            return ResBlock(c_in, c_out, emb_dim, dropout), (
                AttentionBlock(c_out, num_heads)
                if res in attention_resolutions
                else nn.Identity()
            )

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
        self.mid = nn.ModuleList(
            [
                ResBlock(ch, ch, emb_dim, dropout),
                AttentionBlock(ch, num_heads),
                ResBlock(ch, ch, emb_dim, dropout),
            ]
        )
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(channel_mults))):
            for _ in range(num_res_blocks + 1):
                block, attn = level_blocks(
                    ch + skip_channels.pop(), base_channels * mult, res
                )
                self.up.append(nn.ModuleList([block, attn]))
                ch = base_channels * mult
            if i > 0:
                self.up.append(Upsample(ch))
                res *= 2
        self.norm_out = nn.GroupNorm(_groups(ch), ch)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)

    def forward(
        self, x_t: Tensor, t: Tensor, y: Tensor | None = None
    ) -> Tensor:
        t = _check_input(
            x_t, t, self.in_channels, self.divisor, self.conv_in.weight
        )
        emb = self.time_embedding(t)
        if self.class_embedding is not None:
            if y is None:
                y = torch.full_like(t, self.num_classes, dtype=torch.long)
            y = torch.as_tensor(y, device=x_t.device)
            integer_dtype(
                "class labels y", y, "; convert them with y.long()"
            )
            if y.shape != t.shape:
                raise ValueError(
                    f"labels y must have shape {tuple(t.shape)}, got "
                    f"{tuple(y.shape)}"
                )
            # (a value check reads the labels back from the GPU: skipped
            # where checks.py says)
            if (
                y.numel()
                and check_values()
                and (y.min() < 0 or y.max() > self.num_classes)
            ):
                raise ValueError(
                    f"labels must lie in 0..{self.num_classes - 1} "
                    f"(or {self.num_classes} for 'no class')"
                )
            emb = emb + self.class_embedding(y.long())
        elif y is not None:
            raise ValueError(
                "this UNet is unconditional (num_classes=None) but labels "
                "y were given"
            )

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


def _check_heads(
    num_heads: int,
    base_channels: int,
    channel_mults,
    attention_resolutions,
    image_size: int,
) -> None:
    """num_heads must divide the channels of every attention layer: the
    levels whose size is in ``attention_resolutions`` and the middle
    block (the last level's channels)."""
    sizes = [image_size // 2**i for i in range(len(channel_mults))]
    channels = {
        base_channels * m
        for m, size in zip(channel_mults, sizes)
        if size in attention_resolutions
    }
    channels.add(base_channels * channel_mults[-1])
    if any(c % num_heads for c in channels):
        raise ValueError(
            f"num_heads ({num_heads}) must divide the channels of every "
            "attention "
            f"layer, {sorted(channels)} here: choose a num_heads that "
            "divides "
            f"{math.gcd(*channels)}"
        )


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters. Used in chapter 4, "Parameters of the
    minimal network" and "Where the parameters live"."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
