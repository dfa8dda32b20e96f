"""Classifier-free guidance (Ho & Salimans 2022): a class-conditional network turned into
the model function ``(x_t, t) -> eps`` that every sampler of :mod:`ddpm_lib.samplers` takes.
"""
from __future__ import annotations

import torch

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
    w = real("the guidance weight w", w)
    if w < 0:
        raise ValueError(f"the guidance weight w must be finite and >= 0, got {w}")
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
        B = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(B) if t.ndim == 0 else t
        y_cond = labels(y, B, x_t.device)
        y_null = torch.full_like(y_cond, null_class)
        if w == 0.0:
            return model(x_t, t, y_null)
        if w == 1.0:
            return model(x_t, t, y_cond)
        eps_cond, eps_uncond = model(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                     torch.cat([y_cond, y_null])).chunk(2)
        return (1.0 - w) * eps_uncond + w * eps_cond

    return eps_model
