"""The building blocks of the noise predictor: time embedding, residual
blocks, self-attention, cross-attention to text, and down/up sampling.
:mod:`ddpm_lib.unet` assembles them into networks. Chapters 4 and 12
print these classes next to the text, so lines are at most 76 characters
(the width of the rendered book's code column).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import integer

Tensor = torch.Tensor


def sinusoidal_embedding(
    t: Tensor, dim: int, max_period: float = 10000.0
) -> Tensor:
    """Transformer-style sinusoidal embedding of timesteps (Vaswani et al.
    2017).

    Component pairs ``(sin(t w_k), cos(t w_k))`` with frequencies
    ``w_k = max_period ** (-k / (dim/2))``, k = 0 .. dim/2 - 1.
    ``t``: (B,) integers or floats. Returns (B, dim) float32.
    Taught in chapter 4, "The time embedding".
    """
    _check_embedding_dim("the embedding dimension", dim)
    if t.ndim != 1:
        raise ValueError(
            f"timesteps t must have shape (B,), got {tuple(t.shape)}"
        )
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period)
        * torch.arange(half, device=t.device, dtype=torch.float32)
        / half
    )
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def _check_embedding_dim(name: str, dim) -> int:
    """A sinusoidal embedding is made of (sin, cos) pairs: its size must be
    an even integer >= 2."""
    dim = integer(name, dim, minimum=2)
    if dim % 2:
        raise ValueError(
            f"{name} must be even (the sinusoidal time embedding is made "
            f"of sin/cos pairs), got {dim}"
        )
    return dim


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding followed by a two-layer MLP: (B,) -> (B, dim).
    Taught in chapter 4, "The time embedding"."""

    def __init__(self, dim: int, sinusoid_dim: int | None = None):
        super().__init__()
        self.sinusoid_dim = sinusoid_dim or dim
        self.mlp = nn.Sequential(
            nn.Linear(self.sinusoid_dim, dim),
            nn.SiLU(),
            nn.Linear(dim, dim),
        )

    def forward(self, t: Tensor) -> Tensor:
        # in the MLP's dtype, so a network converted with .half() or
        # .bfloat16() works too
        return self.mlp(
            sinusoidal_embedding(t, self.sinusoid_dim).to(
                self.mlp[0].weight.dtype
            )
        )


def _groups(
    channels: int, max_groups: int = 32, min_group_size: int = 4
) -> int:
    """GroupNorm groups for ``channels``: the most (at most ``max_groups``)
    that divide ``channels`` and keep at least ``min_group_size`` channels
    in each group."""
    for g in range(min(max_groups, channels // min_group_size), 1, -1):
        if channels % g == 0:
            return g
    return 1


class ResBlock(nn.Module):
    """A residual block conditioned on the embedding ``emb`` (time, and
    class if any), as in Ho et al. (2020)::

        # one bias per channel from the embedding
        h = conv1(SiLU(GroupNorm(x))) + Linear(SiLU(emb))
        out = skip(x) + conv2(Dropout(SiLU(GroupNorm(h))))

    GroupNorm subtracts each group's mean, so it removes the part of the
    bias shared by a group; groups of several channels (see ``_groups``)
    keep the rest, the time signal. (B, C_in, H, W), (B, D) ->
    (B, C_out, H, W). Taught in chapter 4, "Residual blocks".
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_dim: int,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_channels), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_channels)
        self.norm2 = nn.GroupNorm(_groups(out_channels), out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = (
            nn.Identity()
            if in_channels == out_channels
            else nn.Conv2d(in_channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, with a residual
    connection. (B, C, H, W) -> (B, C, H, W). Taught in chapter 4,
    "Self-attention at low resolution"."""

    def __init__(self, channels: int, num_heads: int = 1):
        super().__init__()
        if channels % integer("num_heads", num_heads, minimum=1) != 0:
            raise ValueError(
                f"channels ({channels}) must be divisible by num_heads "
                f"({num_heads})"
            )
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        q, k, v = (
            self.qkv(self.norm(x))
            .reshape(B, 3, self.num_heads, C // self.num_heads, H * W)
            .unbind(1)
        )
        # (B, heads, H*W, C/heads) for scaled_dot_product_attention
        out = F.scaled_dot_product_attention(
            q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2)
        )
        return x + self.proj(out.transpose(-1, -2).reshape(B, C, H, W))


def attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """softmax(Q K^T / sqrt(d)) V (Vaswani et al. 2017, eq. 1), written
    out; ``F.scaled_dot_product_attention`` computes the same, fused.

    q (..., N, d), k (..., L, d), v (..., L, d_v); ``mask`` (bool,
    broadcastable to (..., N, L)) is True where a query may look at a key.
    Every query needs one key it may look at (a row of the softmax over
    nothing is 0/0). Returns ``(out (..., N, d_v), weights (..., N, L))``,
    each row of the weights summing to 1. Taught in chapter 12,
    "Cross-attention"."""
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d)
    scores = q @ k.transpose(-2, -1) * scale         # (..., N, L)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    return weights @ v, weights


class MultiHeadAttention(nn.Module):
    """Queries from ``x`` (B, N, dim), keys and values from ``context``
    (B, L, context_dim), ``num_heads`` heads of dim / num_heads channels
    each, then an output projection. ``mask`` (B, L) or (B, N, L), True
    where a key may be looked at. Returns ``(out (B, N, dim), weights
    (B, heads, N, L))``. Self-attention is ``context = x``. Taught in
    chapter 12, "Cross-attention"."""

    def __init__(self, dim: int, context_dim: int, num_heads: int = 1):
        super().__init__()
        dim = integer("dim", dim, minimum=1)
        context_dim = integer("context_dim", context_dim, minimum=1)
        if dim % integer("num_heads", num_heads, minimum=1):
            raise ValueError(
                f"dim ({dim}) must be divisible by num_heads "
                f"({num_heads})"
            )
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def heads(self, x: Tensor) -> Tensor:
        """(B, N, dim) -> (B, heads, N, dim / heads)."""
        B, N, dim = x.shape
        return x.view(B, N, self.num_heads, -1).transpose(1, 2)

    def forward(
        self, x: Tensor, context: Tensor, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        q = self.heads(self.to_q(x))
        k = self.heads(self.to_k(context))
        v = self.heads(self.to_v(context))
        if mask is not None:     # the same mask for every head
            mask = (mask[:, None] if mask.ndim == 2 else mask)[:, None]
        out, weights = attention(q, k, v, mask)
        out = out.transpose(1, 2).flatten(2)      # (B, N, dim)
        return self.to_out(out), weights


class CrossAttentionBlock(nn.Module):
    """Each pixel attends to the words of a caption, with a residual
    connection (Rombach et al. 2022): queries from the normalised pixels
    (B, HW, C), keys and values from the text encoder's tokens (B, L, D).

    A learned null token is always put before the words, so every pixel
    has a key to look at: padding gets weight exactly 0, and the empty
    caption (all padding) attends only to the null token, finite, the
    same as no caption at all (``context`` of length 0).
    (B, C, H, W), (B, L, D), (B, L) bool (True for words) ->
    (B, C, H, W). With ``record = True``, each call keeps its weights
    (B, heads, HW, 1 + L) in ``weights`` (column 0: the null token), for
    per-word attention maps. Taught in chapter 12, "Cross-attention"."""

    def __init__(
        self, channels: int, context_dim: int, num_heads: int = 1
    ):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.null_token = nn.Parameter(torch.randn(context_dim) * 0.02)
        self.attn = MultiHeadAttention(channels, context_dim, num_heads)
        self.record, self.weights = False, None

    def forward(
        self, x: Tensor, context: Tensor, context_mask: Tensor
    ) -> Tensor:
        B, C, H, W = x.shape
        pixels = self.norm(x).flatten(2).transpose(1, 2)   # (B, HW, C)
        null = self.null_token.to(context.dtype).expand(B, 1, -1)
        keys = torch.cat([null, context], dim=1)      # (B, 1 + L, D)
        mask = torch.cat([context_mask.new_ones(B, 1), context_mask], 1)
        out, weights = self.attn(pixels, keys, mask)
        if self.record:
            self.weights = weights.detach()
        return x + out.transpose(1, 2).reshape(B, C, H, W)


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
