"""The likelihood bound of a trained noise predictor, in bits per dimension.

The negative evidence lower bound of Ho et al. (2020, eq. 5) splits into three kinds of
terms (Chapter 3, "The evidence lower bound"; 0-based index t is the paper's step t + 1)::

    -log p(x0) <= L_T + sum_{t=1}^{T-1} L_t + L_0

    L_T = KL( q(x_T | x0) || N(0, I) )                                   the prior term
    L_t = KL( q(x_{t-1} | x_t, x0) || p_theta(x_{t-1} | x_t) ),  x_t ~ q(x_t | x0)
    L_0 = -log p_theta(x0 | x_1)                                        the decoder

``p_theta(x_{t-1} | x_t) = N(mu_theta(x_t, t), sigma_t^2 I)`` with the mean written with the
network's eps (Ho et al. eq. 11) and ``sigma_t^2 = beta_t`` or ``beta_tilde_t``, as in
:func:`ddpm_lib.samplers.ddpm_sample`. The decoder is Ho et al.'s discrete one (section
3.3): the Gaussian N(mu_theta(x_1, 0), sigma_0^2) integrated over the bin of width 2/255
around each of the 256 pixel values, the two end bins stretched to infinity, so that the
bound is a bound on the probability of the 8-bit image itself.

Divided by ``D ln 2`` (D = C H W values per image) the bound is in bits per dimension.
The sum over t has T - 1 terms, each a network evaluation; :func:`nll_bound` estimates it
without bias from one timestep drawn in each of ``num_timesteps`` strata, narrow where
the terms are large (small t) and wide where they are small.

Chapter 15 adds the likelihood of the probability-flow ODE's model, which is exact for
that model (:func:`ode_bits_per_dim`): the instantaneous change of variables along the
ODE, with Hutchinson's estimator of the divergence (:func:`divergence`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import diffusion

Tensor = torch.Tensor

BIN_HALF_WIDTH = 1.0 / 255.0   # pixel values k / 127.5 - 1 lie 2/255 apart


def _sum_per_image(x: Tensor) -> Tensor:
    """(B, ...) -> (B,): summed over every dimension but the first."""
    return x.flatten(1).sum(1)


def check_8bit(x0: Tensor) -> None:
    """The discrete decoder needs images on the 256-value grid ``k / 127.5 - 1``: a ValueError
    otherwise. x0 (B, C, H, W). Used by :func:`nll_bound`; the grid is taught in chapter 3,
    "The first step: a discrete decoder" (``ch03-l0``)."""
    if not isinstance(x0, torch.Tensor) or not x0.is_floating_point() or x0.ndim < 2:
        raise ValueError("x0 must be a float tensor of shape (B, C, H, W) in [-1, 1]")
    levels = (x0.double() + 1) * 127.5
    if (levels - levels.round()).abs().max() > 1e-3 or levels.min() < -1e-3 or levels.max() > 255 + 1e-3:
        raise ValueError("the discrete decoder needs 8-bit images scaled to [-1, 1] "
                         "(uint8 / 127.5 - 1, as ddpm_lib.data.load returns them)")


def _log_prob_between(lo: Tensor, hi: Tensor) -> Tensor:
    """log( Phi(hi) - Phi(lo) ) for standard-normal bounds lo < hi, accurate in both tails.

    In the upper tail the difference is taken as Phi(-lo) - Phi(-hi), where the two
    probabilities are small and their difference keeps its digits.
    """
    upper = lo > 0
    lo, hi = torch.where(upper, -hi, lo), torch.where(upper, -lo, hi)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return log_hi + torch.log1p(-torch.exp(log_lo - log_hi))


def discrete_gaussian_log_likelihood(x0: Tensor, mean: Tensor, std: Tensor | float) -> Tensor:
    """log p(x0) elementwise, for 8-bit x0 in [-1, 1] under N(mean, std^2) discretised.

    Each pixel value x owns the interval [x - 1/255, x + 1/255]; the lowest value (-1)
    owns everything below, the highest (+1) everything above, so the 256 probabilities
    sum to 1 for any mean and std. Shapes broadcast; float64 result.
    Taught in chapter 3, "The first step: a discrete decoder" (``ch03-l0``).
    """
    level = ((x0.double() + 1) * 127.5).round()     # 0..255, exact whatever x0's dtype
    x0, mean = level / 127.5 - 1, mean.double()
    std = torch.as_tensor(std, dtype=torch.float64, device=x0.device)
    lo = (x0 - BIN_HALF_WIDTH - mean) / std
    hi = (x0 + BIN_HALF_WIDTH - mean) / std
    lo = torch.where(level == 0, torch.full_like(lo, -math.inf), lo)
    hi = torch.where(level == 255, torch.full_like(hi, math.inf), hi)
    return _log_prob_between(lo, hi)


def prior_kl(schedule, x0: Tensor) -> Tensor:
    """L_T = KL( N(sqrt(alpha_bar_T) x0, (1 - alpha_bar_T) I) || N(0, I) ) per image, nats (B,).
    Taught in chapter 2, "Why the last step must reach (almost) pure noise"."""
    x0 = x0.double()
    alpha_bar = schedule.float64("alpha_bars")[-1].to(x0.device)
    kl = diffusion.gaussian_kl(alpha_bar.sqrt() * x0, 1 - alpha_bar, torch.zeros_like(x0), torch.ones_like(x0))
    return _sum_per_image(kl)


def _reverse_variances(schedule, sigma: str) -> Tensor:
    """sigma_t^2 of p_theta for every index t, float64 (T,). With ``beta_tilde`` the first
    one (0: the posterior of x0 is a point) is replaced by the second, as the decoder
    needs a positive variance."""
    if sigma == "beta":
        return schedule.float64("betas")
    if sigma == "beta_tilde":
        beta_tilde = schedule.float64("beta_tilde")
        return torch.cat([beta_tilde[1:2], beta_tilde[1:]])
    raise ValueError(f"sigma must be 'beta' or 'beta_tilde', got {sigma!r}")


@torch.no_grad()
def elbo_terms(model, schedule, x0: Tensor, t: Tensor, eps: Tensor, sigma: str = "beta") -> Tensor:
    """L_t per image in nats, (B,), at 0-based timesteps ``t`` (B,): the KL term where t >= 1,
    the decoder's -log p(x0 | x_1) where t == 0. ``eps`` (like x0) noises x0 to x_t.
    Taught in chapter 3, "From a KL divergence to a noise-prediction loss" (t >= 1) and
    "The first step: a discrete decoder" (t == 0, ``ch03-l0``)."""
    t = schedule.check_t(t, batch_size=x0.shape[0])
    x_t, _ = schedule.q_sample(x0, t, eps)              # in x0's dtype, which the model takes
    eps_pred = model(x_t, t).double()
    x0, x_t = x0.double(), x_t.double()                  # the terms in float64
    var = _reverse_variances(schedule, sigma).to(x0.device)[t].reshape(-1, *[1] * (x0.ndim - 1))
    mean_theta = schedule.reverse_mean(x_t, t, eps_pred)
    # t >= 1: KL between the true posterior and the model's step, both Gaussian
    mean_q, _ = schedule.posterior(x0, x_t, t)
    var_q = schedule.at("beta_tilde", t, x0).clamp(min=1e-300)     # float64; 0 at t = 0
    kl = _sum_per_image(diffusion.gaussian_kl(mean_q, var_q, mean_theta, var))
    # t == 0: the discrete decoder
    decoder = -_sum_per_image(discrete_gaussian_log_likelihood(x0, mean_theta, var.sqrt()))
    return torch.where(t == 0, decoder, kl)


def _strata_edges(T: int, k: int) -> Tensor:
    """``k + 1`` increasing edges from 1 to T, spaced evenly in log t where the strata can
    hold one index each: the terms of the bound are large and vary fast at small t, so the
    first strata are single timesteps, evaluated exactly, and the wide ones lie where L_t is
    small and flat."""
    edges = [1]
    for j in range(k):
        remaining = k - j
        step = (T / edges[-1]) ** (1 / remaining)     # geometric spacing for what is left
        edges.append(min(T - remaining + 1, max(edges[-1] + 1, round(edges[-1] * step))))
    return torch.tensor(edges)


def _stratified_timesteps(T: int, k: int, batch: int, generator) -> tuple[Tensor, Tensor]:
    """One index drawn uniformly from each of the ``k`` strata of 1..T-1 (:func:`_strata_edges`),
    per image. Returns the indices (k, batch) and each stratum's size (k,): the sum
    sum_j size_j L_{t_j} is an unbiased estimate of sum_{t=1}^{T-1} L_t."""
    edges = _strata_edges(T, k)
    sizes = edges[1:] - edges[:-1]
    u = torch.rand(k, batch, generator=generator, dtype=torch.float64)
    t = edges[:-1, None] + (u * sizes[:, None]).long()
    return t, sizes.double()


@dataclass
class NLLBound:
    """Per-image terms of the bound in bits per dimension, each (N,); ``total`` is their sum.
    Used in chapter 3, "The bound of the book's model, in bits per dimension" (``ch03-l0``)."""
    prior: Tensor
    diffusion: Tensor
    decoder: Tensor

    @property
    def total(self) -> Tensor:
        return self.prior + self.diffusion + self.decoder

    def summary(self) -> dict:
        """Mean over images and its standard error (which includes the Monte Carlo noise)."""
        total = self.total
        n = total.numel()
        return dict(bits_per_dim=total.mean().item(), standard_error=(total.std() / math.sqrt(n)).item(),
                    n_images=n, prior=self.prior.mean().item(), diffusion=self.diffusion.mean().item(),
                    decoder=self.decoder.mean().item())


@torch.no_grad()
def nll_bound(model, schedule, x0: Tensor, num_timesteps: int | None = None, sigma: str = "beta",
              batch_size: int = 256, generator: torch.Generator | None = None) -> NLLBound:
    """The negative ELBO of 8-bit images ``x0`` (N, C, H, W) in bits per dimension, per image.

    ``num_timesteps=None`` evaluates every L_t (T - 1 network calls per image); an integer
    k estimates their sum from one timestep in each of k strata (unbiased, k calls per
    image). The noise and the strata draws come from ``generator`` (CPU).
    Taught in chapter 3, "The bound of the book's model, in bits per dimension" (``ch03-l0``).
    """
    check_8bit(x0)
    if sigma not in ("beta", "beta_tilde"):
        raise ValueError(f"sigma must be 'beta' or 'beta_tilde', got {sigma!r}")
    T = schedule.T
    k = T - 1 if num_timesteps is None else num_timesteps
    if not isinstance(k, int) or not 1 <= k <= T - 1:
        raise ValueError(f"num_timesteps must be an integer in 1..{T - 1} or None, got {num_timesteps!r}")
    device = schedule.device
    nats_to_bits = 1.0 / (x0[0].numel() * math.log(2.0))
    parts = {"prior": [], "diffusion": [], "decoder": []}
    for x in x0.split(batch_size):
        x = x.to(device)
        B = x.shape[0]
        def draw_eps():
            return torch.randn(x.shape, generator=generator).to(device, x.dtype)
        zero = torch.zeros(B, dtype=torch.long, device=device)
        parts["decoder"].append(elbo_terms(model, schedule, x, zero, draw_eps(), sigma).cpu())
        parts["prior"].append(prior_kl(schedule, x).cpu())
        if k == T - 1:
            ts, sizes = torch.arange(1, T)[:, None].expand(T - 1, B), torch.ones(T - 1, dtype=torch.float64)
        else:
            ts, sizes = _stratified_timesteps(T, k, B, generator)
        total = torch.zeros(B, dtype=torch.float64)
        for t, size in zip(ts, sizes):
            total += size * elbo_terms(model, schedule, x, t.to(device), draw_eps(), sigma).cpu()
        parts["diffusion"].append(total)
    return NLLBound(**{name: torch.cat(v) * nats_to_bits for name, v in parts.items()})


# ------------------------------------------------------------------------
# The likelihood of the probability-flow ODE's model (chapter 15)
# ------------------------------------------------------------------------
def rademacher(shape, generator: torch.Generator | None = None,
               dtype=torch.float32) -> Tensor:
    """Random signs, +1 or -1 with probability 1/2 each, of ``shape`` (on
    the CPU): the probes z of Hutchinson's trace estimator."""
    bits = torch.randint(0, 2, tuple(shape), generator=generator)
    return (2 * bits - 1).to(dtype)


def divergence(out: Tensor, x: Tensor, probes: Tensor | None) -> Tensor:
    """Estimates of div f(x) = tr(d out / d x) per sample, for out = f(x)
    (B, ...) computed from x (B, ...) with autograd on.

    ``probes`` (P, B, ...): Hutchinson's estimator z^T (d out / d x) z,
    one vector-Jacobian product per probe z; unbiased when
    E[z z^T] = I. Returns (P, B), float64. ``probes=None``: the exact
    trace, one backward pass per dimension (small D only); (1, B).
    """
    if probes is None:
        flat, total = out.flatten(1), 0
        for j in range(flat.shape[1]):
            (g,) = torch.autograd.grad(flat[:, j].sum(), x,
                                       retain_graph=True)
            total = total + g.flatten(1)[:, j].double()
        return total[None]
    rows = []
    for z in probes:
        (zJ,) = torch.autograd.grad(out, x, z, retain_graph=True)
        rows.append((zJ * z).flatten(1).double().sum(1))
    return torch.stack(rows)


def ode_timesteps(schedule, steps: int) -> list[int]:
    """``steps + 1`` distinct timesteps from 0 up to T - 1, evenly spaced
    in log rho, rho = sqrt((1 - alpha_bar) / alpha_bar), each rounded to
    the timestep of nearest rho (merged neighbours pushed apart)."""
    T = schedule.T
    if not isinstance(steps, int) or not 1 <= steps <= T - 1:
        raise ValueError(f"steps must be an integer in 1..{T - 1}, "
                         f"got {steps!r}")
    alpha_bar = schedule.float64("alpha_bars")
    log_rho = 0.5 * (torch.log1p(-alpha_bar) - torch.log(alpha_bar))
    targets = torch.linspace(float(log_rho[0]), float(log_rho[-1]),
                             steps + 1, dtype=torch.float64)
    ts = (log_rho[None] - targets[:, None]).abs().argmin(1).tolist()
    for i in range(1, steps + 1):
        ts[i] = max(ts[i], ts[i - 1] + 1)
    ts[-1] = T - 1
    for i in range(steps - 1, -1, -1):
        ts[i] = min(ts[i], ts[i + 1] - 1)
    return ts


def _slope(eps_model, schedule, xbar: Tensor, t: int,
           probes: Tensor | None) -> tuple[Tensor, Tensor]:
    """d xbar / d rho = eps(sqrt(alpha_bar_t) xbar, t), (B, ...), and
    the estimates of its divergence in xbar, (P, B)."""
    scale = math.sqrt(schedule.float64("alpha_bars")[t].item())
    with torch.enable_grad():
        xbar = xbar.detach().requires_grad_()
        t_batch = torch.full((xbar.shape[0],), t, device=xbar.device)
        eps = eps_model(scale * xbar, t_batch)
        div = divergence(eps, xbar, probes)
    return eps.detach().to(xbar.dtype), div


def ode_log_likelihood(eps_model, schedule, x: Tensor, steps: int = 64,
                       probes: int | None = 1,
                       generator: torch.Generator | None = None) -> Tensor:
    """log p_0(x) in nats of x (B, ...) at timestep 0 under the model of
    the probability-flow ODE: N(0, I) at timestep T - 1, carried to
    timestep 0 by the ODE. Returns (P, B), one estimate per Rademacher
    probe (the same probes along the whole path, as in Grathwohl et al.
    2019); ``probes=None``: the exact divergence, (1, B).

    In xbar = x / sqrt(alpha_bar) and rho (chapter 14) the ODE is
    d xbar / d rho = eps(x, t), and by the instantaneous change of
    variables (Chen et al. 2018) d log p(xbar) / d rho = -div eps, so::

        log p_0(x) = log N(x_T; 0, I) + D/2 log(alpha_bar_T / alpha_bar_0)
                     + int_{rho_0}^{rho_T} div eps d rho

    with D values per sample. Heun's method in rho on
    :func:`ode_timesteps` (2 ``steps`` network calls); the integral by
    the trapezoid rule in log rho, as int rho div eps d(log rho).
    """
    ts = ode_timesteps(schedule, steps)
    alpha_bar = schedule.float64("alpha_bars")
    rho = ((1 - alpha_bar) / alpha_bar).sqrt().tolist()
    z = None if probes is None else rademacher(
        (probes, *x.shape), generator, x.dtype).to(x.device)
    xbar = x.detach() / math.sqrt(alpha_bar[0].item())
    f, div = _slope(eps_model, schedule, xbar, ts[0], z)
    integral = torch.zeros_like(div)
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        r, r_next = rho[t], rho[t_next]
        f_end, div_end = _slope(eps_model, schedule,
                                xbar + (r_next - r) * f, t_next, z)
        xbar = xbar + (r_next - r) * 0.5 * (f + f_end)
        h = math.log(r_next / r)
        integral += h * 0.5 * (r * div + r_next * div_end)
        if i + 2 < len(ts):                  # the next step's first slope
            f, div = _slope(eps_model, schedule, xbar, t_next, z)
    D = x[0].numel()
    x_T = math.sqrt(alpha_bar[-1].item()) * xbar.double()
    log_prior = -0.5 * (_sum_per_image(x_T**2) + D * math.log(2 * math.pi))
    log_scale = 0.5 * D * math.log(alpha_bar[-1] / alpha_bar[0])
    return (log_prior + log_scale).cpu() + integral.cpu()


@dataclass
class ODEBits:
    """Bits per dimension of each image under the ODE's model: ``per_probe``
    (N, P), one column per probe; ``decoder`` (N,), the discrete
    decoder's part (zero for uniform dequantisation). Chapter 15."""
    per_probe: Tensor
    decoder: Tensor

    @property
    def total(self) -> Tensor:
        return self.per_probe.mean(1)      # (N,): the mean over probes

    def summary(self) -> dict:
        """Mean over images and its standard error (the probes' noise
        included), and the probes' part of it: sqrt(mean within-image
        variance over the P probes / (P N))."""
        n, P = self.per_probe.shape
        probe_var = self.per_probe.var(1).mean().item() if P > 1 else \
            math.nan
        return dict(bits_per_dim=self.total.mean().item(),
                    standard_error=(self.total.std() / math.sqrt(n)).item(),
                    probe_standard_error=math.sqrt(probe_var / (P * n)),
                    decoder=self.decoder.mean().item(), n_images=n,
                    probes=P)


def ode_bits_per_dim(eps_model, schedule, x0: Tensor, steps: int = 64,
                     probes: int = 1, dequantize: str = "uniform",
                     sigma: str = "beta", batch_size: int = 16,
                     generator: torch.Generator | None = None,
                     progress: bool = False) -> ODEBits:
    """Bits per dimension of 8-bit images ``x0`` (N, C, H, W) in [-1, 1]
    under the ODE's model (:func:`ode_log_likelihood`), made into a
    probability of the 8-bit image in one of two ways, each giving an
    upper bound on -log2 of that probability:

    ``"uniform"``: uniform dequantisation, y = x0 + Delta with Delta
    uniform in the bin of width 2/255 of each value (``BIN_HALF_WIDTH``),
    and p(y) = p_0(sqrt(alpha_bar_0) y) alpha_bar_0^(D/2)::

        bits = -log2 p(y) / D + log2(255 / 2)

    ``"decoder"``: chapter 3's discrete decoder L_0 after the first step,
    x_1 = sqrt(alpha_bar_0) x0 + sqrt(1 - alpha_bar_0) eps ~ q(x_1 | x0)::

        bits = [L_0 + log q(x_1 | x0) - log p_0(x_1)] / (D ln 2)

    (chapter 3's bound with L_T + sum L_t replaced by the ODE's term).
    Noise and probes come from ``generator`` (CPU).
    """
    check_8bit(x0)
    if dequantize not in ("uniform", "decoder"):
        raise ValueError("dequantize must be 'uniform' or 'decoder', "
                         f"got {dequantize!r}")
    alpha_bar_0 = schedule.float64("alpha_bars")[0].item()
    D = x0[0].numel()
    bits, decoder = [], []
    for x in tqdm(x0.split(batch_size), desc=f"ODE ({dequantize})",
                  disable=not progress):
        x = x.to(schedule.device)
        draw = torch.rand if dequantize == "uniform" else torch.randn
        noise = draw(x.shape, generator=generator, dtype=torch.float64)
        part = torch.zeros(x.shape[0], dtype=torch.float64)
        if dequantize == "uniform":
            y = x.double() + (2 * noise - 1).to(x.device) * BIN_HALF_WIDTH
            x_1 = (math.sqrt(alpha_bar_0) * y).to(x.dtype)
            nats = D * math.log(0.5 / BIN_HALF_WIDTH) - 0.5 * D * math.log(
                alpha_bar_0)
        else:
            eps = noise.to(x.device, x.dtype)
            x_1, _ = schedule.q_sample(x, 0, eps)
            zero = torch.zeros(len(x), dtype=torch.long, device=x.device)
            part = elbo_terms(eps_model, schedule, x, zero, eps,
                              sigma).cpu()
            nats = part - 0.5 * _sum_per_image(noise**2) - 0.5 * D * \
                math.log(2 * math.pi * (1 - alpha_bar_0))   # + log q
        log_p = ode_log_likelihood(eps_model, schedule, x_1, steps,
                                   probes, generator)
        bits.append(((nats - log_p) / (D * math.log(2.0))).T)
        decoder.append(part / (D * math.log(2.0)))
    return ODEBits(torch.cat(bits), torch.cat(decoder))
