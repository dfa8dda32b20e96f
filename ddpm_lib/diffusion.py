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

import torch

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------
# Forward process
# ----------------------------------------------------------------------------------------
def q_step(x_prev: Tensor, beta: Tensor, eps: Tensor) -> Tensor:
    """One forward step, a sample of q(x_t | x_{t-1}) = N(sqrt(1 - beta) x_{t-1}, beta I).
    Taught in chapter 2, "One step of noise: a Markov chain"."""
    return torch.sqrt(1.0 - beta) * x_prev + torch.sqrt(beta) * eps


def q_sample(x0: Tensor, alpha_bar: Tensor, eps: Tensor) -> Tensor:
    r"""The closed form, a sample of q(x_t | x_0) = N(sqrt(alpha_bar) x0, (1 - alpha_bar) I).
    Taught in chapter 2, "The closed form $q(x_t \mid x_0)$, line by line"."""
    return torch.sqrt(alpha_bar) * x0 + torch.sqrt(1.0 - alpha_bar) * eps


# ----------------------------------------------------------------------------------------
# Conversions between the three things a network can predict: eps, x0 and v
# ----------------------------------------------------------------------------------------
def x0_from_eps(x_t: Tensor, alpha_bar: Tensor, eps: Tensor) -> Tensor:
    r"""Invert the closed form: x0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar).
    Taught in chapter 3, "Three things a network can predict: $\epsilon$, $x_0$ and $v$"."""
    return (x_t - torch.sqrt(1.0 - alpha_bar) * eps) / torch.sqrt(alpha_bar)


def eps_from_x0(x_t: Tensor, alpha_bar: Tensor, x0: Tensor) -> Tensor:
    r"""The noise that takes x0 to x_t: eps = (x_t - sqrt(alpha_bar) x0) / sqrt(1 - alpha_bar).
    Taught in chapter 3, "Three things a network can predict: $\epsilon$, $x_0$ and $v$"."""
    return (x_t - torch.sqrt(alpha_bar) * x0) / torch.sqrt(1.0 - alpha_bar)


def v_from_eps_x0(eps: Tensor, x0: Tensor, alpha_bar: Tensor) -> Tensor:
    r"""The velocity v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0.
    Taught in chapter 3, "Three things a network can predict: $\epsilon$, $x_0$ and $v$"."""
    return torch.sqrt(alpha_bar) * eps - torch.sqrt(1.0 - alpha_bar) * x0


def x0_from_v(x_t: Tensor, alpha_bar: Tensor, v: Tensor) -> Tensor:
    r"""x0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v.
    Taught in chapter 3, "Three things a network can predict: $\epsilon$, $x_0$ and $v$"."""
    return torch.sqrt(alpha_bar) * x_t - torch.sqrt(1.0 - alpha_bar) * v


def eps_from_v(x_t: Tensor, alpha_bar: Tensor, v: Tensor) -> Tensor:
    r"""eps = sqrt(1 - alpha_bar) x_t + sqrt(alpha_bar) v.
    Taught in chapter 3, "Three things a network can predict: $\epsilon$, $x_0$ and $v$"."""
    return torch.sqrt(1.0 - alpha_bar) * x_t + torch.sqrt(alpha_bar) * v


# ----------------------------------------------------------------------------------------
# The posterior q(x_{t-1} | x_t, x_0) and the reverse step
# ----------------------------------------------------------------------------------------
def posterior_mean(x0: Tensor, x_t: Tensor, beta: Tensor, alpha_bar: Tensor,
                   alpha_bar_prev: Tensor) -> Tensor:
    """Mean of q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eq. 7)::

        mu_tilde = sqrt(alpha_bar_prev) beta / (1 - alpha_bar) * x0
                 + sqrt(alpha) (1 - alpha_bar_prev) / (1 - alpha_bar) * x_t

    Taught in chapter 3, "The posterior given the clean image" (``ch03-posterior``).
    """
    alpha = 1.0 - beta
    return (torch.sqrt(alpha_bar_prev) * beta / (1.0 - alpha_bar) * x0
            + torch.sqrt(alpha) * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * x_t)


def posterior_variance(beta: Tensor, alpha_bar: Tensor, alpha_bar_prev: Tensor) -> Tensor:
    """Variance of q(x_{t-1} | x_t, x_0): beta_tilde = (1 - alpha_bar_prev) / (1 - alpha_bar) * beta.
    Taught in chapter 3, "The posterior given the clean image" (``ch03-posterior``)."""
    return (1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * beta


def reverse_mean_from_eps(x_t: Tensor, eps: Tensor, beta: Tensor, alpha_bar: Tensor) -> Tensor:
    """The reverse-step mean written with eps (Ho et al. 2020, eq. 11)::

        mu = (x_t - beta / sqrt(1 - alpha_bar) * eps) / sqrt(alpha)

    It equals :func:`posterior_mean` at x0 = :func:`x0_from_eps` (x_t, alpha_bar, eps).
    Taught in chapter 3, "The mean written with the noise".
    """
    alpha = 1.0 - beta
    return (x_t - beta / torch.sqrt(1.0 - alpha_bar) * eps) / torch.sqrt(alpha)


# ----------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------
def gaussian_kl(mean1: Tensor, var1: Tensor, mean2: Tensor, var2: Tensor) -> Tensor:
    """KL( N(mean1, var1) || N(mean2, var2) ), elementwise, for diagonal Gaussians.
    Taught in chapter 3, "The KL between two Gaussians"."""
    return 0.5 * (torch.log(var2 / var1) + (var1 + (mean1 - mean2) ** 2) / var2 - 1.0)


def elbo_weight(beta: Tensor, alpha_bar: Tensor, sigma2: Tensor) -> Tensor:
    """The weight kappa_t that turns L_{t-1} into a weighted eps-MSE (Chapter 3)::

        L_{t-1} - C_t = E[ kappa_t * ||eps - eps_theta||^2 ]
        kappa_t = beta^2 / (2 sigma^2 alpha (1 - alpha_bar))

    where p's mean uses eps_theta and has variance sigma^2, and C_t, the KL between the
    variances, does not depend on theta (C_t = 0 when sigma^2 = beta_tilde).
    L_simple drops this weight (sets it to 1).
    Taught in chapter 3, "The mean written with the noise".
    """
    alpha = 1.0 - beta
    return beta ** 2 / (2.0 * sigma2 * alpha * (1.0 - alpha_bar))
