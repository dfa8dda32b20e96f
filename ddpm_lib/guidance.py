"""Classifier-free guidance (Ho & Salimans 2022): a class-conditional network (chapter 9), or
one conditioned on a caption (chapter 12), turned into the model function ``(x_t, t) -> eps``
that every sampler of :mod:`ddpm_lib.samplers` takes.
"""
from __future__ import annotations

import torch

from .captions import PAD_ID
from .checks import integer, integer_dtype, real

Tensor = torch.Tensor


def guided_model(model, y, w: float, null_class: int | None = None):
    """Classifier-free guidance (Ho & Salimans 2022): a model function ``(x_t, t) -> eps``
    for any sampler, from a class-conditional network ``model(x_t, t, y)``::

        eps = eps_uncond + w * (eps_cond - eps_uncond) = (1 - w) eps_uncond + w eps_cond
        eps_cond = model(x_t, t, y),   eps_uncond = model(x_t, t, null_class)

    ``w = 0`` is the unconditional model, ``w = 1`` the conditional one, ``w > 1`` pushes the
    samples further towards what distinguishes class y (sharper, less varied). The paper
    writes ``(1 + w') eps_cond - w' eps_uncond``: its ``w'`` is this ``w - 1`` (so its
    w' = 0 is our w = 1, plain conditional sampling).

    ``y``: the class of each image, an int (the same for the whole batch) or a (B,) integer
    tensor. ``null_class``: the label meaning "no class", by default ``model.num_classes``
    (the learned null label of :class:`ddpm_lib.unet.UNet`, trained with ``label_dropout``).
    For ``0 < w != 1`` both predictions come from ONE call on a batch of 2B
    (``[x_t, x_t]`` with labels ``[y, null]``); ``w = 0`` and ``w = 1`` need only one of them
    and make a single call of batch B, so they return exactly that prediction.
    Shapes: x_t (B, C, H, W), t (B,), returns eps (B, C, H, W).

    Taught in chapter 9, sections "A toy where every quantity is exact" and "Guiding the
    trained network".
    """
    w = _weight(w)
    if null_class is None:
        null_class = getattr(model, "num_classes", None)
        if null_class is None:
            raise ValueError("the model has no num_classes (it is unconditional); pass null_class= "
                             "for a conditional model function, or use the model unguided")
    null_class = integer("null_class", null_class, minimum=0)

    def labels(value, batch_size, device):
        value = torch.as_tensor(value, device=device)
        integer_dtype("class labels y", value, "; convert them with y.long()")
        if value.ndim == 0:
            value = value.expand(batch_size)
        if value.shape != (batch_size,):
            raise ValueError(f"y must be an int or have shape ({batch_size},), got {tuple(value.shape)}")
        return value.long()

    def eps_model(x_t: Tensor, t: Tensor) -> Tensor:
        y_cond = labels(y, x_t.shape[0], x_t.device)
        return guide(model, x_t, t, y_cond, torch.full_like(y_cond, null_class), w)

    return eps_model


def _weight(w) -> float:
    w = real("the guidance weight w", w)
    if w < 0:
        raise ValueError(f"the guidance weight w must be finite and >= 0, got {w}")
    return w


def guide(model, x_t: Tensor, t: Tensor, cond: Tensor, null: Tensor, w: float) -> Tensor:
    """``(1 - w) model(x_t, t, null) + w model(x_t, t, cond)``: the two predictions from ONE
    call on a batch of 2B (conditions ``[cond, null]``), or, for w = 0 or 1, the one needed
    from a call of batch B. x_t (B, C, H, W); t an int or (B,); cond and null (B, ...), class
    labels (B,) or caption tokens (B, L). Taught in chapter 9, "Guiding the trained network",
    and chapter 12, "Guidance with the empty caption"."""
    B = x_t.shape[0]
    t = torch.as_tensor(t, device=x_t.device)
    t = t.expand(B) if t.ndim == 0 else t
    if w == 0.0:
        return model(x_t, t, null)
    if w == 1.0:
        return model(x_t, t, cond)
    eps_cond, eps_uncond = model(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                 torch.cat([cond, null])).chunk(2)
    return (1.0 - w) * eps_uncond + w * eps_cond


def guided_text_model(model, captions, w: float, null=""):
    """Classifier-free guidance with a caption: a model function ``(x_t, t) -> eps`` for any
    sampler, from a text-conditioned network ``model(x_t, t, tokens)``
    (:class:`ddpm_lib.text.TextConditionedUNet`)::

        eps = (1 - w) eps(x_t, t, null) + w eps(x_t, t, caption)

    ``captions``: one caption (a string, for the whole batch), B captions, or token ids (L,)
    or (B, L) (:func:`ddpm_lib.captions.tokenize`). ``null`` is given the same ways; the
    default, the empty caption "" (all padding), is the condition that caption dropout trained
    the network on: plain classifier-free guidance. Another caption as ``null`` guides along
    the difference between the two, e.g. from "a trouser" towards "a dark trouser" (chapter
    12, "Guiding towards a word"; a negative prompt is the same with the unwanted caption).
    As :func:`guided_model`: w = 0 is the null prediction, w = 1 the conditional one (each a
    single call of batch B), otherwise one call of batch 2B. Shapes: x_t (B, C, H, W), t (B,),
    returns (B, C, H, W). Taught in chapter 12, "Guidance with the empty caption"."""
    w = _weight(w)
    tokens = _caption_tokens(model, captions, "caption")
    if isinstance(null, str) and null == "":        # the empty caption: all padding
        null_tokens = torch.full_like(tokens[:1], PAD_ID)
    else:
        null_tokens = _caption_tokens(model, null, "null caption")
    if tokens.shape[1] != null_tokens.shape[1]:
        raise ValueError(f"the captions have {tokens.shape[1]} token positions and the null "
                         f"caption {null_tokens.shape[1]}: tokenize both with the same max_len")

    def eps_model(x_t: Tensor, t: Tensor) -> Tensor:
        B = x_t.shape[0]
        for ids, what in ((tokens, "captions"), (null_tokens, "null captions")):
            if ids.shape[0] not in (1, B):
                raise ValueError(f"{ids.shape[0]} {what} for a batch of {B}: give one "
                                 f"or {B}")
        cond = tokens.to(x_t.device).expand(B, -1)
        return guide(model, x_t, t, cond, null_tokens.to(x_t.device).expand(B, -1), w)

    return eps_model


def _caption_tokens(model, captions, what: str) -> Tensor:
    """Token ids (B, L) of captions given as text (tokenized by ``model.tokenize``) or ids."""
    if isinstance(captions, (str, list, tuple)):
        if not hasattr(model, "tokenize"):
            raise ValueError(f"a {what} as text needs a model with .tokenize (a "
                             "TextConditionedUNet); pass token ids instead")
        captions = model.tokenize(captions)
    tokens = torch.as_tensor(captions)
    integer_dtype(f"{what} tokens", tokens, "; make them with ddpm_lib.captions.tokenize")
    tokens = tokens[None] if tokens.ndim == 1 else tokens
    if tokens.ndim != 2:
        raise ValueError(f"{what} tokens must have shape (L,) or (B, L), got "
                         f"{tuple(tokens.shape)}")
    return tokens
