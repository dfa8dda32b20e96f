"""Beta schedules and :class:`NoiseSchedule`, every tensor the process derives from the betas.

Timesteps are **0-based**: index ``t`` runs over ``0 .. T-1`` and stands for the paper's
step ``t + 1`` (Ho et al. 2020 count ``1 .. T``). So ``alpha_bars[0] = 1 - betas[0]`` is
one step of noise, ``alpha_bars[T-1]`` is the last, and ``alpha_bars_prev[0] = 1`` (no
noise before the first step). Every function in ``ddpm_lib`` uses this convention.

All tensors are computed in float64 and stored in float32. The timestep grids the samplers
visit, read from a schedule (:func:`ddim_timesteps`, :func:`logsnr_timesteps`), end the module.
"""
from __future__ import annotations

import math

import torch

from . import diffusion
from .checks import check_values, integer, integer_dtype, real

Tensor = torch.Tensor


def linear_betas(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Betas rising linearly from ``beta_start`` to ``beta_end`` (Ho et al. 2020). Shape (T,), float64.
    Taught in chapter 2, "Linear and cosine schedules"."""
    T = _check_T(T)
    beta_start, beta_end = real("beta_start", beta_start), real("beta_end", beta_end)
    if not (0 < beta_start < 1 and 0 < beta_end < 1):
        raise ValueError(f"beta_start and beta_end must lie in (0, 1), got {beta_start} and {beta_end}")
    if beta_start > beta_end:
        raise ValueError(f"beta_start ({beta_start}) is larger than beta_end ({beta_end}): the "
                         "betas rise from beta_start to beta_end (noise grows with t); swap the two")
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def cosine_betas(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    r"""Betas of the cosine schedule (Nichol & Dhariwal 2021, eq. 17).

    alpha_bar(t) = f(t) / f(0) with f(t) = cos((t/T + s) / (1 + s) * pi/2)^2, and
    beta_t = 1 - alpha_bar(t) / alpha_bar(t-1), capped at ``max_beta`` so the last steps
    stay finite. Shape (T,), float64.
    Taught in chapter 2, "Linear and cosine schedules"; the cap in "The cosine schedule's cap
    on $\beta_t$".
    """
    T = _check_T(T)
    s, max_beta = real("s", s), real("max_beta", max_beta)
    if not (s >= 0 and 0 < max_beta < 1):
        raise ValueError(f"need s >= 0 and max_beta in (0, 1), got s={s}, max_beta={max_beta}")
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(max=max_beta)


def rescale_zero_terminal_snr(betas) -> Tensor:
    r"""``betas`` rescaled to zero terminal SNR (Lin et al. 2024, Algorithm 1): sqrt(alpha_bar)
    shifted and scaled so that its last value is 0 and its first is unchanged::

        sqrt(alpha_bar'_t) = (sqrt(alpha_bar_t) - sqrt(alpha_bar_{T-1}))
                             * sqrt(alpha_bar_0) / (sqrt(alpha_bar_0) - sqrt(alpha_bar_{T-1}))

    then the betas back from the ratios, beta'_t = 1 - alpha_bar'_t / alpha_bar'_{t-1}, so
    beta'_0 = beta_0 and the last beta' is 1: x_{T-1} is pure noise, the N(0, I) the samplers
    start from (the linear schedule keeps sqrt(alpha_bar_{T-1}) = 0.0064 of the image there,
    which a network learns to read). Sample with ``prediction="v"`` from t = T-1: at
    alpha_bar = 0 an eps-prediction gives no x0, v gives x0 = -v. Shape (T,), float64, T >= 2.
    """
    betas = torch.as_tensor(betas, dtype=torch.float64)
    if betas.ndim != 1 or betas.numel() < 2 or not ((betas > 0) & (betas < 1)).all():
        raise ValueError("rescale_zero_terminal_snr needs a 1-D sequence of at least 2 betas in (0, 1)")
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()                  # sqrt(alpha_bar)
    root = (root - root[-1]) / (root[0] - root[-1]) * root[0]         # last 0, first kept
    alpha_bar = root**2
    return 1.0 - torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])


def _check_T(T) -> int:
    return integer("T (the number of diffusion steps)", T, minimum=1)


def _check_representable(betas: Tensor, alphas: Tensor, alpha_bars: Tensor) -> None:
    """The schedule must survive the float64 arithmetic (and the float32 copies) it is used in.

    * ``1 - beta`` must differ from 1: a beta below about 5.6e-17 (half the spacing of float64
      numbers just below 1) vanishes from ``alpha = 1 - beta``. At t = 0 that makes
      ``1 - alpha_bar = 0``, and beta_tilde (0 / 0), the SNR and the eps/x0 conversions
      divide by it: NaN and inf.
    * ``alpha_bar`` must stay above 0 in float32 (the samplers use the float32 copy): past
      that the signal is gone and x0 = x_t / sqrt(alpha_bar) divides by 0. The one exception
      is a last beta of exactly 1 (zero terminal SNR, :func:`rescale_zero_terminal_snr`):
      alpha_bar_{T-1} = 0 on purpose, and the step before it must stay above 0.
    """
    vanished = (alphas == 1.0).nonzero().flatten()
    if len(vanished):
        t = int(vanished[0])
        raise ValueError(f"beta at step t={t} is {betas[t].item():.3g}: too small for float64, where "
                         "1 - beta rounds to 1 (betas below about 5.6e-17 vanish), so the step adds "
                         "no noise and 1 - alpha_bar is 0 (beta_tilde and the SNR would be NaN or "
                         "inf); use betas >= 1e-12")
    t = len(betas) - 1 - bool(betas[-1] == 1)          # the last step, or the one before a beta of 1
    if t >= 0 and alpha_bars[t].float() == 0:
        where = "the last step" if t == len(betas) - 1 else f"step t={t}, before the last (beta = 1),"
        raise ValueError(f"alpha_bar at {where} is {alpha_bars[t].item():.3g}, 0 in float32: "
                         "no signal is left long before the end and the samplers would divide by "
                         "sqrt(alpha_bar) = 0; use fewer steps T or smaller betas (alpha_bar_T of "
                         "1e-5 to 1e-3 is usual), or for a schedule that ends in pure noise on "
                         "purpose, rescale_zero_terminal_snr(betas)")


class NoiseSchedule:
    r"""Everything the diffusion process derives from a sequence of betas.
    Taught in chapter 2, "The noise schedule: $\beta_t$, $\alpha_t$ and $\bar\alpha_t$".

    Attributes, each a float32 tensor of shape (T,), indexed by the 0-based timestep t:

    * ``betas``: variance added at step t;  ``alphas = 1 - betas``
    * ``alpha_bars``: cumulative product of the alphas up to and including t
    * ``alpha_bars_prev``: the same up to t - 1, with ``alpha_bars_prev[0] = 1``
    * ``beta_tilde``: variance of the posterior q(x_{t-1} | x_t, x_0)

    and ``zero_terminal_snr``: True when the last beta is 1, so alpha_bar_{T-1} = 0 (Lin et al.
    2024; ``zero_terminal_snr=True`` in :meth:`linear` and :meth:`cosine`). Every beta lies in
    (0, 1) but that last one. Build one with :meth:`linear`, :meth:`cosine` or from your own betas.
    """

    def __init__(self, betas: Tensor, device: torch.device | str | None = None):
        try:
            betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu()
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError("betas must be a 1-D sequence of numbers, "
                             f"got {type(betas).__name__}: {e}") from e
        if betas.ndim != 1 or betas.numel() == 0:
            raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {tuple(betas.shape)}")
        if not torch.isfinite(betas).all():
            raise ValueError("betas contain NaN or infinite values")
        outside = (betas <= 0) | (betas >= 1)
        outside[-1] = not 0 < betas[-1] <= 1      # a last beta of 1: zero terminal SNR
        if outside.any():
            raise ValueError("every beta must lie strictly between 0 and 1 (the last may be 1: zero "
                             f"terminal SNR); found {betas[outside][:5].tolist()}")
        self.T, self.zero_terminal_snr = betas.numel(), bool(betas[-1] == 1)
        alphas = 1.0 - betas
        alpha_bars = torch.cumprod(alphas, dim=0)
        _check_representable(betas, alphas, alpha_bars)
        alpha_bars_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bars[:-1]])
        beta_tilde = diffusion.posterior_variance(betas, alpha_bars, alpha_bars_prev)
        self._float64 = dict(betas=betas, alphas=alphas, alpha_bars=alpha_bars,
                             alpha_bars_prev=alpha_bars_prev, beta_tilde=beta_tilde)
        for name, value in self._float64.items():
            setattr(self, name, value.to(device=torch.device(device or "cpu"), dtype=torch.float32))
        self.device = self.betas.device      # "cuda" resolved to the GPU it means, e.g. cuda:0
        # float64 copies on the device, for the formulas (MPS has no float64: float32 there)
        exact = torch.float32 if self.device.type == "mps" else torch.float64
        self._exact = {name: value.to(device=self.device, dtype=exact) for name, value in self._float64.items()}

    # -- constructors --------------------------------------------------------------------
    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, device=None, *,
               zero_terminal_snr: bool = False):
        """The schedule of Ho et al. (2020): betas linear from 1e-4 to 0.02 over T = 1000 steps;
        ``zero_terminal_snr=True``: rescaled by :func:`rescale_zero_terminal_snr` (Lin et al. 2024)."""
        betas = linear_betas(T, beta_start, beta_end)
        return cls(rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas, device)

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999, device=None, *,
               zero_terminal_snr: bool = False):
        """The cosine schedule of Nichol & Dhariwal (2021); ``zero_terminal_snr`` as in :meth:`linear`."""
        betas = cosine_betas(T, s, max_beta)
        return cls(rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas, device)

    def to(self, device) -> "NoiseSchedule":
        """The same schedule with its tensors on ``device``."""
        return NoiseSchedule(self._float64["betas"], device)

    def float64(self, name: str) -> Tensor:
        """One of the schedule's tensors in float64 on the CPU (for exact checks)."""
        return self._float64[self._check_name(name)].clone()

    def _check_name(self, name: str) -> str:
        if name not in self._float64:
            raise ValueError(f"the schedule has no tensor {name!r}; it has {', '.join(self._float64)}")
        return name

    def __repr__(self) -> str:
        return (f"NoiseSchedule(T={self.T}, beta_1={self.betas[0].item():.3g}, "
                f"beta_T={self.betas[-1].item():.3g}, alpha_bar_T={self.alpha_bars[-1].item():.3g}, "
                f"device={self.device})")

    # -- signal-to-noise -----------------------------------------------------------------
    @property
    def snr(self) -> Tensor:
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each step. Shape (T,)."""
        a = self._float64["alpha_bars"]
        return (a / (1 - a)).to(self.device, torch.float32)

    @property
    def log_snr(self) -> Tensor:
        """Natural log of the signal-to-noise ratio. Shape (T,); -inf at the last step of a
        zero-terminal-SNR schedule (SNR = 0 there)."""
        a = self._float64["alpha_bars"]
        return (torch.log(a) - torch.log1p(-a)).to(self.device, torch.float32)

    # -- gathering coefficients at timesteps ---------------------------------------------
    def check_t(self, t, batch_size: int | None = None) -> Tensor:
        """Validate timesteps and return them as a 1-D long tensor on the schedule's device.

        ``t`` is an int or an integer tensor of shape () or (B,), every value in 0 .. T-1.
        """
        wanted = f"an integer in 0..{self.T - 1} or an integer tensor of shape () or (B,)"
        if isinstance(t, (bool, str, bytes)) or t is None:
            raise ValueError(f"the timestep t must be {wanted}, got {t!r}")
        try:
            t = torch.as_tensor(t)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"the timestep t must be {wanted}, got {type(t).__name__}: {e}") from e
        integer_dtype(f"timesteps t (0-based, 0..{self.T - 1})", t)
        if t.ndim > 1:
            raise ValueError(f"timesteps must be a scalar or 1-D tensor (B,), got shape {tuple(t.shape)}")
        # A value check reads t back from the GPU (a synchronisation) and splits a torch.compile
        # graph: skipped while compiling and in train()'s loop, which draws t itself (see checks.py)
        if t.numel() and check_values() and (t.min() < 0 or t.max() > self.T - 1):
            raise ValueError(f"timesteps must lie in 0..{self.T - 1} (0-based; index t is the paper's "
                             f"step t+1), got values from {t.min().item()} to {t.max().item()}")
        t = t.reshape(-1).to(self.device, torch.long)
        if batch_size is not None and t.numel() not in (1, batch_size):
            raise ValueError(f"got {t.numel()} timesteps for a batch of {batch_size}; "
                             "pass one timestep per image or a single one")
        return t

    def at(self, coef: Tensor | str, t, x: Tensor) -> Tensor:
        """``coef[t]`` reshaped to (B, 1, 1, ...) so it broadcasts against ``x`` of shape (B, ...).

        ``coef`` is one of the schedule's tensors, or its name (``"alpha_bars"``) to gather
        from the float64 copy: the methods below compute their formulas in float64, where
        ``1 - alpha_bar`` near ``alpha_bar = 1`` keeps its digits, and return x's dtype.
        """
        if not isinstance(x, torch.Tensor) or x.ndim < 1:
            raise ValueError("x must be a tensor with a batch dimension first, shape (B, ...)")
        if x.device != self.device:
            raise ValueError(f"the schedule lives on {self.device} but x is on {x.device}; "
                             f"use schedule = schedule.to({str(x.device)!r})")
        t = self.check_t(t, batch_size=x.shape[0])
        c = self._exact[self._check_name(coef)][t] if isinstance(coef, str) else coef[t]
        return c.expand(x.shape[0]).reshape(-1, *([1] * (x.ndim - 1)))

    @staticmethod
    def _check_float(name: str, x: Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")

    @classmethod
    def _check_finite(cls, name: str, x: Tensor) -> None:
        cls._check_float(name, x)
        if check_values() and not torch.isfinite(x).all():   # see check_t
            raise ValueError(f"{name} contains NaN or infinite values")

    def _check_same_shape(self, **tensors) -> None:
        for name, v in tensors.items():
            self._check_float(name, v)
        shapes = {name: tuple(v.shape) for name, v in tensors.items()}
        if len(set(shapes.values())) > 1:
            raise ValueError(f"shapes must match, got {shapes}")
        devices = {name: str(v.device) for name, v in tensors.items()}
        if len(set(devices.values())) > 1:
            raise ValueError(f"the tensors must be on one device, got {devices}")
        for name, v in tensors.items():
            self._check_finite(name, v)

    # -- the forward process -------------------------------------------------------------
    def q_sample(self, x0: Tensor, t, noise: Tensor | None = None, generator: torch.Generator | None = None):
        """Sample x_t ~ q(x_t | x_0) in one shot. Returns ``(x_t, noise)``, both shaped like x0."""
        if noise is None:
            self._check_float("x0", x0)
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        self._check_same_shape(x0=x0, noise=noise)
        x_t = diffusion.q_sample(x0, self.at("alpha_bars", t, x0), noise)
        return x_t.to(x0.dtype), noise

    def q_step(self, x_prev: Tensor, t, noise: Tensor | None = None, generator=None) -> Tensor:
        """One step of the chain: x_t ~ q(x_t | x_{t-1}) where ``x_prev`` is x_{t-1}."""
        if noise is None:
            self._check_float("x_prev", x_prev)
            noise = torch.randn(x_prev.shape, generator=generator, device=x_prev.device, dtype=x_prev.dtype)
        self._check_same_shape(x_prev=x_prev, noise=noise)
        return diffusion.q_step(x_prev, self.at("betas", t, x_prev), noise).to(x_prev.dtype)

    # -- conversions between eps, x0 and v -----------------------------------------------
    def _check_eps_gives_x0(self, what: str, t, x_t: Tensor) -> None:
        """Refuse an eps-formula at alpha_bar = 0 (the last step of a zero-terminal-SNR schedule)."""
        if self.zero_terminal_snr and check_values() and (self.check_t(t, x_t.shape[0]) == self.T - 1).any():
            raise ValueError(f"{what} at t={self.T - 1}, where alpha_bar = 0 (zero terminal SNR): there "
                             "x_t = eps is pure noise and eps says nothing about x0 ((x_t - eps) / "
                             "sqrt(alpha_bar) is 0 / 0); predict v instead, prediction='v' (x0 = -v there)")

    def predict_x0(self, x_t: Tensor, t, eps: Tensor) -> Tensor:
        """x0 implied by x_t and the noise eps (inverts :meth:`q_sample`); refused at
        alpha_bar = 0 (zero terminal SNR), where eps says nothing about x0."""
        self._check_same_shape(x_t=x_t, eps=eps)
        self._check_eps_gives_x0("x0 from eps", t, x_t)
        return diffusion.x0_from_eps(x_t, self.at("alpha_bars", t, x_t), eps).to(x_t.dtype)

    def predict_eps(self, x_t: Tensor, t, x0: Tensor) -> Tensor:
        """The noise eps implied by x_t and x0."""
        self._check_same_shape(x_t=x_t, x0=x0)
        return diffusion.eps_from_x0(x_t, self.at("alpha_bars", t, x_t), x0).to(x_t.dtype)

    def velocity(self, x0: Tensor, t, eps: Tensor) -> Tensor:
        """v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0, the v-prediction target."""
        self._check_same_shape(x0=x0, eps=eps)
        return diffusion.v_from_eps_x0(eps, x0, self.at("alpha_bars", t, x0)).to(x0.dtype)

    def x0_from_v(self, x_t: Tensor, t, v: Tensor) -> Tensor:
        """x0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v."""
        self._check_same_shape(x_t=x_t, v=v)
        return diffusion.x0_from_v(x_t, self.at("alpha_bars", t, x_t), v).to(x_t.dtype)

    def eps_from_v(self, x_t: Tensor, t, v: Tensor) -> Tensor:
        """eps = sqrt(1 - alpha_bar) x_t + sqrt(alpha_bar) v."""
        self._check_same_shape(x_t=x_t, v=v)
        return diffusion.eps_from_v(x_t, self.at("alpha_bars", t, x_t), v).to(x_t.dtype)

    # -- the posterior and the reverse step ----------------------------------------------
    def posterior(self, x0: Tensor, x_t: Tensor, t):
        """Mean and variance of q(x_{t-1} | x_t, x_0).

        Returns ``(mean, variance)``: mean shaped like x_t, variance shaped (B, 1, 1, ...).
        At t = 0 the variance is 0: x_{-1} is x_0 itself.
        """
        self._check_same_shape(x0=x0, x_t=x_t)
        mean = diffusion.posterior_mean(x0, x_t, self.at("betas", t, x_t), self.at("alpha_bars", t, x_t),
                                        self.at("alpha_bars_prev", t, x_t))
        return mean.to(x_t.dtype), self.at(self.beta_tilde, t, x_t)

    def reverse_mean(self, x_t: Tensor, t, eps: Tensor) -> Tensor:
        """Mean of p_theta(x_{t-1} | x_t) from a predicted eps (Ho et al. 2020, eq. 11); refused
        at alpha_bar = 0, as :meth:`predict_x0` is (eq. 11 divides by sqrt(alpha_{T-1}) = 0)."""
        self._check_same_shape(x_t=x_t, eps=eps)
        self._check_eps_gives_x0("the reverse mean from eps", t, x_t)
        mean = diffusion.reverse_mean_from_eps(x_t, eps, self.at("betas", t, x_t), self.at("alpha_bars", t, x_t))
        return mean.to(x_t.dtype)


# ----------------------------------------------------------------------------------------
# Timestep grids: which timesteps a sampler visits (ddpm_lib.samplers.SPACINGS names them)
# ----------------------------------------------------------------------------------------
def ddim_timesteps(T: int, steps: int) -> list[int]:
    """``steps`` timesteps evenly spread over 0 .. T-1, from T-1 down to 0 (both included).
    Taught in chapter 8, section "The timestep subsequence and the last step"."""
    steps = _check_steps(steps, T)
    if steps == 1:
        return [T - 1]
    ts = torch.linspace(0, T - 1, steps, dtype=torch.float64).round().long().tolist()
    return sorted(set(ts), reverse=True)


def logsnr_timesteps(schedule, steps: int) -> list[int]:
    """``steps`` timesteps from T-1 down to 0 spaced evenly in lambda = log(a_t / b_t)
    (half the log-SNR) instead of in t, each rounded to the nearest discrete timestep.

    The spacing Lu et al. (2022) recommend for small images: the 2M weights depend on the
    ratio r of consecutive steps in lambda, and on the even-in-t grid lambda jumps near t = 0
    (r ~ 0.2 at 10 steps, linear schedule), where 2M then overshoots (data N(0.3, 0.5^2), exact
    eps, 10 steps: std 0.69 on the t-grid, 0.516 on this one). Where rounding would merge
    neighbours they are pushed apart to the next free timestep, so the list holds exactly
    ``steps`` distinct timesteps, descending, from T-1 to 0. On a zero-terminal-SNR schedule
    (lambda_{T-1} = -inf): :func:`_from_pure_noise`. Taught in chapter 8, section "Spacing the
    timesteps: evenly in t or in log-SNR".
    """
    T = schedule.T
    steps = _check_steps(steps, T)
    if getattr(schedule, "zero_terminal_snr", False):
        return _from_pure_noise(logsnr_timesteps, schedule, steps)
    if steps == 1:
        return [T - 1]
    alpha_bar = schedule.float64("alpha_bars")
    lam = 0.5 * (torch.log(alpha_bar) - torch.log1p(-alpha_bar))   # (T,), decreasing in t
    targets = torch.linspace(float(lam[-1]), float(lam[0]), steps, dtype=torch.float64)
    ts = (lam[None, :] - targets[:, None]).abs().argmin(dim=1).tolist()   # T-1 ... 0, non-increasing
    for i in range(steps - 2, -1, -1):            # strictly decreasing: push merged ones up ...
        ts[i] = max(ts[i], ts[i + 1] + 1)
    if ts[0] > T - 1:                             # ... and, if that overshot T-1, back down
        ts[0] = T - 1
        for i in range(1, steps):
            ts[i] = min(ts[i], ts[i - 1] - 1)
    return ts


def _from_pure_noise(spacing, schedule, steps: int) -> list[int]:
    """A grid of ``spacing``, a spacing that reads alpha_bar, on a zero-terminal-SNR schedule,
    where log-SNR and sigma are infinite at T-1: ``steps`` timesteps spaced over the first T-1
    steps of the schedule, the first of them (T-2) moved up to T-1, where sampling starts."""
    T, steps = schedule.T, _check_steps(steps, schedule.T)
    if steps == T:
        return list(range(T - 1, -1, -1))
    return [T - 1] + spacing(NoiseSchedule(schedule.float64("betas")[:-1]), steps)[1:]


def _check_steps(steps, T: int) -> int:
    steps = integer("steps", steps, minimum=1)
    if steps > T:
        raise ValueError(f"steps must be an integer in 1..{T} (the schedule's T), got {steps!r}")
    return steps
