"""Exact noise predictors for data whose noised densities are known: models with no error.

For Gaussian data, or a mixture of Gaussians, E[eps | x_t] has a closed form, so these
callables ``(x_t, t) -> eps`` are the best any network could learn (the MSE optimum of
L_simple). Chapters and tests drive samplers with them to check the samplers alone, free of
training error. Taught in chapter 1 (the denoiser of a one-dimensional Gaussian) and chapter
3, "The best predictor: a conditional mean, Tweedie's formula and the score" (``ch03-optimum``).
"""
from __future__ import annotations

import math

import torch

from .checks import real

Tensor = torch.Tensor


def gaussian_eps_predictor(schedule, mu: float, sigma_data: float):
    """The optimal eps-predictor E[eps | x_t] when the data are x0 ~ N(mu, sigma_data^2 I).

    Then x_t ~ N(sqrt(alpha_bar) mu, v) with v = alpha_bar sigma_data^2 + 1 - alpha_bar,
    and::

        E[eps | x_t] = sqrt(1 - alpha_bar) (x_t - sqrt(alpha_bar) mu) / v

    A sampler driven by it must produce samples with mean mu and standard deviation
    sigma_data. Returns a callable ``(x_t, t) -> eps`` like a trained network.
    Taught in chapter 1, "A toy world with a perfect denoiser"; the optimum it computes in
    chapter 3, "The best predictor: a conditional mean, Tweedie's formula and the score"
    (``ch03-optimum``).
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
    Taught in chapter 3, "Checks on data whose posterior is known" (``ch03-optimum``).
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
