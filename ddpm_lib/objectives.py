"""What the network is trained to predict, and how each timestep's loss is weighted.

With x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps (the VP path of DDPM), the network
can be asked for any of three targets, each a fixed linear function of (x_t, eps) given t:

    "eps":  eps                                               (Ho et al. 2020)
    "x0":   x0
    "v":    sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0        (Salimans & Ho 2022)

and the samplers convert each back (``samplers.sample(..., prediction=...)``). Flow matching
(Lipman et al. 2023; Liu et al. 2023) changes the path itself: ``"flow"`` trains on the
straight line x_s = (1 - s) x0 + s eps, s = (t + 1) / T, to predict the velocity
dx_s/ds = eps - x0 (:mod:`ddpm_lib.flow` samples such a model).

Weighting, per image, of the squared error of the chosen target:

    "uniform":  1                              (L_simple, for every target)
    "min_snr":  min(SNR_t, gamma) / SNR_t      for eps, the same clamp expressed for
                                               x0 (min(SNR, gamma)) and v
                                               (min(SNR, gamma) / (SNR + 1))
                                               (Hang et al. 2023)
    "elbo":     kappa_t / mean_t(kappa_t)      the weights that make the eps-MSE the ELBO's
                                               term L_{t-1} (Ho et al. 2020, eq. 12; chapter
                                               3's kappa_t, sigma_t^2 = beta_tilde_t), scaled
                                               to mean 1 over t; times SNR for x0 and
                                               SNR / (SNR + 1) for v

On a zero-terminal-SNR schedule (Lin et al. 2024; ``NoiseSchedule.linear(zero_terminal_snr=True)``)
x_{T-1} = eps is pure noise: an eps target there says nothing about x0, and the samplers could
not recover x0 from its prediction, so ``"eps"`` is refused (:func:`check_schedule`); the x0 and
v weights stay finite at SNR = 0 (min-SNR: 0; ELBO: the limit SNR_{T-2} / 2, scaled).

Taught in chapter 5, "Algorithm 1, line by line" (:func:`loss_simple`), and in the chapter
on flow matching.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .diffusion import elbo_weight

Tensor = torch.Tensor

PREDICTIONS = ("eps", "x0", "v", "flow")
WEIGHTINGS = ("uniform", "min_snr", "elbo")


def check(prediction: str, weighting: str = "uniform", snr_gamma: float = 5.0) -> None:
    """Raise ValueError naming the choices when ``prediction`` or ``weighting`` is unknown."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}, "
                         f"got {prediction!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, "
                         f"got {weighting!r}")
    if prediction == "flow" and weighting != "uniform":
        raise ValueError("flow matching trains with weighting='uniform' (the straight path "
                         "has no alpha_bar to weight by)")
    if not snr_gamma > 0:
        raise ValueError(f"snr_gamma must be positive, got {snr_gamma}")


def check_schedule(schedule, prediction: str) -> None:
    """Raise ValueError for an eps target on a zero-terminal-SNR schedule (see the module docstring)."""
    if prediction == "eps" and getattr(schedule, "zero_terminal_snr", False):
        raise ValueError(f"the schedule ends in pure noise (zero terminal SNR: alpha_bar = 0 at t = "
                         f"{schedule.T - 1}), where x_t = eps: an eps target there teaches nothing about "
                         "x0, and no sampler could get x0 from it; train with prediction='v' (Lin et al. "
                         "2024) or 'x0'")


def flow_time(t: Tensor, T: int) -> Tensor:
    """s = (t + 1) / T in (0, 1] for integer timesteps t in 0..T-1, shape like t: the
    straight path's time (s = 1 is pure noise, as t = T - 1 nearly is)."""
    return (t.to(torch.float32) + 1.0) / T


def noisy_and_target(schedule, x0: Tensor, t: Tensor, eps: Tensor,
                     prediction: str = "eps") -> tuple[Tensor, Tensor]:
    """``(x_t, target)`` for one batch: x0, eps (B, C, H, W), t (B,) integer timesteps."""
    if prediction == "flow":
        s = flow_time(t, schedule.T).view(-1, *([1] * (x0.dim() - 1))).to(x0.device)
        return (1.0 - s) * x0 + s * eps, eps - x0
    x_t, _ = schedule.q_sample(x0, t, eps)
    if prediction == "eps":
        return x_t, eps
    if prediction == "x0":
        return x_t, x0
    return x_t, schedule.velocity(x0, t, eps)


def elbo_eps_weights(schedule) -> Tensor:
    """The ELBO's weight on the eps-MSE at each timestep, float64 (T,), scaled to mean 1:
    kappa_t = beta_t^2 / (2 sigma_t^2 alpha_t (1 - alpha_bar_t)) with the true posterior's
    variance sigma_t^2 = beta_tilde_t, so that L_{t-1} = kappa_t ||eps - eps_theta||^2
    (per pixel; chapter 3, "The mean written with the noise"). At the first timestep
    beta_tilde is 0 (that term is the decoder's), and sigma^2 = beta_1 is used there, as Ho
    et al. (2020) do for L_0, which gives kappa = 1 / (2 alpha_1). Equal to
    (SNR_{t-1} - SNR_t) / (2 SNR_t) for the others. The scale (1 / the mean of kappa) only
    rescales the learning rate; it keeps the average weight of L_simple. On a zero-terminal-SNR
    schedule kappa_{T-1} is infinite (alpha_{T-1} = 0) and the mean is over the other steps."""
    return _elbo_kappas(schedule)[0]


def elbo_x0_weights(schedule) -> Tensor:
    """kappa_t SNR_t, the ELBO's weight on the x0-MSE (||eps - eps_theta||^2 = SNR ||x0 -
    x0_theta||^2), float64 (T,), on the scale of :func:`elbo_eps_weights`. Computed as
    beta^2 alpha_bar_prev / (2 sigma^2 (1 - alpha_bar)^2) (alpha_bar = alpha alpha_bar_prev): finite
    at alpha_bar = 0 too, where kappa = inf and SNR = 0 (zero terminal SNR): SNR_{T-2} / 2, scaled."""
    return _elbo_kappas(schedule)[1]


def _elbo_kappas(schedule) -> tuple[Tensor, Tensor]:
    beta, alpha_bar = schedule.float64("betas"), schedule.float64("alpha_bars")
    sigma2 = schedule.float64("beta_tilde").clone()
    sigma2[0] = beta[0]
    kappa = elbo_weight(beta, alpha_bar, sigma2)
    kappa_x0 = beta**2 * schedule.float64("alpha_bars_prev") / (2.0 * sigma2 * (1.0 - alpha_bar) ** 2)
    scale = kappa[torch.isfinite(kappa)].mean()
    return kappa / scale, kappa_x0 / scale


def loss_weights(schedule, t: Tensor, prediction: str = "eps", weighting: str = "uniform",
                 snr_gamma: float = 5.0) -> Tensor | None:
    """Per-image weights (B,) for the squared error of ``prediction`` at timesteps ``t``;
    None for uniform weights; ``"elbo"``: :func:`elbo_eps_weights`, converted. min-SNR-gamma (Hang et al. 2023) weights the x0-error by
    min(SNR, gamma); for eps, whose error is SNR times smaller, that is min(SNR, gamma) / SNR,
    and for v, min(SNR, gamma) / (SNR + 1). At SNR = 0 (zero terminal SNR) x0 and v get 0
    from min-SNR and :func:`elbo_x0_weights` from the ELBO; eps is refused (:func:`check_schedule`)."""
    if weighting == "uniform":
        return None
    check_schedule(schedule, prediction)
    snr = schedule.snr[t.to(schedule.device)]
    if weighting == "elbo":
        if getattr(schedule, "zero_terminal_snr", False):     # kappa SNR = inf * 0 at T-1: its limit
            w_x0 = elbo_x0_weights(schedule).to(schedule.device, torch.float32)[t.to(schedule.device)]
            return {"x0": w_x0, "v": w_x0 / (snr + 1.0)}[prediction]
        w_eps = elbo_eps_weights(schedule).to(schedule.device, torch.float32)[t.to(schedule.device)]
        return {"eps": w_eps, "x0": w_eps * snr, "v": w_eps * snr / (snr + 1.0)}[prediction]
    clamped = snr.clamp(max=snr_gamma)
    if prediction == "eps":
        return clamped / snr
    if prediction == "x0":
        return clamped
    return clamped / (snr + 1.0)


def _predict(model, x_t: Tensor, t: Tensor, y: Tensor | None, like: Tensor,
             prediction: str) -> Tensor:
    out = model(x_t, t) if y is None else model(x_t, t, y)
    if not isinstance(out, torch.Tensor) or out.shape != like.shape:
        # F.mse_loss would broadcast a wrong shape, e.g. (B, 1, 1, 1), with only a warning
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the model must return {prediction} shaped like x_t, "
                         f"{tuple(like.shape)}; got {got}")
    return out


def diffusion_loss(model, schedule, x0: Tensor, t: Tensor, eps: Tensor, y: Tensor | None = None,
                   prediction: str = "eps", weighting: str = "uniform", snr_gamma: float = 5.0,
                   reduction: str = "mean") -> Tensor:
    """The weighted mean squared error of ``model``'s prediction of ``prediction`` (see the
    module docstring) on x_t made from ``x0``, ``eps`` (B, C, H, W) at ``t`` (B,). The mean is
    over pixels of each image, then (``reduction="mean"``) over the batch; ``"none"`` returns
    the per-image losses, shape (B,). eps/uniform is :func:`loss_simple`."""
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if not isinstance(eps, torch.Tensor):
        raise ValueError("eps (the noise added to x0) must be a tensor shaped like x0, "
                         f"got {type(eps).__name__}")
    check(prediction, weighting, snr_gamma)
    check_schedule(schedule, prediction)
    x_t, target = noisy_and_target(schedule, x0, t, eps, prediction)
    out = _predict(model, x_t, t, y, target, prediction)
    per_image = F.mse_loss(out.float(), target.float(), reduction="none").flatten(1).mean(1)
    w = loss_weights(schedule, t, prediction, weighting, snr_gamma)
    if w is not None:
        per_image = per_image * w
    return per_image if reduction == "none" else per_image.mean()


def loss_simple(model, schedule, x0: Tensor, t: Tensor, eps: Tensor, y: Tensor | None = None,
                reduction: str = "mean") -> Tensor:
    """L_simple = || eps - eps_theta(sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps, t) ||^2,
    the mean over pixels of each image, then over the batch. Taught in chapter 3 (the
    derivation) and chapter 5, "Algorithm 1, line by line".

    ``model(x_t, t)`` (or ``model(x_t, t, y)`` when labels ``y`` are given) predicts eps;
    ``x0``, ``eps`` (B, C, H, W), ``t`` (B,). ``reduction="none"`` returns one loss per
    image, shape ``(B,)``.
    """
    return diffusion_loss(model, schedule, x0, t, eps, y, reduction=reduction)
