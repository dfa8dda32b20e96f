"""The book's pieces beside diffusers': a schedule from a diffusers scheduler, the grid a
diffusers scheduler visits, and a diffusers ``UNet2DModel`` as a noise predictor that the
book's samplers can drive. diffusers itself is not imported here (any object with the same
attributes works); tests/test_interop.py runs them against the real thing.

What agrees and what differs (tests/test_interop.py measures it):

* the linear schedule: the same betas, so the same alpha_bar (to float32 rounding);
* DDIM on the same timesteps: the same update, once clipping is treated the same way
  (diffusers clips x0_hat but keeps the network's eps unless ``use_clipped_model_output``;
  the book re-derives eps from the clipped x0_hat);
* the default grids differ: ``ddim_timesteps(1000, 4)`` is [999, 666, 333, 0], diffusers'
  "leading" spacing gives [750, 500, 250, 0], and its DDIM steps from t to t - T/steps, so
  its "linspace" grid [999, 666, 333, 0] is not the book's DDIM either.
"""
from __future__ import annotations

import torch

from .schedules import NoiseSchedule


def schedule_from_diffusers(scheduler) -> NoiseSchedule:
    """A :class:`NoiseSchedule` with the betas of a diffusers scheduler (``DDPMScheduler``,
    ``DDIMScheduler``, ...): ``scheduler.betas``, shape (T,)."""
    return NoiseSchedule(torch.as_tensor(scheduler.betas).double())


def diffusers_timesteps(scheduler, steps: int) -> list[int]:
    """The 0-based timesteps, descending, that ``scheduler`` visits in ``steps`` steps (its
    ``set_timesteps``); pass them as ``timesteps=`` to :func:`ddpm_lib.samplers.sample`."""
    scheduler.set_timesteps(steps)
    return [int(t) for t in scheduler.timesteps]


class DiffusersUNet(torch.nn.Module):
    """A diffusers ``UNet2DModel`` as a noise predictor: ``(x_t, t) -> eps`` with x_t of
    shape (B, C, H, W) and t of shape (B,), returning the network's ``.sample``."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y=None) -> torch.Tensor:
        if y is None:
            return self.unet(x_t, t).sample
        return self.unet(x_t, t, class_labels=y).sample
