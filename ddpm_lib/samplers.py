"""Samplers: loops that turn noise into data with a noise predictor.

Each sampler takes ``model``, any callable ``(x_t, t) -> eps`` with x_t of shape
(B, C, H, W) and t a (B,) long tensor of 0-based timesteps, and a
:class:`~ddpm_lib.schedules.NoiseSchedule`. They are interchangeable: same model, same
schedule, same shape, a different way of walking back from t = T-1 to data.

* :func:`ddpm_sample`: ancestral sampling, Algorithm 2 of Ho et al. (2020), T steps.
* :func:`ddim_sample`: DDIM (Song et al. 2021), any subsequence of timesteps, eta from
  0 (deterministic) to 1 (DDPM-like).
* :func:`dpm_solver_sample`: DPM-Solver++(2M) (Lu et al. 2022), a second-order multistep
  solver of the same ODE as DDIM with eta = 0: good samples in 10 to 20 network calls.

And one wrapper that turns a class-conditional network into a model function for any of
them: :func:`guided_model`, classifier-free guidance (Ho & Salimans 2022).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .checks import integer, integer_dtype, integers, real

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
    """The shape to sample, (B, C, H, W) (or any (B, ...)): positive integers."""
    shape = integers("shape (B, C, H, W)", shape, minimum=1)
    if len(shape) < 2:
        raise ValueError(f"shape must be (B, C, H, W) with positive sizes, got {shape}")
    return shape


def _start(schedule, shape, x_T, generator, device):
    if not hasattr(schedule, "alpha_bars"):
        raise ValueError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__} "
                         "(the arguments are model, schedule, shape)")
    shape = _check_shape(shape)
    device = torch.device(device) if device is not None else schedule.device
    if schedule.device != device:
        schedule = schedule.to(device)
    if x_T is None:
        x_T = torch.randn(shape, generator=generator, device=device)
    elif not isinstance(x_T, torch.Tensor) or not x_T.is_floating_point():
        raise ValueError(f"x_T must be a floating-point tensor of shape {shape}, got "
                         f"{x_T.dtype if isinstance(x_T, torch.Tensor) else type(x_T).__name__}")
    elif tuple(x_T.shape) != shape:
        raise ValueError(f"x_T has shape {tuple(x_T.shape)} but shape is {shape}")
    return schedule, x_T.to(device, torch.float32)


def _denoise(model, schedule, x, t_batch, clip_x0):
    """One network call: eps, and the x0 it implies (clipped to [-1, 1] if asked, with eps
    re-derived from the clipped x0 so the two stay consistent)."""
    eps = model(x, t_batch)
    if not isinstance(eps, torch.Tensor):
        raise ValueError("the model must return a tensor eps shaped like x_t, "
                         f"got {type(eps).__name__}")
    eps = eps.float()
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
    steps = _check_steps(steps, T)
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
    if not 0.0 <= real("eta", eta) <= 1.0:
        raise ValueError(f"eta must lie in [0, 1], got {eta}")
    schedule, x = _start(schedule, shape, x_T, generator, device)
    if timesteps is None:
        timesteps = ddim_timesteps(schedule.T, steps)
    else:
        timesteps = _check_timesteps(timesteps, schedule.T)
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


# ----------------------------------------------------------------------------------------
# DPM-Solver++(2M)
# ----------------------------------------------------------------------------------------
def logsnr_timesteps(schedule, steps: int) -> list[int]:
    """``steps`` timesteps from T-1 down to 0 spaced evenly in lambda = log(a_t / b_t)
    (half the log-SNR) instead of in t, each rounded to the nearest discrete timestep.

    The spacing Lu et al. (2022) recommend for low-resolution images; pass it to
    :func:`dpm_solver_sample` or :func:`ddim_sample` as ``timesteps=``. Where rounding would
    merge neighbours (lambda changes faster than the integer grid), they are pushed apart
    to the next free timestep, so the list holds exactly ``steps`` distinct timesteps,
    descending, from T-1 to 0.
    """
    T = schedule.T
    steps = _check_steps(steps, T)
    if steps == 1:
        return [T - 1]
    lam = _lambdas(schedule)                      # (T,) float64, decreasing in t
    targets = torch.linspace(float(lam[-1]), float(lam[0]), steps, dtype=torch.float64)
    ts = (lam[None, :] - targets[:, None]).abs().argmin(dim=1).tolist()   # T-1 ... 0, non-increasing
    for i in range(steps - 2, -1, -1):            # strictly decreasing: push merged ones up ...
        ts[i] = max(ts[i], ts[i + 1] + 1)
    if ts[0] > T - 1:                             # ... and, if that overshot T-1, back down
        ts[0] = T - 1
        for i in range(1, steps):
            ts[i] = min(ts[i], ts[i - 1] - 1)
    return ts


def _lambdas(schedule) -> Tensor:
    """lambda_t = log(a_t / b_t) = 0.5 log(alpha_bar / (1 - alpha_bar)), float64 (T,)."""
    alpha_bar = schedule.float64("alpha_bars")
    return 0.5 * (torch.log(alpha_bar) - torch.log1p(-alpha_bar))


def _check_steps(steps, T: int) -> int:
    steps = integer("steps", steps, minimum=1)
    if steps > T:
        raise ValueError(f"steps must be an integer in 1..{T} (the schedule's T), got {steps!r}")
    return steps


def _check_timesteps(timesteps, T: int) -> list[int]:
    """Timesteps given by hand: integers, strictly decreasing, within 0..T-1."""
    timesteps = list(integers("timesteps", timesteps))
    if not timesteps or any(b >= a for a, b in zip(timesteps, timesteps[1:])) \
            or timesteps[0] > T - 1 or timesteps[-1] < 0:
        raise ValueError(f"timesteps must be strictly decreasing within 0..{T - 1}")
    return timesteps


@torch.no_grad()
def dpm_solver_sample(model, schedule, shape, *, steps: int = 20, order: int = 2,
                      spacing: str = "logsnr", clip_x0: bool = True, generator: torch.Generator | None = None,
                      return_trajectory: bool = False, timesteps: list[int] | None = None,
                      x_T: Tensor | None = None, device=None, progress: bool = False):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): the deterministic
    sampling ODE solved with a second-order multistep method in the data-prediction form.

    Write ``a_t = sqrt(alpha_bar_t)``, ``b_t = sqrt(1 - alpha_bar_t)`` (the paper's alpha_t
    and sigma_t; this book keeps alpha_t = 1 - beta_t and sigma_t for a reverse step's noise)
    and ``lambda_t = log(a_t / b_t)``. The network's eps gives the predicted clean image
    ``x0_hat = (x_t - b_t eps) / a_t``. On the grid t_0 > t_1 > ..., from t_{i-1} to t_i with
    ``h = lambda_{t_i} - lambda_{t_{i-1}} > 0`` (Chapter 8, "DPM-Solver++")::

        x_{t_i} = (b_{t_i} / b_{t_{i-1}}) x_{t_{i-1}} - a_{t_i} (exp(-h) - 1) x0_2m
        x0_2m = x0_hat(t_{i-1})                                      (first order: DDIM, eta = 0)
        x0_2m = (1 + 1/(2r)) x0_hat(t_{i-1}) - 1/(2r) x0_hat(t_{i-2})  (second order, "2M")
        r     = h_prev / h,  h_prev = lambda_{t_{i-1}} - lambda_{t_{i-2}}

    The second-order ``x0_2m`` (the paper's D_i) reuses the x0_hat of the step before, so each
    step still costs one network call. The first step has no previous x0_hat and is first
    order.

    Timesteps: ``steps`` of them from T-1 down to 0, spaced evenly in lambda
    (``spacing="logsnr"``, :func:`logsnr_timesteps`, the default, as Lu et al. recommend for
    small images) or in t (``spacing="time"``, :func:`ddim_timesteps`, DDIM's default grid);
    ``timesteps=`` (descending) overrides both. Why lambda: the 2M weights depend on the
    ratio r of consecutive steps in lambda, and on the even-in-t grid lambda jumps near t = 0
    (r ~ 0.2 at 10 steps on the linear schedule), so the 2M extrapolation overshoots there;
    with data N(0.3, 0.5^2) and its exact eps, 10 steps give std 0.69 on the t-grid and 0.516
    on the lambda-grid (DDIM: 0.36 and 0.38). With any grid, ``order=1`` is DDIM with eta = 0
    on the same timesteps.

    The network is called once at each timestep, from T-1 down to 0 (``steps`` calls in
    all), and the last step goes from timestep 0 to clean data (alpha_bar = 1, b = 0,
    lambda = +inf): there ``exp(-h) = 0`` and the update returns ``x0_hat`` at timestep 0,
    as DDIM does with alpha_bar_prev = 1. That last step is first order (r = 0 would make
    the 2M weights infinite).

    ``order``: 1 or 2. ``clip_x0`` clips each x0_hat to [-1, 1] (use ``False`` for data that
    is not in [-1, 1], e.g. latents). The sampler draws no noise: ``generator`` only draws
    x_T when it is not given. Returns x_0 of ``shape`` (float32), or ``(x_0, Trajectory)``
    with ``return_trajectory`` (x_t and x0_hat at each network call).
    """
    if integer("order", order) not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order!r}")
    if spacing not in ("logsnr", "time"):
        raise ValueError(f"spacing must be 'logsnr' or 'time', got {spacing!r}")
    schedule, x = _start(schedule, shape, x_T, generator, device)
    if timesteps is not None:
        timesteps = _check_timesteps(timesteps, schedule.T)
    elif spacing == "time":
        timesteps = ddim_timesteps(schedule.T, steps)
    else:
        timesteps = logsnr_timesteps(schedule, steps)
    # per-step coefficients as Python floats, computed in float64 (any device, MPS included)
    alpha_bar = schedule.float64("alpha_bars")
    a = [math.sqrt(alpha_bar[t]) for t in timesteps]
    b = [math.sqrt(1.0 - alpha_bar[t]) for t in timesteps]
    lam = [math.log(a_t / b_t) for a_t, b_t in zip(a, b)]
    trajectory = Trajectory() if return_trajectory else None
    x0_prev = None
    for i, t in enumerate(tqdm(timesteps, desc=f"DPM-Solver++({order}M)", disable=not progress)):
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        _, x0 = _denoise(model, schedule, x, t_batch, clip_x0)
        if trajectory is not None:
            trajectory.add(t, x, x0)
        if i + 1 == len(timesteps):      # timestep 0 -> clean data: b = 0, exp(-h) = 0
            x = x0
            break
        h = lam[i + 1] - lam[i]
        if order == 1 or x0_prev is None:
            x0_2m = x0
        else:
            r = (lam[i] - lam[i - 1]) / h
            x0_2m = (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
        x = (b[i + 1] / b[i]) * x - a[i + 1] * math.expm1(-h) * x0_2m
        x0_prev = x0
    return (x, trajectory.stack()) if trajectory is not None else x


# ----------------------------------------------------------------------------------------
# Classifier-free guidance
# ----------------------------------------------------------------------------------------
def guided_model(model, y, w: float, null_class: int | None = None):
    """Classifier-free guidance (Ho & Salimans 2022): a model function ``(x_t, t) -> eps``
    for any sampler, from a class-conditional network ``model(x_t, t, y)``::

        eps = eps_uncond + w * (eps_cond - eps_uncond) = (1 - w) eps_uncond + w eps_cond
        eps_cond = model(x_t, t, y),   eps_uncond = model(x_t, t, null_class)

    ``w = 0`` is the unconditional model, ``w = 1`` the conditional one, ``w > 1`` pushes the
    samples further towards what distinguishes class y (sharper, less varied). The paper
    writes ``(1 + w') eps_cond - w' eps_uncond``: its ``w'`` is this ``w - 1`` (so its
    w' = 0 is our w = 1, plain conditional sampling).

    ``y``: the class of each image, an int (the same for the whole batch) or a (B,) integer
    tensor. ``null_class``: the label meaning "no class", by default ``model.num_classes``
    (the learned null label of :class:`ddpm_lib.unet.UNet`, trained with ``label_dropout``).
    For ``0 < w != 1`` both predictions come from ONE call on a batch of 2B
    (``[x_t, x_t]`` with labels ``[y, null]``); ``w = 0`` and ``w = 1`` need only one of them
    and make a single call of batch B, so they return exactly that prediction.
    Shapes: x_t (B, C, H, W), t (B,), returns eps (B, C, H, W).
    """
    w = real("the guidance weight w", w)
    if w < 0:
        raise ValueError(f"the guidance weight w must be finite and >= 0, got {w}")
    if null_class is None:
        null_class = getattr(model, "num_classes", None)
        if null_class is None:
            raise ValueError("the model has no num_classes (it is unconditional); pass null_class= "
                             "for a conditional model function, or use the model unguided")
    null_class = integer("null_class", null_class, minimum=0)

    def labels(value, batch_size, device):
        value = torch.as_tensor(value, device=device)
        integer_dtype("class labels y", value, "; convert them with y.long()")
        if value.ndim == 0:
            value = value.expand(batch_size)
        if value.shape != (batch_size,):
            raise ValueError(f"y must be an int or have shape ({batch_size},), got {tuple(value.shape)}")
        return value.long()

    def eps_model(x_t: Tensor, t: Tensor) -> Tensor:
        B = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(B) if t.ndim == 0 else t
        y_cond = labels(y, B, x_t.device)
        y_null = torch.full_like(y_cond, null_class)
        if w == 0.0:
            return model(x_t, t, y_null)
        if w == 1.0:
            return model(x_t, t, y_cond)
        eps_cond, eps_uncond = model(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                     torch.cat([y_cond, y_null])).chunk(2)
        return (1.0 - w) * eps_uncond + w * eps_cond

    return eps_model
