"""Samplers: step functions that walk from noise to data, and one loop that drives them.

A model is any callable ``(x_t, t) -> output``: x_t (B, C, H, W), t a (B,) long tensor of
0-based timesteps, the output the predicted noise eps (or x0, or v: ``prediction=``). A sampler is

* a **timestep grid** descending from T-1 to 0, :func:`resolve_timesteps`;
* a **step function** ``step(schedule, x_t, t, t_prev, eps, x0_hat, *, state, denoise,
  generator, **options) -> StepOutput``, from x at timestep t to x at ``t_prev``, the next
  timestep of the grid (-1 after the last one: clean data, alpha_bar = 1). ``eps`` and
  ``x0_hat`` are the model's prediction at t; ``state``, a dict kept over one run, is a
  multistep method's memory; ``denoise(x, t) -> (eps, x0_hat)`` calls the model again, for
  methods with several evaluations per step (Heun): :func:`ddpm_step`, :func:`ddim_step`,
  :func:`dpm_solver_2m_step`;
* an entry of :data:`SAMPLERS`: the step function, its default grid and its options.

:func:`sample` is the one loop: grid, one model call per timestep, conversion and clipping of
the prediction, the step, an optional :class:`Trajectory`. Adding a sampler is one step
function plus one line in :data:`SAMPLERS`, or a :class:`Sampler` passed as ``sampler=`` (the
inpainting steps of :mod:`ddpm_lib.editing`, kept out of the registry). :func:`ddpm_sample`,
:func:`ddim_sample` and :func:`dpm_solver_sample` are :func:`sample` with the sampler named.
Coefficients are Python floats from the schedule's float64 copy (any device, MPS too); x stays float32.
:func:`guided_model` (classifier-free guidance) lives in :mod:`ddpm_lib.guidance`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .checks import integer, integers, real
from .guidance import guided_model  # noqa: F401  (imported from here by the chapters)
from .schedules import _check_steps, _from_pure_noise, ddim_timesteps, logsnr_timesteps  # noqa: F401

Tensor = torch.Tensor


@dataclass
class Trajectory:
    """What a sampler saw on its way: for each step, the timestep, x_t and the predicted x0.

    Pass a new one to a sampler (``trajectory=Trajectory()``) and read it afterwards: ``x_t``
    and ``x0_hat`` are then (S, B, C, H, W) float32 CPU tensors, S = number of network calls,
    and ``t`` a list of S ints, in the order visited (noisy to clean); while sampling they are
    lists. Taught in chapter 6, section "The reverse trajectory".
    """
    t: list = field(default_factory=list)
    x_t: list | Tensor = field(default_factory=list)
    x0_hat: list | Tensor = field(default_factory=list)

    def add(self, t: int, x_t: Tensor, x0_hat: Tensor) -> None:
        self.t.append(int(t))
        self.x_t.append(x_t.detach().float().cpu())
        self.x0_hat.append(x0_hat.detach().float().cpu())

    def stack(self) -> "Trajectory":
        """Turn the lists into (S, ...) tensors, in place (the sampler does it at the end)."""
        self.x_t, self.x0_hat = torch.stack(self.x_t), torch.stack(self.x0_hat)
        return self


@dataclass
class StepOutput:
    """What a step function returns: ``x_prev``, x at the next timestep of the grid (clean
    data after the last step), and ``x0_hat``, the step's estimate of the clean image (what
    the trajectory records). Taught in chapter 8, section "A zoo of solvers"."""
    x_prev: Tensor
    x0_hat: Tensor


# ----------------------------------------------------------------------------------------
# Timestep grids (the grid functions, read from the schedule, live in ddpm_lib.schedules)
# ----------------------------------------------------------------------------------------
# spacing name -> (schedule, steps) -> timesteps
SPACINGS = {"time": lambda schedule, steps: ddim_timesteps(schedule.T, steps),
            "logsnr": logsnr_timesteps}


def resolve_timesteps(schedule, steps: int | None = None, spacing: str = "time",
                      timesteps=None) -> list[int]:
    """The grid a sampler visits, descending from T-1: ``timesteps`` as given (integers,
    strictly decreasing, within 0..T-1), or ``steps`` of them (default: all T) spaced as
    ``spacing`` says: ``"time"`` (:func:`ddim_timesteps`) or ``"logsnr"``
    (:func:`logsnr_timesteps`). Give ``steps`` or ``timesteps``, not both. On a zero-terminal-SNR
    schedule every spacing but ``"time"`` goes through :func:`_from_pure_noise`: each grid starts
    at T-1, where x_T ~ N(0, I) is exact (Lin et al. 2024's "trailing" requirement).
    Taught in chapter 8, sections "The timestep subsequence and the last step" and
    "Spacing the timesteps: evenly in t or in log-SNR".
    """
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {', '.join(map(repr, SPACINGS))}, got {spacing!r}")
    T = schedule.T
    if timesteps is None:
        steps = T if steps is None else steps
        if spacing != "time" and getattr(schedule, "zero_terminal_snr", False):
            return _from_pure_noise(SPACINGS[spacing], schedule, steps)
        return SPACINGS[spacing](schedule, steps)
    if steps is not None:
        raise ValueError("give steps (a number of timesteps) or timesteps (the list), not both")
    timesteps = list(integers("timesteps", timesteps))
    if not timesteps or any(b >= a for a, b in zip(timesteps, timesteps[1:])) \
            or timesteps[0] > T - 1 or timesteps[-1] < 0:
        raise ValueError(f"timesteps must be strictly decreasing within 0..{T - 1}")
    return timesteps


# ----------------------------------------------------------------------------------------
# Step functions: x at timestep t -> x at t_prev (-1: clean data)
# ----------------------------------------------------------------------------------------
def alpha_bar_at(schedule, t: int) -> float:
    """alpha_bar at timestep t from the float64 copy; 1 at t = -1 (clean data, before step 0)."""
    return float(schedule.float64("alpha_bars")[t]) if t >= 0 else 1.0


def ddpm_step(schedule, x_t, t, t_prev, eps, x0_hat, *, state, denoise=None, generator=None,
              sigma="beta"):
    """One ancestral step (Ho et al. 2020, Algorithm 2, line 4)::

        x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) + sigma_t z

    with ``sigma_t^2 = beta_t`` (``sigma="beta"``) or ``beta_tilde_t`` (``sigma="beta_tilde"``)
    and no noise on the last step. ``alpha_t = alpha_bar_t / alpha_bar_prev``, so on a grid
    that skips timesteps this is the step of the merged (respaced) process. At alpha_bar_t = 0
    (zero terminal SNR) alpha_t = 0 and this mean divides 0 by 0; it is then the posterior
    mean (eq. 7) at alpha = 0, sqrt(alpha_bar_prev) x0_hat: x_t, pure noise, plays no part.
    Taught in chapter 6, sections "Algorithm 2, line by line" and "Which noise to add".
    """
    alpha_bar, alpha_bar_prev = alpha_bar_at(schedule, t), alpha_bar_at(schedule, t_prev)
    alpha = alpha_bar / alpha_bar_prev
    beta = 1.0 - alpha
    mean = ((x_t - beta / math.sqrt(1.0 - alpha_bar) * eps) / math.sqrt(alpha) if alpha > 0
            else math.sqrt(alpha_bar_prev) * x0_hat)
    if t_prev < 0:                       # the last step returns the mean: no noise
        return StepOutput(mean, x0_hat)
    variance = beta if sigma == "beta" else (1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * beta
    z = torch.randn(x_t.shape, generator=generator, device=x_t.device)
    return StepOutput(mean + math.sqrt(variance) * z, x0_hat)


def ddim_step(schedule, x_t, t, t_prev, eps, x0_hat, *, state, denoise=None, generator=None,
              eta=0.0):
    """One DDIM step (Song et al. 2021, eq. 12)::

        x_prev = sqrt(alpha_bar_prev) x0_hat + sqrt(1 - alpha_bar_prev - sigma^2) eps + sigma z
        sigma  = eta * sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * sqrt(1 - alpha_bar / alpha_bar_prev)

    alpha_bar_prev is 1 after the last timestep, so the last step returns x0_hat and adds no
    noise. ``eta=0`` is deterministic; ``eta=1`` over every timestep is DDPM with
    sigma^2 = beta_tilde. At alpha_bar = 0 (zero terminal SNR) nothing changes: eps = x_t there.
    Taught in chapter 8, sections "From the process to a sampler" and "$\\eta$: from
    deterministic to DDPM".
    """
    alpha_bar, alpha_bar_prev = alpha_bar_at(schedule, t), alpha_bar_at(schedule, t_prev)
    sigma = eta * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)) \
        if eta > 0 else 0.0                  # (eta = 0: no 0 / 0 when DDIM inversion reaches alpha_bar = 0)
    x = math.sqrt(alpha_bar_prev) * x0_hat + math.sqrt(max(1 - alpha_bar_prev - sigma**2, 0.0)) * eps
    if sigma > 0:
        x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device)
    return StepOutput(x, x0_hat)


def dpm_solver_2m_step(schedule, x_t, t, t_prev, eps, x0_hat, *, state, denoise=None,
                       generator=None, order=2):
    """One step of DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), the deterministic
    sampling ODE solved in the data-prediction form. With ``a_t = sqrt(alpha_bar_t)``,
    ``b_t = sqrt(1 - alpha_bar_t)``, ``lambda_t = log(a_t / b_t)`` and
    ``h = lambda_{t_prev} - lambda_t > 0``::

        x_{t_prev} = (b_{t_prev} / b_t) x_t - a_{t_prev} (exp(-h) - 1) x0_2m
        x0_2m = x0_hat                                           (first order: DDIM, eta = 0)
        x0_2m = (1 + 1/(2r)) x0_hat - 1/(2r) x0_last,  r = h_last / h   (second order, "2M")

    ``x0_last`` and ``h_last = lambda_t - lambda_last`` come from the step before (``state``
    keeps its x0_hat and lambda), so each step costs one network call. The first step has no
    step before and is first order; the last (timestep 0 to clean data: b = 0, lambda = +inf,
    exp(-h) = 0) returns x0_hat, as DDIM does. ``order=1`` is DDIM with eta = 0. No noise.

    From pure noise (zero terminal SNR: alpha_bar_t = 0, a = 0, b = 1, lambda_t = -inf): h = inf,
    exp(-h) = 0, and the step is x_{t_prev} = b_{t_prev} x_t + a_{t_prev} x0_hat, first order
    (DDIM's, with eps = x_t); the next step's r = h_last / h is inf, so its 1/(2r) = 0 and it is
    first order too (the slope of x0_hat from lambda = -inf is 0).
    Taught in chapter 8, section "DPM-Solver++: solving the ODE with higher order".
    """
    if t_prev < 0:                       # timestep 0 -> clean data: b = 0, exp(-h) = 0
        return StepOutput(x0_hat, x0_hat)
    alpha_bar, alpha_bar_prev = alpha_bar_at(schedule, t), alpha_bar_at(schedule, t_prev)
    a, b = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    a_prev, b_prev = math.sqrt(alpha_bar_prev), math.sqrt(1.0 - alpha_bar_prev)
    lam, lam_prev = (math.log(a / b) if a > 0 else -math.inf), math.log(a_prev / b_prev)
    h = lam_prev - lam
    if order == 1 or "x0_last" not in state:
        x0_2m = x0_hat
    else:
        r = (lam - state["lam_last"]) / h
        x0_2m = (1.0 + 0.5 / r) * x0_hat - (0.5 / r) * state["x0_last"]
    state.update(x0_last=x0_hat, lam_last=lam)
    return StepOutput((b_prev / b) * x_t - a_prev * math.expm1(-h) * x0_2m, x0_hat)


# ----------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sampler:
    """An entry of :data:`SAMPLERS`: a step function and how :func:`sample` runs it.

    ``label`` names the progress bar; ``steps`` is the default number of network calls
    (None: every timestep, and the CLI takes no ``--steps``) and ``spacing`` the default
    grid (a key of :data:`SPACINGS`); ``options`` are the step's keyword options with their
    defaults, and ``check`` (if any) validates them once, before the loop, returning them cleaned.
    ``zero_snr``: True when ``step`` can start from alpha_bar = 0 (zero terminal SNR); for
    the others :func:`sample` takes that first step with :func:`ddim_step` (eta = 0, the limit
    of a first-order ODE step from lambda = -inf), then hands over to ``step``.
    Taught in chapter 8, section "A zoo of solvers".
    """
    step: Callable[..., StepOutput]
    label: str
    steps: int | None = None
    spacing: str = "time"
    options: Mapping = field(default_factory=dict)
    check: Callable[[dict], dict] | None = None
    zero_snr: bool = False


def check_sigma(o: dict) -> dict:
    if o["sigma"] not in ("beta", "beta_tilde"):
        raise ValueError(f"sigma must be 'beta' or 'beta_tilde', got {o['sigma']!r}")
    return o


def _check_eta(o: dict) -> dict:
    if not 0.0 <= (eta := real("eta", o["eta"])) <= 1.0:
        raise ValueError(f"eta must lie in [0, 1], got {eta}")
    return {**o, "eta": eta}


def _check_order(o: dict) -> dict:
    if (order := integer("order", o["order"])) not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order!r}")
    return {**o, "order": order}


SAMPLERS: dict[str, Sampler] = {
    "ddpm": Sampler(ddpm_step, "DDPM", None, "time", {"sigma": "beta"}, check_sigma, zero_snr=True),
    "ddim": Sampler(ddim_step, "DDIM", 50, "time", {"eta": 0.0}, _check_eta, zero_snr=True),
    "dpm_solver": Sampler(dpm_solver_2m_step, "DPM-Solver++(2M)", 20, "logsnr", {"order": 2}, _check_order,
                          zero_snr=True),
}


# ----------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------
def _start(schedule, shape, x_T, generator, device):
    if not hasattr(schedule, "alpha_bars"):
        raise ValueError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__} "
                         "(the arguments are model, schedule, shape)")
    shape = integers("shape (B, C, H, W)", shape, minimum=1)
    if len(shape) < 2:
        raise ValueError(f"shape must be (B, C, H, W) with positive sizes, got {shape}")
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


def eps_and_x0(model, schedule, x, t_batch, prediction, clip_x0):
    """One network call: eps and x0_hat from what the model predicts (eps, x0 or v), x0_hat
    clipped to [-1, 1] if asked, with eps re-derived from it so the two stay consistent."""
    out = model(x, t_batch)
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"the model must return a tensor ({prediction}) shaped like x_t, "
                         f"got {type(out).__name__}")
    out = out.float()
    if out.shape != x.shape:
        raise ValueError(f"the model returned shape {tuple(out.shape)} for x_t of shape {tuple(x.shape)}")
    if prediction == "eps":
        eps, x0 = out, schedule.predict_x0(x, t_batch, out)
    elif prediction == "v":
        eps, x0 = schedule.eps_from_v(x, t_batch, out), schedule.x0_from_v(x, t_batch, out)
    else:
        eps, x0 = None, out
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
    if clip_x0 or eps is None:
        eps = schedule.predict_eps(x, t_batch, x0)
    return eps, x0


@torch.no_grad()
def sample(model, schedule, shape, *, sampler: str | Sampler = "ddpm", steps: int | None = None,
           spacing: str | None = None, timesteps=None, prediction: str = "eps", clip_x0: bool = True,
           generator: torch.Generator | None = None, x_T: Tensor | None = None, device=None,
           trajectory: Trajectory | None = None, progress: bool = False, **options) -> Tensor:
    """x_0 of ``shape`` (float32) from ``sampler``, a key of :data:`SAMPLERS` or a :class:`Sampler`,
    with its ``options`` (``sigma=`` for DDPM, ``eta=`` for DDIM, ``order=`` for DPM-Solver).

    Grid: :func:`resolve_timesteps` with ``steps``, ``spacing`` (default: the sampler's) or
    ``timesteps``. At each timestep the model is called once; ``prediction`` says what it
    returns (``"eps"``, ``"x0"`` or ``"v"``), converted with the schedule's conversions;
    ``clip_x0`` clips x0_hat to [-1, 1] and re-derives eps (``False`` for data not in [-1, 1],
    e.g. latents). ``generator`` draws ``x_T`` when it is not given, then the steps' noise.
    ``trajectory``: a new :class:`Trajectory` to record x_t and x0_hat at each call. On a
    zero-terminal-SNR schedule (Lin et al. 2024) a grid that starts at T-1 needs ``"v"`` or ``"x0"``.
    Taught in chapter 8, section "A zoo of solvers" (the loop chapter 6 writes by hand in "The
    loop by hand", with the update factored out into step functions).
    """
    entry = SAMPLERS.get(sampler) if isinstance(sampler, str) else sampler
    if not isinstance(entry, Sampler):
        raise ValueError(f"sampler must be one of {', '.join(sorted(SAMPLERS))} or a Sampler, "
                         f"got {sampler!r}")
    if unknown := sorted(set(options) - set(entry.options)):
        hint = "; record a trajectory with trajectory=Trajectory()" if "return_trajectory" in unknown else ""
        raise ValueError(f"the {entry.label if entry is sampler else sampler} sampler has no option "
                         f"{', '.join(unknown)}; it takes {', '.join(entry.options) or 'none'}{hint}")
    options = (entry.check or dict)({**entry.options, **options})
    if prediction not in ("eps", "x0", "v"):
        raise ValueError(f"prediction must be 'eps', 'x0' or 'v', got {prediction!r}")
    if trajectory is not None and (not isinstance(trajectory, Trajectory) or trajectory.t):
        raise ValueError("trajectory must be a new Trajectory() (one per run)")
    schedule, x = _start(schedule, shape, x_T, generator, device)
    if steps is None and timesteps is None:
        steps = entry.steps
    timesteps = resolve_timesteps(schedule, steps, spacing or entry.spacing, timesteps)
    pure_noise = getattr(schedule, "zero_terminal_snr", False) and timesteps[0] == schedule.T - 1
    if pure_noise and prediction == "eps":
        raise ValueError(f"the schedule ends in pure noise (zero terminal SNR: alpha_bar = 0 at t = "
                         f"{schedule.T - 1}, where the grid starts) and there x_t = eps: an eps-prediction "
                         "gives no x0 ((x_t - eps) / sqrt(alpha_bar) is 0 / 0); use a model trained with "
                         "prediction='v' (x0 = -v there, Lin et al. 2024) or 'x0'")
    state = {}

    def denoise(x_at: Tensor, t_at: int) -> tuple[Tensor, Tensor]:     # one network call
        t_batch = torch.full((x_at.shape[0],), t_at, device=x_at.device, dtype=torch.long)
        return eps_and_x0(model, schedule, x_at, t_batch, prediction, clip_x0)

    for i, t in enumerate(tqdm(timesteps, desc=entry.label, disable=not progress)):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        eps, x0 = denoise(x, t)
        if i == 0 and pure_noise and not entry.zero_snr:      # see Sampler.zero_snr
            out = ddim_step(schedule, x, t, t_prev, eps, x0, state=state)
        else:
            out = entry.step(schedule, x, t, t_prev, eps, x0, state=state, denoise=denoise,
                             generator=generator, **options)
        if trajectory is not None:
            trajectory.add(t, x, out.x0_hat)
        x = out.x_prev
    if trajectory is not None:
        trajectory.stack()
    return x


# ----------------------------------------------------------------------------------------
# The names the chapters call
# ----------------------------------------------------------------------------------------
def ddpm_sample(model, schedule, shape, *, sigma: str = "beta", **kwargs) -> Tensor:
    """Ancestral sampling (Ho et al. 2020, Algorithm 2) over all T timesteps: :func:`sample`
    with ``sampler="ddpm"`` (:func:`ddpm_step`) and its ``kwargs`` (``x_T``, ``trajectory``...).
    Taught in chapter 6, sections "Algorithm 2, line by line" and "Samples from the trained
    network".
    """
    if {"steps", "timesteps"} & kwargs.keys():    # a respaced DDPM is sample(sampler="ddpm", steps=k)
        raise ValueError("ddpm_sample walks all T timesteps; for fewer, sample(..., sampler='ddpm', steps=...)")
    return sample(model, schedule, shape, sampler="ddpm", sigma=sigma, **kwargs)


def ddim_sample(model, schedule, shape, *, steps: int | None = None, eta: float = 0.0,
                **kwargs) -> Tensor:
    """DDIM (Song et al. 2021) over ``steps`` timesteps (default 50) evenly spaced in t, or
    the descending ``timesteps=`` given: :func:`sample` with ``sampler="ddim"`` (the update:
    :func:`ddim_step`). Taught in chapter 6, section "A preview: DDIM in 50 steps", and
    chapter 8, section "From the process to a sampler".
    """
    return sample(model, schedule, shape, sampler="ddim", steps=steps, eta=eta, **kwargs)


def dpm_solver_sample(model, schedule, shape, *, steps: int | None = None, order: int = 2,
                      **kwargs) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022) over ``steps`` timesteps (default 20) spaced evenly
    in log-SNR (``spacing="time"``: evenly in t), or the ``timesteps=`` given: :func:`sample`
    with ``sampler="dpm_solver"`` (the update: :func:`dpm_solver_2m_step`). One network call
    per timestep; no noise drawn (``generator`` only draws x_T when it is not given).
    Taught in chapter 8, sections "DPM-Solver++: solving the ODE with higher order" and
    "Spacing the timesteps: evenly in t or in log-SNR".
    """
    return sample(model, schedule, shape, sampler="dpm_solver", steps=steps, order=order, **kwargs)
