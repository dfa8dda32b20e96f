"""Samplers: loops that turn noise into data with a noise predictor.

Each sampler takes ``model``, any callable ``(x_t, t) -> eps`` with x_t of shape
(B, C, H, W) and t a (B,) long tensor of 0-based timesteps, and a
:class:`~ddpm_lib.schedules.NoiseSchedule`. They are interchangeable: same model, same
schedule, same shape, a different way of walking back from t = T-1 to data.

* :func:`ddpm_sample`: ancestral sampling, Algorithm 2 of Ho et al. (2020), T steps.
* :func:`ddim_sample`: DDIM (Song et al. 2021), any subsequence of timesteps, eta from
  0 (deterministic) to 1 (DDPM-like).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

Tensor = torch.Tensor


@dataclass
class Trajectory:
    """What a sampler saw on its way: for each step, the timestep, x_t and the predicted x0.

    A sampler returns it stacked: ``x_t`` and ``x0_hat`` are (S, B, C, H, W) float32 tensors on
    the CPU, S = number of steps; ``t`` is a list of S ints, in the order visited (from noisy to
    clean). While sampling, ``x_t`` and ``x0_hat`` are lists that :meth:`add` appends to.
    """
    t: list = field(default_factory=list)
    x_t: list | Tensor = field(default_factory=list)
    x0_hat: list | Tensor = field(default_factory=list)

    def add(self, t: int, x_t: Tensor, x0_hat: Tensor) -> None:
        self.t.append(int(t))
        self.x_t.append(x_t.detach().float().cpu())
        self.x0_hat.append(x0_hat.detach().float().cpu())

    def stack(self) -> "Trajectory":
        return Trajectory(self.t, torch.stack(self.x_t), torch.stack(self.x0_hat))


def _check_shape(shape) -> tuple:
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or any(s < 1 for s in shape):
        raise ValueError(f"shape must be (B, C, H, W) with positive sizes, got {shape}")
    return shape


def _start(schedule, shape, x_T, generator, device):
    shape = _check_shape(shape)
    device = torch.device(device) if device is not None else schedule.device
    if schedule.device != device:
        schedule = schedule.to(device)
    if x_T is None:
        x_T = torch.randn(shape, generator=generator, device=device)
    elif tuple(x_T.shape) != shape:
        raise ValueError(f"x_T has shape {tuple(x_T.shape)} but shape is {shape}")
    return schedule, x_T.to(device, torch.float32)


def _denoise(model, schedule, x, t_batch, clip_x0):
    """One network call: eps, and the x0 it implies (clipped to [-1, 1] if asked, with eps
    re-derived from the clipped x0 so the two stay consistent)."""
    eps = model(x, t_batch).float()
    if eps.shape != x.shape:
        raise ValueError(f"the model returned shape {tuple(eps.shape)} for x_t of shape {tuple(x.shape)}")
    x0 = schedule.predict_x0(x, t_batch, eps)
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
        eps = schedule.predict_eps(x, t_batch, x0)
    return eps, x0


@torch.no_grad()
def ddpm_sample(model, schedule, shape, *, sigma: str = "beta", clip_x0: bool = True,
                generator: torch.Generator | None = None, return_trajectory: bool = False,
                x_T: Tensor | None = None, device=None, progress: bool = False):
    """Ancestral sampling (Ho et al. 2020, Algorithm 2), from t = T-1 down to t = 0::

        x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta(x_t, t)) + sigma_t z

    with ``sigma_t^2 = beta_t`` (``sigma="beta"``) or ``beta_tilde_t`` (``sigma="beta_tilde"``),
    and no noise at the last step. With ``clip_x0``, the predicted x0 is clipped to [-1, 1]
    and eps re-derived from it (the mean then equals the posterior mean at the clipped x0).

    Returns x_0 of ``shape`` (float32), or ``(x_0, Trajectory)`` with ``return_trajectory``.
    """
    if sigma not in ("beta", "beta_tilde"):
        raise ValueError(f"sigma must be 'beta' or 'beta_tilde', got {sigma!r}")
    schedule, x = _start(schedule, shape, x_T, generator, device)
    variances = schedule.betas if sigma == "beta" else schedule.beta_tilde
    trajectory = Trajectory() if return_trajectory else None
    for t in tqdm(range(schedule.T - 1, -1, -1), desc="DDPM", disable=not progress):
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        eps, x0 = _denoise(model, schedule, x, t_batch, clip_x0)
        if trajectory is not None:
            trajectory.add(t, x, x0)
        mean = schedule.reverse_mean(x, t_batch, eps)
        if t > 0:
            z = torch.randn(x.shape, generator=generator, device=x.device)
            x = mean + variances[t].sqrt() * z
        else:
            x = mean
    return (x, trajectory.stack()) if trajectory is not None else x


def ddim_timesteps(T: int, steps: int) -> list[int]:
    """``steps`` timesteps evenly spread over 0 .. T-1, from T-1 down to 0 (both included)."""
    if not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an integer in 1..{T} (the schedule's T), got {steps!r}")
    if steps == 1:
        return [T - 1]
    ts = torch.linspace(0, T - 1, steps, dtype=torch.float64).round().long().tolist()
    return sorted(set(ts), reverse=True)


@torch.no_grad()
def ddim_sample(model, schedule, shape, *, steps: int = 50, eta: float = 0.0, clip_x0: bool = True,
                generator: torch.Generator | None = None, return_trajectory: bool = False,
                timesteps: list[int] | None = None, x_T: Tensor | None = None, device=None,
                progress: bool = False):
    """DDIM sampling (Song et al. 2021, eq. 12) over a subsequence of timesteps::

        x_prev = sqrt(alpha_bar_prev) x0_hat + sqrt(1 - alpha_bar_prev - sigma^2) eps + sigma z
        sigma  = eta * sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * sqrt(1 - alpha_bar / alpha_bar_prev)

    where alpha_bar_prev belongs to the next timestep in the subsequence, and is 1 after
    the last one (so the last step returns x0_hat and adds no noise). ``eta=0`` is
    deterministic; ``eta=1`` with every timestep is DDPM with sigma^2 = beta_tilde.

    ``timesteps`` (descending, in 0..T-1) overrides the evenly spaced ``steps``.
    Returns x_0, or ``(x_0, Trajectory)`` with ``return_trajectory``.
    """
    if not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"eta must lie in [0, 1], got {eta}")
    if timesteps is None:
        timesteps = ddim_timesteps(schedule.T, steps)
    else:
        timesteps = [int(t) for t in timesteps]
        if any(b >= a for a, b in zip(timesteps, timesteps[1:])) or not timesteps \
                or timesteps[0] > schedule.T - 1 or timesteps[-1] < 0:
            raise ValueError(f"timesteps must be strictly decreasing within 0..{schedule.T - 1}")
    schedule, x = _start(schedule, shape, x_T, generator, device)
    trajectory = Trajectory() if return_trajectory else None
    one = torch.ones((), device=x.device)
    for i, t in enumerate(tqdm(timesteps, desc="DDIM", disable=not progress)):
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        eps, x0 = _denoise(model, schedule, x, t_batch, clip_x0)
        if trajectory is not None:
            trajectory.add(t, x, x0)
        alpha_bar = schedule.alpha_bars[t]
        alpha_bar_prev = schedule.alpha_bars[timesteps[i + 1]] if i + 1 < len(timesteps) else one
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev))
        x = alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev - sigma**2).clamp(min=0).sqrt() * eps
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device)
    return (x, trajectory.stack()) if trajectory is not None else x
