"""The continuous view: reverse SDE and probability-flow ODE solvers.

Song et al. (2021) read the forward process as a discretisation of the
variance-preserving (VP) SDE ``dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw``
(their eq. 11), ``beta(t) dt`` being the beta of one step. Two processes
run it backwards with the same marginals p_t: the reverse-time SDE
(eq. 6) and the deterministic probability-flow ODE (eq. 13). Both need
only the score, which the noise predictor gives::

    score(x_t, t) = grad log p_t(x_t) = -eps / sqrt(1 - alpha_bar_t)

This module solves them on the schedule's integer timesteps, as steps of
the registry of :mod:`ddpm_lib.samplers` (one step function each):

* ``"euler_maruyama"``: :func:`euler_maruyama_step`, the reverse SDE;
* ``"euler"`` and ``"heun"``: :func:`euler_step` and :func:`heun_step`,
  the probability-flow ODE in the variables of Karras et al. (2022,
  "EDM");
* the spacing ``"edm"``: :func:`edm_timesteps`, Karras et al.'s grid of
  noise levels (rho = 7) rounded to timesteps, for any sampler.

Importing this module (``import ddpm_lib`` does) adds them to
:data:`~ddpm_lib.samplers.SAMPLERS` and
:data:`~ddpm_lib.samplers.SPACINGS`.
"""
from __future__ import annotations

import math

import torch

from .checks import integer, real
from .samplers import (SAMPLERS, SPACINGS, Sampler, StepOutput,
                       alpha_bar_at, _check_steps)

Tensor = torch.Tensor


def _sigma(alpha_bar: float) -> float:
    """EDM's noise level sqrt((1 - alpha_bar) / alpha_bar); 0 for data."""
    return math.sqrt((1.0 - alpha_bar) / alpha_bar)


# ------------------------------------------------------------------------
# The grid of noise levels of Karras et al. (2022)
# ------------------------------------------------------------------------
def edm_sigmas(sigma_min: float, sigma_max: float, steps: int,
               rho: float = 7.0) -> Tensor:
    """``steps`` noise levels from sigma_max down to sigma_min, evenly
    spaced in sigma^(1/rho) (Karras et al. 2022, eq. 5)::

        sigma_i = (a + i / (steps - 1) (b - a))^rho,
        a = sigma_max^(1/rho),   b = sigma_min^(1/rho)

    for i = 0 .. steps - 1 (one step: sigma_max alone). rho = 1 is even
    in sigma; a larger rho shortens the steps at low noise and lengthens
    them at high noise (rho = 7 in the paper). Shape (steps,), float64.
    """
    sigma_min, sigma_max = real("sigma_min", sigma_min), \
        real("sigma_max", sigma_max)
    rho = real("rho", rho)
    if not 0 < sigma_min < sigma_max:
        raise ValueError("need 0 < sigma_min < sigma_max, got "
                         f"{sigma_min} and {sigma_max}")
    if rho <= 0:
        raise ValueError(f"rho must be positive, got {rho}")
    steps = integer("steps", steps, minimum=1)
    if steps == 1:
        return torch.tensor([sigma_max], dtype=torch.float64)
    i = torch.arange(steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + i / (steps - 1) * (lo - hi)) ** rho


def edm_timesteps(schedule, steps: int, rho: float = 7.0) -> list[int]:
    """``steps`` distinct timesteps from T-1 down to 0: the noise levels
    of :func:`edm_sigmas` between the schedule's own sigma at t = 0 and
    at t = T-1, sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), each
    rounded to the timestep of nearest sigma (as Karras et al. 2022 do
    for discrete-time models). Where rounding merges neighbours (low
    noise, many steps) they are pushed apart to the next free timestep,
    so the list is strictly decreasing. The spacing ``"edm"``.

    The grid starts at the schedule's own sigma_max: 157 for the linear
    schedule (Karras et al. use 80), but 2e4 for the cosine one, whose
    capped last beta makes sigma jump at t = T-1, so that there the top
    levels all round to T-1 and are pushed apart onto T-1, T-2, ...
    """
    T = schedule.T
    steps = _check_steps(steps, T)
    if steps == 1:
        return [T - 1]
    alpha_bar = schedule.float64("alpha_bars")
    sigma = ((1.0 - alpha_bar) / alpha_bar).sqrt()     # (T,), increasing
    targets = edm_sigmas(float(sigma[0]), float(sigma[-1]), steps, rho)
    ts = (sigma[None, :] - targets[:, None]).abs().argmin(dim=1).tolist()
    for i in range(steps - 2, -1, -1):       # strictly decreasing: up...
        ts[i] = max(ts[i], ts[i + 1] + 1)
    if ts[0] > T - 1:                        # ... then back below T
        ts[0] = T - 1
        for i in range(1, steps):
            ts[i] = min(ts[i], ts[i - 1] - 1)
    return ts


# ------------------------------------------------------------------------
# The reverse SDE
# ------------------------------------------------------------------------
def euler_maruyama_step(schedule, x_t, t, t_prev, eps, x0_hat, *, state,
                        denoise=None, generator=None) -> StepOutput:
    """One Euler-Maruyama step of the reverse-time VP SDE (Song et al.
    2021, eq. 6 with the drift and diffusion of eq. 11), backwards from
    t to t_prev::

        dx = [-1/2 beta(t) x - beta(t) score] dt + sqrt(beta(t)) dw_bar
        x_prev = x_t + beta (x_t / 2 - eps / sqrt(1 - alpha_bar_t))
                 + sqrt(beta) z,                       z ~ N(0, I)

    with beta(t) dt taken as the beta of the merged step,
    beta = 1 - alpha_bar_t / alpha_bar_prev, and score from eps as in
    the module docstring. As 1 / sqrt(1 - beta) = 1 + beta/2 + O(beta^2),
    this is DDPM's ancestral step (sigma^2 = beta) up to O(beta^2) per
    step. No noise on the last step (to t_prev = -1), as in DDPM.
    x_t, eps, x0_hat: (B, ...).
    """
    alpha_bar = alpha_bar_at(schedule, t)
    beta = 1.0 - alpha_bar / alpha_bar_at(schedule, t_prev)
    score_term = eps / math.sqrt(1.0 - alpha_bar)
    mean = x_t + beta * (x_t / 2 - score_term)
    if t_prev < 0:
        return StepOutput(mean, x0_hat)
    z = torch.randn(x_t.shape, generator=generator, device=x_t.device)
    return StepOutput(mean + math.sqrt(beta) * z, x0_hat)


# ------------------------------------------------------------------------
# The probability-flow ODE in EDM's variables
# ------------------------------------------------------------------------
def euler_step(schedule, x_t, t, t_prev, eps, x0_hat, *, state,
               denoise=None, generator=None) -> StepOutput:
    """One Euler step of the probability-flow ODE (Song et al. 2021,
    eq. 13) written as Karras et al. (2022) write it, in the noise level
    and the rescaled state (their eq. 4 with s(t) = sqrt(alpha_bar), which
    in y = x / s is their eq. 1)::

        sigma = sqrt((1 - alpha_bar) / alpha_bar),   y = x / sqrt(alpha_bar)
        dy / dsigma = eps(x, t) = (y - x0_hat) / sigma

    (y = x0 + sigma eps: adding noise is moving along sigma). The step::

        y_prev = y + (sigma_prev - sigma) eps
        x_prev = sqrt(alpha_bar_prev) y_prev

    sigma_prev = 0 and alpha_bar_prev = 1 at t_prev = -1, where the step
    returns x0_hat. On any grid this is DDIM with eta = 0. One network
    call per step; no noise. x_t, eps, x0_hat: (B, ...).
    """
    alpha_bar, alpha_bar_prev = alpha_bar_at(schedule, t), \
        alpha_bar_at(schedule, t_prev)
    h = _sigma(alpha_bar_prev) - _sigma(alpha_bar)          # < 0
    y_prev = x_t / math.sqrt(alpha_bar) + h * eps
    return StepOutput(math.sqrt(alpha_bar_prev) * y_prev, x0_hat)


def heun_step(schedule, x_t, t, t_prev, eps, x0_hat, *, state,
              denoise=None, generator=None) -> StepOutput:
    """One step of Heun's second-order method on the ODE of
    :func:`euler_step`, dy/dsigma = eps (Karras et al. 2022, Algorithm
    1, deterministic): an Euler predictor, the model called again at its
    end (``denoise``), then the trapezoidal corrector with the average
    of the two slopes::

        y_euler = y + (sigma_prev - sigma) eps
        eps_end = eps(sqrt(alpha_bar_prev) y_euler, t_prev)
        y_prev  = y + (sigma_prev - sigma) (eps + eps_end) / 2

    On the last step (to sigma = 0, t_prev = -1) there is no model to
    call at the end: Euler, as in Karras et al. Two network calls per
    step, one on the last. x_t, eps, x0_hat: (B, ...).
    """
    alpha_bar, alpha_bar_prev = alpha_bar_at(schedule, t), \
        alpha_bar_at(schedule, t_prev)
    h = _sigma(alpha_bar_prev) - _sigma(alpha_bar)          # < 0
    y = x_t / math.sqrt(alpha_bar)
    y_euler = y + h * eps
    if t_prev < 0:
        return StepOutput(y_euler, x0_hat)
    if denoise is None:
        raise ValueError("heun_step calls the model a second time: pass "
                         "denoise(x, t) -> (eps, x0_hat), as sample() does")
    eps_end, _ = denoise(math.sqrt(alpha_bar_prev) * y_euler, t_prev)
    y_prev = y + h * 0.5 * (eps + eps_end)
    return StepOutput(math.sqrt(alpha_bar_prev) * y_prev, x0_hat)


# ------------------------------------------------------------------------
# Into the registry. Defaults: Euler-Maruyama on every timestep, as Song
# et al. run it (N = T = 1000; at 50 steps the std of Gaussian toy data is
# off by up to 14%); Heun with 18 steps (35 network calls) on the EDM grid,
# Karras et al.'s choice for 32 x 32 images; Euler with the same 35 calls.
# ------------------------------------------------------------------------
SPACINGS["edm"] = edm_timesteps
SAMPLERS.update(
    euler_maruyama=Sampler(euler_maruyama_step,
                           "Euler-Maruyama, reverse SDE", None, "time"),
    euler=Sampler(euler_step, "Euler, probability-flow ODE", 35, "edm"),
    heun=Sampler(heun_step, "Heun, probability-flow ODE", 18, "edm"),
)
