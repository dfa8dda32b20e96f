"""The equations of the forward and reverse processes, as plain tensor functions.

Every function here takes the schedule coefficients it needs (``alpha_bar`` and friends)
already gathered at the right timesteps and broadcastable against the images, so each
line reads like the formula in the book. :class:`ddpm_lib.schedules.NoiseSchedule`
gathers the coefficients for a batch of timesteps and calls these functions.

Notation (Ho et al. 2020), for one timestep:

* ``beta``: the variance added by one forward step, ``alpha = 1 - beta``;
* ``alpha_bar``: the product of the alphas up to and including this step;
* ``alpha_bar_prev``: the same product up to the step before (1 before the first step);
* ``x0``: clean data, ``x_t``: noisy data, ``eps``: standard Gaussian noise;
* ``v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0`` (Salimans & Ho 2022).

Shapes: images are ``(B, C, H, W)`` (any shape works); coefficients are ``(B, 1, 1, 1)``
or anything that broadcasts against the images.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------
# Forward process
# ----------------------------------------------------------------------------------------
def q_step(x_prev: Tensor, beta: Tensor, eps: Tensor) -> Tensor:
    """One forward step, a sample of q(x_t | x_{t-1}) = N(sqrt(1 - beta) x_{t-1}, beta I)."""
    return torch.sqrt(1.0 - beta) * x_prev + torch.sqrt(beta) * eps


def q_sample(x0: Tensor, alpha_bar: Tensor, eps: Tensor) -> Tensor:
    """The closed form, a sample of q(x_t | x_0) = N(sqrt(alpha_bar) x0, (1 - alpha_bar) I)."""
    return torch.sqrt(alpha_bar) * x0 + torch.sqrt(1.0 - alpha_bar) * eps


# ----------------------------------------------------------------------------------------
# Conversions between the three things a network can predict: eps, x0 and v
# ----------------------------------------------------------------------------------------
def x0_from_eps(x_t: Tensor, alpha_bar: Tensor, eps: Tensor) -> Tensor:
    """Invert the closed form: x0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)."""
    return (x_t - torch.sqrt(1.0 - alpha_bar) * eps) / torch.sqrt(alpha_bar)


def eps_from_x0(x_t: Tensor, alpha_bar: Tensor, x0: Tensor) -> Tensor:
    """The noise that takes x0 to x_t: eps = (x_t - sqrt(alpha_bar) x0) / sqrt(1 - alpha_bar)."""
    return (x_t - torch.sqrt(alpha_bar) * x0) / torch.sqrt(1.0 - alpha_bar)


def v_from_eps_x0(eps: Tensor, x0: Tensor, alpha_bar: Tensor) -> Tensor:
    """The velocity v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0."""
    return torch.sqrt(alpha_bar) * eps - torch.sqrt(1.0 - alpha_bar) * x0


def x0_from_v(x_t: Tensor, alpha_bar: Tensor, v: Tensor) -> Tensor:
    """x0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v."""
    return torch.sqrt(alpha_bar) * x_t - torch.sqrt(1.0 - alpha_bar) * v


def eps_from_v(x_t: Tensor, alpha_bar: Tensor, v: Tensor) -> Tensor:
    """eps = sqrt(1 - alpha_bar) x_t + sqrt(alpha_bar) v."""
    return torch.sqrt(1.0 - alpha_bar) * x_t + torch.sqrt(alpha_bar) * v


# ----------------------------------------------------------------------------------------
# The posterior q(x_{t-1} | x_t, x_0) and the reverse step
# ----------------------------------------------------------------------------------------
def posterior_mean(x0: Tensor, x_t: Tensor, beta: Tensor, alpha_bar: Tensor,
                   alpha_bar_prev: Tensor) -> Tensor:
    """Mean of q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eq. 7)::

        mu_tilde = sqrt(alpha_bar_prev) beta / (1 - alpha_bar) * x0
                 + sqrt(alpha) (1 - alpha_bar_prev) / (1 - alpha_bar) * x_t
    """
    alpha = 1.0 - beta
    return (torch.sqrt(alpha_bar_prev) * beta / (1.0 - alpha_bar) * x0
            + torch.sqrt(alpha) * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * x_t)


def posterior_variance(beta: Tensor, alpha_bar: Tensor, alpha_bar_prev: Tensor) -> Tensor:
    """Variance of q(x_{t-1} | x_t, x_0): beta_tilde = (1 - alpha_bar_prev) / (1 - alpha_bar) * beta."""
    return (1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * beta


def reverse_mean_from_eps(x_t: Tensor, eps: Tensor, beta: Tensor, alpha_bar: Tensor) -> Tensor:
    """The reverse-step mean written with eps (Ho et al. 2020, eq. 11)::

        mu = (x_t - beta / sqrt(1 - alpha_bar) * eps) / sqrt(alpha)

    It equals :func:`posterior_mean` at x0 = :func:`x0_from_eps` (x_t, alpha_bar, eps).
    """
    alpha = 1.0 - beta
    return (x_t - beta / torch.sqrt(1.0 - alpha_bar) * eps) / torch.sqrt(alpha)


# ----------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------
def gaussian_kl(mean1: Tensor, var1: Tensor, mean2: Tensor, var2: Tensor) -> Tensor:
    """KL( N(mean1, var1) || N(mean2, var2) ), elementwise, for diagonal Gaussians."""
    return 0.5 * (torch.log(var2 / var1) + (var1 + (mean1 - mean2) ** 2) / var2 - 1.0)


def elbo_weight(beta: Tensor, alpha_bar: Tensor, sigma2: Tensor) -> Tensor:
    """The weight lambda_t that turns L_{t-1} into a weighted eps-MSE::

        KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) = lambda_t * ||eps - eps_theta||^2
        lambda_t = beta^2 / (2 sigma^2 alpha (1 - alpha_bar))

    when both Gaussians have variance sigma^2 and p's mean uses eps_theta.
    L_simple drops this weight (sets it to 1).
    """
    alpha = 1.0 - beta
    return beta ** 2 / (2.0 * sigma2 * alpha * (1.0 - alpha_bar))


def loss_simple(model, schedule, x0: Tensor, t: Tensor, eps: Tensor, y: Tensor | None = None,
                reduction: str = "mean") -> Tensor:
    """L_simple = || eps - eps_theta(sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps, t) ||^2.

    ``model(x_t, t)`` (or ``model(x_t, t, y)`` when labels ``y`` are given) predicts eps.
    ``reduction="none"`` returns one loss per image, shape ``(B,)``.
    """
    x_t, _ = schedule.q_sample(x0, t, eps)
    eps_pred = model(x_t, t) if y is None else model(x_t, t, y)
    per_image = F.mse_loss(eps_pred.float(), eps.float(), reduction="none").flatten(1).mean(1)
    if reduction == "none":
        return per_image
    if reduction == "mean":
        return per_image.mean()
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


# ----------------------------------------------------------------------------------------
# The exact noise predictor for Gaussian data: a model with no error, for tests and the book
# ----------------------------------------------------------------------------------------
def gaussian_eps_predictor(schedule, mu: float, s: float):
    """The optimal eps-predictor E[eps | x_t] when the data are x0 ~ N(mu, s^2 I).

    Then x_t ~ N(sqrt(alpha_bar) mu, alpha_bar s^2 + 1 - alpha_bar) and::

        E[eps | x_t] = sqrt(1 - alpha_bar) (x_t - sqrt(alpha_bar) mu) / (alpha_bar s^2 + 1 - alpha_bar)

    A sampler driven by it must produce samples with mean mu and standard deviation s.
    Returns a callable ``(x_t, t) -> eps`` like a trained network.
    """
    if not (math.isfinite(mu) and math.isfinite(s) and s > 0):
        raise ValueError(f"need a finite mean and a positive standard deviation, got mu={mu}, s={s}")

    def eps_model(x_t: Tensor, t: Tensor) -> Tensor:
        alpha_bar = schedule.at("alpha_bars", t, x_t)
        x = x_t.to(alpha_bar.dtype)
        eps = torch.sqrt(1 - alpha_bar) * (x - torch.sqrt(alpha_bar) * mu) / (alpha_bar * s**2 + 1 - alpha_bar)
        return eps.to(x_t.dtype)

    return eps_model
