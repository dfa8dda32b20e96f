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

from .checks import real

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
    """The weight kappa_t that turns L_{t-1} into a weighted eps-MSE (Chapter 3)::

        L_{t-1} - C_t = E[ kappa_t * ||eps - eps_theta||^2 ]
        kappa_t = beta^2 / (2 sigma^2 alpha (1 - alpha_bar))

    where p's mean uses eps_theta and has variance sigma^2, and C_t, the KL between the
    variances, does not depend on theta (C_t = 0 when sigma^2 = beta_tilde).
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
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if not isinstance(eps, torch.Tensor):
        raise ValueError("eps (the noise added to x0) must be a tensor shaped like x0, "
                         f"got {type(eps).__name__}")
    x_t, _ = schedule.q_sample(x0, t, eps)
    eps_pred = model(x_t, t) if y is None else model(x_t, t, y)
    if not isinstance(eps_pred, torch.Tensor) or eps_pred.shape != eps.shape:
        # F.mse_loss would broadcast a wrong shape, e.g. (B, 1, 1, 1), with only a warning
        got = (tuple(eps_pred.shape) if isinstance(eps_pred, torch.Tensor)
               else type(eps_pred).__name__)
        raise ValueError(f"the model must return eps shaped like x_t, {tuple(eps.shape)}; "
                         f"got {got}")
    per_image = F.mse_loss(eps_pred.float(), eps.float(), reduction="none").flatten(1).mean(1)
    return per_image if reduction == "none" else per_image.mean()


# ----------------------------------------------------------------------------------------
# Exact noise predictors for data whose noised densities are known: models with no error
# ----------------------------------------------------------------------------------------
def gaussian_eps_predictor(schedule, mu: float, sigma_data: float):
    """The optimal eps-predictor E[eps | x_t] when the data are x0 ~ N(mu, sigma_data^2 I).

    Then x_t ~ N(sqrt(alpha_bar) mu, v) with v = alpha_bar sigma_data^2 + 1 - alpha_bar,
    and::

        E[eps | x_t] = sqrt(1 - alpha_bar) (x_t - sqrt(alpha_bar) mu) / v

    A sampler driven by it must produce samples with mean mu and standard deviation
    sigma_data. Returns a callable ``(x_t, t) -> eps`` like a trained network.
    """
    mu = real("the mean mu", mu)
    sigma_data = real("the standard deviation sigma_data", sigma_data)
    if not sigma_data > 0:
        raise ValueError(f"need a finite mean and a positive standard deviation, "
                         f"got mu={mu}, sigma_data={sigma_data}")

    def eps_model(x_t: Tensor, t: Tensor) -> Tensor:
        alpha_bar = schedule.at("alpha_bars", t, x_t)
        x = x_t.to(alpha_bar.dtype)
        v = alpha_bar * sigma_data**2 + 1 - alpha_bar
        eps = torch.sqrt(1 - alpha_bar) * (x - torch.sqrt(alpha_bar) * mu) / v
        return eps.to(x_t.dtype)

    return eps_model


def gaussian_mixture_eps_predictor(schedule, means, stds, weights=None):
    """The optimal eps-predictor E[eps | x_t] when the data are a mixture of Gaussians,
    x0 ~ sum_k pi_k N(mu_k, sigma_k^2 I), points of shape (D,).

    Given component k, x_t ~ N(sqrt(alpha_bar) mu_k, v_k I) with
    v_k = alpha_bar sigma_k^2 + 1 - alpha_bar, and E[eps | x_t, k] is the Gaussian case of
    :func:`gaussian_eps_predictor`. Averaged over the posterior of the component,
    r_k(x_t) = pi_k N(x_t; sqrt(alpha_bar) mu_k, v_k I) / p_t(x_t)::

        E[eps | x_t] = sum_k r_k(x_t) sqrt(1 - alpha_bar) (x_t - sqrt(alpha_bar) mu_k) / v_k

    ``means`` (K, D), ``stds`` (K,), ``weights`` (K,) (equal if None). Returns a callable
    ``(x_t (B, D), t (B,)) -> eps (B, D)`` like a trained network.
    """
    means = torch.as_tensor(means, dtype=torch.float64)
    means = means[:, None] if means.ndim == 1 else means
    stds = torch.as_tensor(stds, dtype=torch.float64).reshape(-1)
    K = means.shape[0]
    weights = torch.full((K,), 1.0 / K, dtype=torch.float64) if weights is None else \
        torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
    if means.ndim != 2 or stds.shape != (K,) or weights.shape != (K,):
        raise ValueError(f"need means (K, D), stds (K,) and weights (K,); got {tuple(means.shape)}, "
                         f"{tuple(stds.shape)}, {tuple(weights.shape)}")
    if not (torch.isfinite(means).all() and (stds > 0).all() and (weights > 0).all()):
        raise ValueError("means must be finite, stds and weights positive")
    weights = weights / weights.sum()

    def eps_model(x_t: Tensor, t: Tensor) -> Tensor:
        if x_t.ndim != 2 or x_t.shape[1] != means.shape[1]:
            raise ValueError(f"x_t must have shape (B, {means.shape[1]}), got {tuple(x_t.shape)}")
        alpha_bar = schedule.at("alpha_bars", t, x_t).to(means.device)     # (B, 1)
        x = x_t.to(torch.float64)
        v = alpha_bar * stds**2 + 1 - alpha_bar                               # (B, K)
        diff = x[:, None, :] - alpha_bar.sqrt()[:, :, None] * means          # (B, K, D)
        D = means.shape[1]
        log_r = (weights.log() - 0.5 * D * torch.log(2 * math.pi * v)
                 - 0.5 * (diff**2).sum(-1) / v)
        r = torch.softmax(log_r, dim=1)                                        # (B, K)
        eps = torch.sqrt(1 - alpha_bar) * (r[:, :, None] * diff / v[:, :, None]).sum(1)
        return eps.to(x_t.dtype)

    return eps_model
