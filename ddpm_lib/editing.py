"""Editing with a trained diffusion model: SDEdit, inpainting and DDIM inversion.

None of the three trains anything. Each starts the reverse process from a point built out of
an image instead of pure noise, or constrains it to agree with one, and runs it with the one
driver of :mod:`ddpm_lib.samplers`:

* :func:`sdedit` (Meng et al. 2022): noise the image to an intermediate timestep with the
  forward process, then denoise it; the model's prior repairs what the noise washed out.
* :func:`inpaint`: fill the pixels where ``mask`` is 0 with an *unconditional* model, by
  replacing the known pixels with the noised data after each reverse step (:func:`replace_step`),
  and by RePaint's resampling (Lugmayr et al. 2022, :func:`repaint_step`). The two step
  functions fit the sampler contract; :data:`INPAINTING` holds them as :class:`Sampler` entries,
  kept out of :data:`~ddpm_lib.samplers.SAMPLERS` because they need the image and the mask.
* :func:`ddim_invert` (Song et al. 2021; Dhariwal & Nichol 2021; Mokady et al. 2023): run the
  deterministic DDIM update upwards, from an image to the x_T that DDIM sampling maps back to
  it (:func:`ddim_reconstruct`), approximately.

Shapes: images x0 (B, C, H, W) (any (B, ...) works), float; the results are float32 on x0's
device. Taught in chapter 13.
"""
from __future__ import annotations

import math

import torch

from .checks import integer
from .samplers import (SAMPLERS, Sampler, StepOutput, Trajectory, alpha_bar_at, check_sigma, eps_and_x0,
                       ddim_step, ddim_timesteps, ddpm_step, resolve_timesteps, sample)

Tensor = torch.Tensor

PREDICTIONS = ("eps", "x0", "v")


# ----------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------
def _check_batch(name: str, x) -> Tensor:
    """``x`` as float32: a finite floating-point tensor with a batch dimension first."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 2:
        got = f"shape {tuple(x.shape)}, dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a floating-point tensor of images (B, C, H, W), got {got}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values; give every pixel a finite value "
                         "(pixels to be filled can hold anything finite, e.g. 0)")
    return x.float()


def _on(schedule, device):
    """``schedule`` on ``device`` (a copy only when it lives elsewhere)."""
    if not hasattr(schedule, "alpha_bars"):
        raise ValueError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    return schedule if schedule.device == device else schedule.to(device)


def _check_mask(mask, x_known: Tensor) -> Tensor:
    """``mask`` as float32 on x_known's device: broadcastable to x_known, values in [0, 1]."""
    if not isinstance(mask, torch.Tensor) or mask.is_complex():
        raise ValueError("mask must be a tensor, 1 where the pixel is known and 0 where it is to "
                         f"be filled, got {type(mask).__name__}")
    mask = mask.to(x_known.device, torch.float32)            # bool and integer masks become 0/1
    try:
        fits = torch.broadcast_shapes(mask.shape, x_known.shape) == x_known.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, which does not broadcast to x_known's "
                         f"{tuple(x_known.shape)}; give (B, C, H, W), (B, 1, H, W), (1, 1, H, W) or (H, W)")
    if not torch.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
        raise ValueError(f"mask values must lie in [0, 1] (1: known, 0: to be filled), got values from "
                         f"{mask.min().item():.3g} to {mask.max().item():.3g}; a 0/255 mask: divide by 255")
    return mask


def _check_inpainting(options: dict) -> dict:
    """The ``check`` of the :data:`INPAINTING` entries: image, mask, sigma and (RePaint) U."""
    x_known = _check_batch("x_known", options["x_known"])
    cleaned = {**check_sigma(options), "x_known": x_known, "mask": _check_mask(options["mask"], x_known)}
    if "resample" in options:
        cleaned["resample"] = integer("resample (RePaint's U, passes per timestep)", options["resample"],
                                      minimum=1)
    return cleaned


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be 'eps', 'x0' or 'v', got {prediction!r}")


# ----------------------------------------------------------------------------------------
# SDEdit
# ----------------------------------------------------------------------------------------
@torch.no_grad()
def sdedit(model, schedule, x0: Tensor, t_start: int, *, sampler: str | Sampler = "ddim",
           steps: int | None = None, generator: torch.Generator | None = None, prediction: str = "eps",
           **options) -> Tensor:
    """SDEdit (Meng et al. 2022): noise ``x0`` to timestep ``t_start``, then denoise::

        x_{t_start} = sqrt(alpha_bar_{t_start}) x0 + sqrt(1 - alpha_bar_{t_start}) eps,  eps ~ N(0, I)
        x0_edited   = the reverse process from x_{t_start}, over t_start, ..., 0

    The noise hides detail below its level and keeps the coarse layout, so the result is a
    sample of the model's distribution that still resembles ``x0``: ``t_start = 0`` gives
    x0 back (up to one step of noise, std sqrt(beta_0) = 0.01 on the linear schedule),
    ``t_start = T-1`` forgets it (alpha_bar_{T-1} = 4e-5, linear) and is plain sampling; in between
    t_start trades faithfulness to x0 for realism. ``model`` is any ``(x_t, t) -> eps``
    callable: :func:`ddpm_lib.guidance.guided_model` of a class-conditional network with
    another class ``y`` edits *towards that class*.

    The denoising is :func:`~ddpm_lib.samplers.sample` with ``x_T=x_{t_start}`` and
    ``timesteps=`` ``steps`` timesteps evenly spaced from t_start down to 0 (default: the
    sampler's default number, 50 for DDIM, every timestep for DDPM, at most t_start + 1).
    Meng et al. run the reverse SDE (``sampler="ddpm"`` or ``"euler_maruyama"``); the default
    ``"ddim"`` is the deterministic probability-flow variant. ``options`` go to
    :func:`~ddpm_lib.samplers.sample`: the sampler's (``eta=``, ``sigma=``, ``order=``) and
    ``clip_x0=``, ``trajectory=``, ``progress=``. ``generator`` draws the forward noise, then
    the sampler's. Shapes: x0 (B, C, H, W), returns (B, C, H, W) float32.
    Taught in chapter 13, section "SDEdit: noise, then denoise" (``ch13-sdedit``).
    """
    x0 = _check_batch("x0", x0)
    schedule = _on(schedule, x0.device)
    t_start = integer("t_start", t_start)
    if not 0 <= t_start <= schedule.T - 1:
        raise ValueError(f"t_start must be a timestep in 0..{schedule.T - 1} (0-based): how far to noise "
                         f"x0 before denoising, 0 keeps x0 and {schedule.T - 1} forgets it; got {t_start}")
    taken = sorted({"timesteps", "spacing", "x_T", "shape", "device"} & options.keys())
    if taken:
        raise ValueError(f"sdedit sets {', '.join(taken)} itself (the grid runs from t_start to 0, x_T is "
                         "x0 noised to t_start); choose the number of steps with steps=")
    if steps is None:
        entry = SAMPLERS.get(sampler) if isinstance(sampler, str) else sampler
        steps = min(getattr(entry, "steps", None) or t_start + 1, t_start + 1)
    steps = integer("steps", steps, minimum=1)
    if steps > t_start + 1:
        raise ValueError(f"steps must be at most t_start + 1 = {t_start + 1} (one network call per "
                         f"timestep from t_start down to 0), got {steps}")
    x_start, _ = schedule.q_sample(x0, t_start, generator=generator)
    return sample(model, schedule, x0.shape, sampler=sampler, timesteps=ddim_timesteps(t_start + 1, steps),
                  x_T=x_start, generator=generator, prediction=prediction, device=x0.device, **options)


# ----------------------------------------------------------------------------------------
# Inpainting with an unconditional model
# ----------------------------------------------------------------------------------------
def replace_step(schedule, x_t, t, t_prev, eps, x0_hat, *, state, denoise=None, generator=None,
                 x_known, mask, sigma="beta"):
    """One reverse step that keeps the known pixels: a DDPM ancestral step
    (:func:`~ddpm_lib.samplers.ddpm_step`) to t_prev, then the known region replaced by the
    data noised to t_prev with fresh noise (the forward process, q_sample)::

        x_prev  = ddpm_step(x_t)                                               the whole image
        x_prev <- mask * (sqrt(alpha_bar_prev) x_known + sqrt(1 - alpha_bar_prev) z)
                  + (1 - mask) * x_prev,                                        z ~ N(0, I)

    and after the last step (t_prev = -1, alpha_bar = 1) ``mask * x_known + (1 - mask) x_prev``:
    the known pixels are x_known exactly where mask is 1. The known region thus has the
    marginal of the forward process at every step, the hole follows the model. On a grid
    that skips timesteps, the DDPM step is the respaced one. ``x_known`` (B, C, H, W),
    ``mask`` broadcastable to it, 1 where known; the values of x_known in the hole are
    never used. The step function of ``INPAINTING["replace"]``; run it with :func:`inpaint`.
    Taught in chapter 13, section "Inpainting with an unconditional model"
    (``ch13-inpainting``).
    """
    x_prev = ddpm_step(schedule, x_t, t, t_prev, eps, x0_hat, state=state, generator=generator,
                       sigma=sigma).x_prev
    if t_prev < 0:
        known = x_known
    else:
        known, _ = schedule.q_sample(x_known, t_prev, generator=generator)
    return StepOutput(mask * known + (1.0 - mask) * x_prev, x0_hat)


def repaint_step(schedule, x_t, t, t_prev, eps, x0_hat, *, state, denoise=None, generator=None,
                 x_known, mask, resample=10, sigma="beta"):
    """RePaint's step (Lugmayr et al. 2022, Algorithm 1): :func:`replace_step`, done
    ``resample`` = U times, each pass after the first starting from the previous result noised
    one step back up with the forward process::

        x_t <- sqrt(alpha) x_prev + sqrt(1 - alpha) z,   alpha = alpha_bar_t / alpha_bar_prev,  z ~ N(0, I)
        (eps, x0_hat) = denoise(x_t, t);   x_prev = replace_step(x_t)

    On the full grid alpha = 1 - beta_t: x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) z. The
    re-noised x_t mixes the model's hole with the known pixels, and each new pass lets the
    model make the hole agree with them ("harmonise"); replacement alone never feeds the
    known pixels back like that. U = 1 is :func:`replace_step`, draw for draw. The last step
    (t_prev = -1) is done once: its passes would all give the same image. Jump length 1:
    the paper also re-noises j > 1 steps at a time (its j = 10); not done here. Cost: U
    network calls per timestep, made with ``denoise`` inside this one step.
    Taught in chapter 13, section "Inpainting with an unconditional model"
    (``ch13-inpainting``).
    """
    options = dict(state=state, generator=generator, x_known=x_known, mask=mask, sigma=sigma)
    out = replace_step(schedule, x_t, t, t_prev, eps, x0_hat, **options)
    if t_prev < 0 or resample == 1:
        return out
    if denoise is None:
        raise ValueError("repaint_step calls the model again: run it through sample() or inpaint(), "
                         "which pass denoise(x, t) -> (eps, x0_hat)")
    alpha = alpha_bar_at(schedule, t) / alpha_bar_at(schedule, t_prev)
    for _ in range(resample - 1):
        z = torch.randn(x_t.shape, generator=generator, device=x_t.device)
        x_t = math.sqrt(alpha) * out.x_prev + math.sqrt(1.0 - alpha) * z
        eps, x0_hat = denoise(x_t, t)
        out = replace_step(schedule, x_t, t, t_prev, eps, x0_hat, **options)
    return out


# method -> the sampler entry (step function, label, default grid: every timestep, options)
INPAINTING: dict[str, Sampler] = {
    "replace": Sampler(replace_step, "Inpainting (replace)", None, "time",
                       {"x_known": None, "mask": None, "sigma": "beta"}, _check_inpainting),
    "repaint": Sampler(repaint_step, "RePaint", None, "time",
                       {"x_known": None, "mask": None, "resample": 10, "sigma": "beta"}, _check_inpainting),
}


def inpaint(model, schedule, x_known: Tensor, mask: Tensor, *, method: str = "replace",
            resample: int | None = None, steps: int | None = None, sigma: str = "beta",
            generator: torch.Generator | None = None, prediction: str = "eps", clip_x0: bool = True,
            x_T: Tensor | None = None, trajectory: Trajectory | None = None,
            progress: bool = False) -> Tensor:
    """Fill the pixels of ``x_known`` where ``mask`` is 0 with an unconditional model.

    The reverse process runs from x_T ~ N(0, I) (or the ``x_T`` given) with DDPM ancestral
    steps, and after each one the known pixels are set to the data noised to the new
    timestep (:func:`replace_step`)::

        x_prev <- mask * q_sample(x_known, t_prev, z) + (1 - mask) * x_prev

    ``method="repaint"`` adds RePaint's resampling (:func:`repaint_step`): each step done
    ``resample`` = U times (default 10), re-noising x_prev one step back up between passes
    (jump length 1). U = 1 is ``"replace"``, draw for draw. The result equals x_known
    exactly where mask is 1 and blends the two where it lies between 0 and 1.

    ``mask``: 1 where the pixel is known, 0 where it is to be filled; bool, integer or float
    in [0, 1], broadcastable to x_known (B, C, H, W), e.g. (1, 1, H, W) for one mask for all.
    ``steps``: every timestep by default (a smaller number respaces the DDPM steps).
    ``sigma``, ``generator``, ``prediction``, ``clip_x0``, ``x_T``, ``trajectory``,
    ``progress``: as for :func:`~ddpm_lib.samplers.sample`, which runs the
    :data:`INPAINTING` entry of ``method``. Returns (B, C, H, W) float32.
    Taught in chapter 13, section "Inpainting with an unconditional model"
    (``ch13-inpainting``).
    """
    if method not in INPAINTING:
        raise ValueError(f"method must be 'replace' or 'repaint' (RePaint), got {method!r}")
    x_known = _check_batch("x_known", x_known)
    options = dict(x_known=x_known, mask=mask, sigma=sigma)
    if method == "repaint":
        options["resample"] = INPAINTING["repaint"].options["resample"] if resample is None else resample
    elif resample not in (None, 1):
        raise ValueError(f"resample (U = {resample!r}) is RePaint's number of passes per timestep: "
                         "use method='repaint', or leave resample out")
    return sample(model, schedule, x_known.shape, sampler=INPAINTING[method], steps=steps,
                  prediction=prediction, clip_x0=clip_x0, generator=generator, x_T=x_T,
                  device=x_known.device, trajectory=trajectory, progress=progress, **options)


# ----------------------------------------------------------------------------------------
# DDIM inversion
# ----------------------------------------------------------------------------------------
@torch.no_grad()
def ddim_invert(model, schedule, x0: Tensor, steps: int | None = None, *, timesteps=None,
                spacing: str = "time", prediction: str = "eps", clip_x0: bool = False,
                trajectory: Trajectory | None = None) -> Tensor:
    """DDIM inversion: the deterministic DDIM update (eta = 0) run *upwards*, from the image
    x0 to the x_T that DDIM sampling on the same grid maps back to x0 (approximately)::

        x_{t_{i+1}} = sqrt(alpha_bar_{t_{i+1}}) x0_hat_i + sqrt(1 - alpha_bar_{t_{i+1}}) eps_i
        eps_i = model(x_{t_i}, t_i)
        x0_hat_i = (x_{t_i} - sqrt(1 - alpha_bar_{t_i}) eps_i) / sqrt(alpha_bar_{t_i})

    over the grid t_0 < t_1 < ... < t_K (the reverse of the sampling grid: ``steps`` of them,
    default 50, spaced by ``spacing``, or the descending ``timesteps=`` sampling would use),
    starting from the data itself (alpha_bar = 1, x0_hat = x0; the model is evaluated at
    t_0, the nearest timestep it knows). It is :func:`~ddpm_lib.samplers.ddim_step` with the
    target's alpha_bar, and the model's output converted by the driver's own conversion.

    Why it drifts: sampling moves from x_{t_{i+1}} to x_{t_i} with eps evaluated at
    x_{t_{i+1}}; undoing that step exactly would need that same eps, at the point x_{t_{i+1}}
    that is still unknown. Inversion uses eps at x_{t_i}, where it stands: a linearisation
    (Euler's method on the probability-flow ODE, run the other way). So
    ``ddim_reconstruct(ddim_invert(x0))`` returns x0 up to an error that vanishes as steps
    -> infinity, or exactly when eps is constant along the path (then x_T is
    q_sample(x0, T-1, eps), and every step is exact). With the exact predictor of Gaussian
    pixels N(0.3, 0.5^2) (chapter 1) the round trip is off by up to 0.24 at 50 steps, 0.06 at
    200: halved each time the steps double, first order (tests/test_editing.py).

    ``clip_x0`` is False by default: clipping x0_hat would make the map non-invertible.
    ``trajectory``: a new :class:`~ddpm_lib.samplers.Trajectory`, to record each step's
    target timestep, x there and the x0_hat used, clean to noisy. x0 (B, C, H, W); returns
    x at t_K (T-1 by default), float32. Taught in chapter 13, section "DDIM inversion"
    (``ch13-inversion``).
    """
    x0 = _check_batch("x0", x0)
    schedule = _on(schedule, x0.device)
    _check_prediction(prediction)
    if trajectory is not None and (not isinstance(trajectory, Trajectory) or trajectory.t):
        raise ValueError("trajectory must be a new Trajectory() (one per run)")
    if steps is None and timesteps is None:
        steps = SAMPLERS["ddim"].steps
    grid = resolve_timesteps(schedule, steps, spacing, timesteps)[::-1]      # ascending: t_0 < ... < t_K
    x = x0
    for t_from, t_to in zip([-1] + grid, grid):
        t_model = torch.full((x.shape[0],), max(t_from, grid[0]), device=x.device, dtype=torch.long)
        eps, x0_hat = eps_and_x0(model, schedule, x, t_model, prediction, clip_x0)
        if t_from < 0:                        # x is the data itself: alpha_bar = 1, x0_hat = x
            x0_hat = x
        # DDIM's deterministic update (eta = 0), run upwards: from t_from to t_to
        x = ddim_step(schedule, x, t_from, t_to, eps, x0_hat, state={}).x_prev
        if trajectory is not None:
            trajectory.add(t_to, x, x0_hat)
    if trajectory is not None:
        trajectory.stack()
    return x


def ddim_reconstruct(model, schedule, x_T: Tensor, steps: int | None = None, *, timesteps=None,
                     spacing: str = "time", prediction: str = "eps", clip_x0: bool = False,
                     trajectory: Trajectory | None = None) -> Tensor:
    """DDIM sampling (eta = 0) from ``x_T`` over the grid :func:`ddim_invert` climbed, given
    by the same ``steps``/``spacing`` or ``timesteps``: the way back from an inversion,
    ``sample(model, schedule, x_T.shape, sampler="ddim", steps=steps, x_T=x_T, clip_x0=False)``.
    Edit between the two (another class through
    :func:`~ddpm_lib.guidance.guided_model`, another prompt) and the result keeps what the
    inverted x_T encodes of the original. x_T (B, C, H, W); returns (B, C, H, W) float32.
    Taught in chapter 13, section "DDIM inversion" (``ch13-inversion``).
    """
    x_T = _check_batch("x_T", x_T)
    return sample(model, schedule, x_T.shape, sampler="ddim", steps=steps, spacing=spacing,
                  timesteps=timesteps, x_T=x_T, prediction=prediction, clip_x0=clip_x0,
                  device=x_T.device, trajectory=trajectory, eta=0.0)
