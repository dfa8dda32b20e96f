"""Value checks, and how a hot loop turns them off.

``ddpm_lib`` checks its inputs: timesteps in ``0..T-1``, labels in range, no NaN. Checks of
*shapes and dtypes* are free, but a check of *values* (``t.max() > T - 1``) reads a tensor back
from the GPU: the host waits for the GPU to finish everything queued (a synchronisation), and
inside ``torch.compile`` the check splits the graph. So value checks run only where they are
cheap and useful: not while compiling, and not inside :func:`trusted_inputs`, which
:func:`ddpm_lib.train.train` wraps around each step, because it validated the dataset once
and draws the timesteps and the noise itself.

It also holds the small argument checks the modules share (:func:`integer`, :func:`integers`,
:func:`real`, :func:`integer_dtype`): each raises a ``ValueError`` that names the argument,
says what it must be and what it got.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
from collections.abc import Iterable

import torch

_trusted = contextvars.ContextVar("ddpm_lib_trusted_inputs", default=False)


def check_values() -> bool:
    """True where value checks should run: outside compiled code and :func:`trusted_inputs`.
    Taught in chapter 11, "torch.compile" (``ch11-compile``) and
    "No synchronisation with the host" (``ch11-sync``)."""
    return not torch.compiler.is_compiling() and not _trusted.get()


@contextlib.contextmanager
def trusted_inputs():
    """Inside this block, ``ddpm_lib`` skips the checks that read tensor values (shape and dtype
    checks still run). For loops whose inputs are valid by construction.
    Taught in chapter 11, "No synchronisation with the host" (``ch11-sync``)."""
    token = _trusted.set(True)
    try:
        yield
    finally:
        _trusted.reset(token)


# ----------------------------------------------------------------------------------------
# Argument checks shared by the modules
# ----------------------------------------------------------------------------------------
def integer(name: str, value, minimum: int | None = None) -> int:
    """``value`` as a Python int: any integer type (Python's, NumPy's, a one-element integer
    tensor), not a bool or a float, at least ``minimum`` when given. Otherwise a ValueError
    naming ``name``. Not taught: an argument check behind the library's calls from chapter 2 on
    (the ``T`` of ``NoiseSchedule.linear``, the sizes of chapter 4's ``UNet``)."""
    wanted = "an integer" + (f" >= {minimum}" if minimum is not None else "")
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be {wanted}, got {value!r} of type {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be {wanted}, got {value}")
    return int(value)


def integers(name: str, values, minimum: int | None = None) -> tuple[int, ...]:
    """A sequence of integers (tuple, list, torch.Size) as a tuple of ints, each checked by
    :func:`integer` (the error names the position, e.g. ``shape[0]``). Not taught: an argument
    check, e.g. of the ``channel_mults`` of chapter 4's ``UNet``."""
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"{name} must be a sequence of integers, got {values!r}")
    return tuple(integer(f"{name}[{i}]", v, minimum) for i, v in enumerate(values))


def real(name: str, value) -> float:
    """``value`` as a finite Python float: any real number type (or a one-element real tensor),
    not a bool or a string. Otherwise a ValueError naming ``name``. Not taught: an argument
    check, e.g. of the betas of chapter 2's ``NoiseSchedule.linear``."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


def integer_dtype(what: str, tensor: torch.Tensor, how: str = "") -> None:
    """A ValueError unless ``tensor`` holds integers (not floats, complex numbers or bools).
    A dtype check: free, so it runs inside :func:`trusted_inputs` and compiled code too.
    Not taught: an argument check of timesteps and labels; unlike the value checks of chapter
    11, "No synchronisation with the host" (``ch11-sync``), it reads no tensor values."""
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise ValueError(f"{what} must be integers, got dtype {tensor.dtype}{how}")


def training_data(images: torch.Tensor, labels: torch.Tensor | None, num_classes: int | None,
                  check_range: bool = True) -> None:
    """Check a training set: ``images`` a finite float (N, C, H, W) tensor in [-1, 1] (any
    range with ``check_range=False``), ``labels`` None or integers in 0..num_classes-1, (N,).
    Used by ``train`` (chapter 5); chapter 10, "Training a VAE, then diffusion on its latents
    (the API)", meets its range check, and chapter 11, "No synchronisation with the host"
    (``ch11-sync``), explains why it runs once, before the first step."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
        raise ValueError("images must be a float tensor of shape (N, C, H, W), values in [-1, 1]")
    if images.shape[0] == 0:
        raise ValueError("images is empty")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or infinite values")
    if check_range and (images.min() < -1.001 or images.max() > 1.001):
        raise ValueError(f"images must be scaled to [-1, 1], got values in "
                         f"[{images.min().item():.3g}, {images.max().item():.3g}]; "
                         "use ddpm_lib.data.load, or x * 2 - 1 for images in [0, 1]")
    if labels is not None:
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        if not num_classes:
            raise ValueError("labels were given but the model is unconditional (num_classes=None)")
        if labels.is_floating_point() or labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"labels must be integers in 0..{num_classes - 1}, got {labels.dtype} values "
                             f"from {labels.min().item()} to {labels.max().item()}")
