"""Value checks, and how a hot loop turns them off.

``ddpm_lib`` checks its inputs: timesteps in ``0..T-1``, labels in range, no NaN. Checks of
*shapes and dtypes* are free, but a check of *values* (``t.max() > T - 1``) reads a tensor back
from the GPU: the host waits for the GPU to finish everything queued (a synchronisation), and
inside ``torch.compile`` the check splits the graph. So value checks run only where they are
cheap and useful: not while compiling, and not inside :func:`trusted_inputs`, which
:func:`ddpm_lib.train.train` wraps around each step, because it validated the dataset once
and draws the timesteps and the noise itself.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch

_trusted = contextvars.ContextVar("ddpm_lib_trusted_inputs", default=False)


def check_values() -> bool:
    """True where value checks should run: outside compiled code and :func:`trusted_inputs`."""
    return not torch.compiler.is_compiling() and not _trusted.get()


@contextlib.contextmanager
def trusted_inputs():
    """Inside this block, ``ddpm_lib`` skips the checks that read tensor values (shape and dtype
    checks still run). For loops whose inputs are valid by construction."""
    token = _trusted.set(True)
    try:
        yield
    finally:
        _trusted.reset(token)
