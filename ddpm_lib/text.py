"""Text-to-image at toy scale: a tiny text encoder, and the U-Net of
chapter 4 with a cross-attention block after each of its self-attention
blocks, trained together on captioned Fashion-MNIST
(:mod:`ddpm_lib.captions`).

* :class:`TextEncoder`: token embedding + learned positions + small
  pre-norm transformer layers; tokens (B, L) -> features (B, L, d) and
  the mask of the words (B, L).
* :class:`TextConditionedUNet`: ``forward(x_t, t, tokens) -> eps``. It is
  a :class:`~ddpm_lib.unet.UNet` (same blocks, same names) whose forward
  also runs :class:`~ddpm_lib.layers.CrossAttentionBlock` where the U-Net
  has self-attention, its keys and values from the encoded caption.
  The empty caption (all padding) is the null condition of
  classifier-free guidance: every cross-attention then looks only at its
  learned null token.
* :func:`attention_maps`: where each word is looked at, per block.

Chapter 12 prints these, so lines are at most 76 characters.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .captions import (
    MAX_LEN,
    PAD,
    PAD_ID,
    VOCABULARY,
    check_tokens,
    tokenize,
)
from .checks import integer
from .layers import (
    AttentionBlock,
    CrossAttentionBlock,
    Downsample,
    MultiHeadAttention,
    Upsample,
)
from .unet import UNet, _check_input

Tensor = torch.Tensor


class TransformerLayer(nn.Module):
    """One pre-norm transformer layer (as in GPT-2)::

        x = x + SelfAttention(LayerNorm(x))
        x = x + MLP(LayerNorm(x))

    (B, L, dim), mask (B, L, L) (True: query i may look at key j) ->
    (B, L, dim). Taught in chapter 12, "A tiny text encoder"."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
        )

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, mask)[0]
        return x + self.mlp(self.norm2(x))


class TextEncoder(nn.Module):
    """Token ids (B, L) -> ``(features (B, L, dim), is_word (B, L))``:
    token embedding + learned position embedding, ``num_layers``
    transformer layers, a final LayerNorm. ``is_word`` is False at
    padding (id 0).

    Words attend to words only, so padding never changes them; a padding
    position attends to the words and to itself (a softmax needs one
    key), so the features stay finite even for the empty caption; the
    cross-attention ignores them. Taught in chapter 12, "A tiny text
    encoder"."""

    def __init__(
        self,
        vocab_size: int,
        max_len: int = MAX_LEN,
        dim: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
    ):
        super().__init__()
        vocab_size = integer("vocab_size", vocab_size, minimum=2)
        self.max_len = integer("max_len", max_len, minimum=1)
        dim = integer("text_dim", dim, minimum=1)
        num_layers = integer("text_layers", num_layers, minimum=0)
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.position_embedding = nn.Parameter(torch.zeros(max_len, dim))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.02)
        self.layers = nn.ModuleList(
            TransformerLayer(dim, num_heads) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        B, L = tokens.shape
        if L > self.max_len:
            raise ValueError(
                f"tokens have {L} positions, more than this encoder's "
                f"max_len={self.max_len}: tokenize with max_len="
                f"{self.max_len}"
            )
        is_word = tokens != PAD_ID
        itself = torch.eye(L, dtype=torch.bool, device=tokens.device)
        may_look = is_word[:, None, :] | itself      # (B, L, L)
        h = self.token_embedding(tokens) + self.position_embedding[:L]
        for layer in self.layers:
            h = layer(h, may_look)
        return self.norm(h), is_word


class TextConditionedUNet(UNet):
    """The U-Net of chapter 4 conditioned on a caption: a
    :class:`TextEncoder` reads the tokens, and a cross-attention block
    follows every self-attention block (the levels of
    ``attention_resolutions`` and the middle). Trained jointly.

    Args: ``vocabulary`` (the words, id 0 the padding), ``max_len``,
    ``text_dim``, ``text_layers``, ``text_heads`` (the encoder), then
    any argument of :class:`~ddpm_lib.unet.UNet` but ``num_classes``.
    ``.config`` holds them all, so ``TextConditionedUNet(**config)``
    rebuilds the network (:func:`ddpm_lib.pretrained.load_weights`).

    ``forward(x_t, t, tokens=None)``: (B, C, H, W), (B,), (B, L) token
    ids -> eps (B, C, H, W); ``tokens=None`` is the empty caption.
    Taught in chapter 12, "Cross-attention"."""

    def __init__(
        self,
        vocabulary=VOCABULARY,
        max_len: int = MAX_LEN,
        text_dim: int = 64,
        text_layers: int = 2,
        text_heads: int = 4,
        **unet_kwargs,
    ):
        if unet_kwargs.get("num_classes") is not None:
            raise ValueError(
                "a TextConditionedUNet is conditioned on captions, not "
                "class labels: leave num_classes out (the class is a "
                "word of the caption)"
            )
        super().__init__(**unet_kwargs)
        self.vocabulary = words = tuple(vocabulary)
        if words[:1] != (PAD,) or len(set(words)) < len(words):
            raise ValueError(
                f"the vocabulary must start with the padding {PAD!r} (id "
                "0) and hold each word once, e.g. "
                "ddpm_lib.captions.VOCABULARY"
            )
        self.text_encoder = TextEncoder(
            len(self.vocabulary), max_len, text_dim, text_layers,
            text_heads,
        )
        # a cross-attention block after every self-attention block
        for layer in [*self.down, *self.up]:
            if isinstance(layer, nn.ModuleList) and isinstance(
                layer[1], AttentionBlock
            ):
                layer.append(_cross_attention(layer[1], text_dim))
        self.mid_cross = _cross_attention(self.mid[1], text_dim)
        self.config = dict(
            vocabulary=list(self.vocabulary), max_len=max_len,
            text_dim=text_dim, text_layers=text_layers,
            text_heads=text_heads,
            **{k: v for k, v in self.config.items() if k != "num_classes"},
        )

    def tokenize(self, captions) -> Tensor:
        """Captions (a string or B strings) -> token ids (B, max_len)
        in this model's vocabulary (:func:`ddpm_lib.captions.tokenize`).
        Taught in chapter 12, "A tiny text encoder"."""
        return tokenize(
            captions, self.text_encoder.max_len, self.vocabulary
        )

    def encode(self, tokens: Tensor | None, batch: int, device):
        """``(context (B, L, text_dim), is_word (B, L))`` of ``tokens``
        (B, L), checked; None is the empty caption. Taught in chapter
        12, "A tiny text encoder"."""
        if tokens is None:
            tokens = torch.full((batch, 1), PAD_ID, device=device)
        check_tokens(tokens, len(self.vocabulary), batch)
        return self.text_encoder(tokens.to(device).long())

    def forward(
        self, x_t: Tensor, t: Tensor, tokens: Tensor | None = None
    ) -> Tensor:
        t = _check_input(
            x_t, t, self.in_channels, self.divisor, self.conv_in.weight
        )
        text = self.encode(tokens, len(t), x_t.device)   # context, mask
        emb = self.time_embedding(t)
        h = self.conv_in(x_t)
        skips = [h]
        for layer in self.down:
            if isinstance(layer, Downsample):
                h = layer(h)
            else:
                h = _level(layer, h, emb, text)
            skips.append(h)
        h = self.mid[1](self.mid[0](h, emb))       # ResBlock, attention
        h = self.mid[2](self.mid_cross(h, *text), emb)
        for layer in self.up:
            if isinstance(layer, Upsample):
                h = layer(h)
            else:
                h = torch.cat([h, skips.pop()], dim=1)
                h = _level(layer, h, emb, text)
        return self.conv_out(F.silu(self.norm_out(h)))

    def cross_attention_blocks(self) -> list[CrossAttentionBlock]:
        """The cross-attention blocks in the order forward runs them
        (down, middle, up). Taught in chapter 12, "Cross-attention"."""
        def found(path):
            return [m for m in path.modules()
                    if isinstance(m, CrossAttentionBlock)]

        return [*found(self.down), self.mid_cross, *found(self.up)]


def _cross_attention(
    attn: AttentionBlock, text_dim: int
) -> CrossAttentionBlock:
    """The cross-attention block to put after ``attn``: as many channels
    and heads."""
    channels = attn.proj.out_channels
    return CrossAttentionBlock(channels, text_dim, attn.num_heads)


def _level(layer, h: Tensor, emb: Tensor, text) -> Tensor:
    """One block of a level: the residual block, the self-attention (or
    nothing), then the cross-attention to ``text`` = (context, is_word)
    where there is one."""
    block, attn, *cross = layer
    h = attn(block(h, emb))
    for cross_attention in cross:
        h = cross_attention(h, *text)
    return h


@torch.no_grad()
def attention_maps(
    model: TextConditionedUNet, x_t: Tensor, t: Tensor, tokens: Tensor
) -> list[Tensor]:
    """Where each token is looked at: one tensor (B, 1 + L, h, w) per
    cross-attention block, in forward order, the attention weights
    averaged over heads; channel 0 is the null token, channel 1 + i
    token i (all zero at padding). Each pixel's weights sum to 1.
    Taught in chapter 12, "Cross-attention"."""
    blocks = model.cross_attention_blocks()
    for block in blocks:
        block.record = True
    try:
        model(x_t, t, tokens)
        maps = []
        for block in blocks:
            weights = block.weights.mean(1)        # (B, hw, 1 + L)
            B, hw, keys = weights.shape
            side = math.isqrt(hw)
            maps.append(weights.transpose(1, 2).reshape(B, keys, side, -1))
    finally:
        for block in blocks:
            block.record, block.weights = False, None
    return maps
