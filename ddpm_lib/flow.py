"""Flow matching on the straight path (Lipman et al. 2023; Liu et al.
2023, rectified flow): the path, the exact velocity of Gaussian data, and
the ODE sampler.

The path joins a data point x0 to a noise eps in a straight line::

    x_s = (1 - s) x0 + s eps,    s in [0, 1]  (0: data, 1: noise)

Along it the velocity is dx_s/ds = eps - x0, the conditional velocity
that the network is trained to predict with a squared error
(``prediction="flow"`` in :mod:`ddpm_lib.objectives`). The squared error
is smallest for the conditional mean, the marginal velocity::

    v(x, s) = E[eps - x0 | x_s = x]

and the ODE dx/ds = v(x, s), run from s = 1 (x = eps ~ N(0, I)) down to
s = 0, carries the noise to the data. A network trained at the integer
timesteps t = 0 .. T-1 sees s = (t + 1) / T (objectives.flow_time).

From a velocity, both parameterisations of the earlier chapters::

    x0_hat = x - s v,     eps_hat = x + (1 - s) v

Chapter 15 adds the exact velocity of a Gaussian mixture, the VP path
seen on the straight one (:func:`flow_from_vp`, :func:`velocity_from_v`),
an ODE solver in continuous s that keeps the path (:func:`flow_path`),
and two measures of how straight a path is.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .checks import integer, real
from .objectives import flow_time
from .samplers import ddim_timesteps

Tensor = torch.Tensor
METHODS = ("euler", "heun")


def x0_from_velocity(x: Tensor, s, v: Tensor) -> Tensor:
    """x0_hat = x - s v (x, v: (B, ...); s a float or (B, 1, ...))."""
    return x - s * v


def eps_from_velocity(x: Tensor, s, v: Tensor) -> Tensor:
    """eps_hat = x + (1 - s) v (x, v: (B, ...); s a float or (B, 1, ...))."""
    return x + (1.0 - s) * v


def gaussian_velocity(T: int, mu: float, sigma_data: float):
    """The marginal velocity E[eps - x0 | x_s] when x0 ~ N(mu, sigma_data^2 I),
    as a model ``(x, t) -> v`` at s = (t + 1) / T. With
    var_s = (1 - s)^2 sigma_data^2 + s^2, the joint Gaussian gives::

        E[x0 | x]  = mu + (1 - s) sigma_data^2 (x - (1 - s) mu) / var_s
        E[eps | x] = s (x - (1 - s) mu) / var_s

    and v is their difference (:func:`mixture_velocity` with one
    component). The exact flow keeps
    (x_s - (1 - s) mu) / sqrt(var_s) constant along each path.
    """
    mu, sigma_data = real("mu", mu), real("sigma_data", sigma_data)
    if not sigma_data > 0:
        raise ValueError(f"sigma_data must be positive, got {sigma_data}")

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        # one component of mixture_velocity, every value its own dimension
        flat = x.reshape(x.shape[0], -1).cpu()
        means = torch.full((1, flat.shape[1]), mu, dtype=torch.float64)
        s = flow_time(t, T).cpu()
        v = mixture_velocity(flat, s, means, [sigma_data])
        return v.reshape(x.shape).to(x.device, x.dtype)

    return velocity


@torch.no_grad()
def flow_sample(model, shape, *, T: int = 1000, steps: int = 50,
                method: str = "euler", x_T: Tensor | None = None,
                generator: torch.Generator | None = None, device=None,
                progress: bool = False) -> Tensor:
    """x_0 of ``shape`` (B, C, H, W) by solving dx/ds = v(x, s) from s = 1
    to 0, with ``model(x, t) -> v`` trained at s = (t + 1) / T.

    The grid: ``steps`` timesteps evenly spread from T-1 down to 0
    (``ddim_timesteps``), s = (t + 1) / T, then s = 0. ``method="euler"``
    (one network call per step)::

        x_{s'} = x_s + (s' - s) v(x_s, s)

    or ``"heun"`` (second order: the Euler step, the velocity at its
    end, then the average of the two slopes; 2 calls per step, and
    Euler on the last step to s = 0, where the network was not trained).
    ``x_T`` (default: drawn with ``generator``) is the noise at s = 1.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, "
                         f"got {method!r}")
    T = integer("T", T, minimum=1)
    ts = ddim_timesteps(T, integer("steps", steps, minimum=1))
    device = torch.device(device) if device is not None else (
        x_T.device if x_T is not None else torch.device("cpu"))
    if x_T is None:
        x_T = torch.randn(shape, generator=generator, device=device)
    elif tuple(x_T.shape) != tuple(shape):
        raise ValueError(f"x_T has shape {tuple(x_T.shape)}, not {tuple(shape)}")
    x = x_T.to(device, torch.float32)

    def velocity(x_at: Tensor, t_at: int) -> Tensor:
        t_batch = torch.full((x_at.shape[0],), t_at, device=x_at.device)
        return model(x_at, t_batch).float()

    for i, t in enumerate(tqdm(ts, desc=f"flow ({method})",
                               disable=not progress)):
        s = (t + 1) / T
        t_next = ts[i + 1] if i + 1 < len(ts) else -1
        s_next = (t_next + 1) / T            # 0 after the last timestep
        v = velocity(x, t)
        x_euler = x + (s_next - s) * v
        if method == "euler" or t_next < 0:
            x = x_euler
        else:
            v_end = velocity(x_euler, t_next)
            x = x + (s_next - s) * 0.5 * (v + v_end)
    return x


# ------------------------------------------------------------------------
# Chapter 15: mixtures, the VP path on the straight one, straightness
# ------------------------------------------------------------------------
def mixture_velocity(x: Tensor, s, means, stds, weights=None) -> Tensor:
    """The marginal velocity E[eps - x0 | x_s = x] at time s (a float or
    (B,)) when x0 ~ sum_k pi_k N(m_k, sigma_k^2 I). Given component k,
    x_s ~ N((1 - s) m_k, var_k I), var_k = (1 - s)^2 sigma_k^2 + s^2::

        E[x0 | x, k]  = m_k + (1 - s) sigma_k^2 (x - (1 - s) m_k) / var_k
        E[eps | x, k] = s (x - (1 - s) m_k) / var_k

    averaged with r_k(x) = pi_k N(x; (1 - s) m_k, var_k I) / p_s(x).
    x (B, D), means (K, D), stds (K,), weights (K,) (equal if None).
    Returns (B, D), float64.
    """
    m = torch.as_tensor(means, dtype=torch.float64)
    sd = torch.as_tensor(stds, dtype=torch.float64).reshape(-1)
    pi = torch.ones(len(m), dtype=torch.float64) if weights is None \
        else torch.as_tensor(weights, dtype=torch.float64)
    x = x.to(torch.float64)
    s = torch.as_tensor(s, dtype=torch.float64).reshape(-1, 1, 1)
    var = (1 - s[..., 0]) ** 2 * sd**2 + s[..., 0] ** 2      # (B or 1, K)
    diff = x[:, None, :] - (1 - s) * m                         # (B, K, D)
    log_r = (pi / pi.sum()).log() - 0.5 * m.shape[1] * var.log() \
        - 0.5 * (diff**2).sum(-1) / var
    r = torch.softmax(log_r, dim=1)[..., None]                  # (B, K, 1)
    x0 = m + (1 - s) * sd[:, None] ** 2 * diff / var[..., None]
    eps = s * diff / var[..., None]
    return (r * (eps - x0)).sum(1)


def gaussian_mixture_velocity(T: int, means, stds, weights=None):
    """:func:`mixture_velocity` as a model ``(x (B, D), t (B,)) -> v``
    at s = (t + 1) / T, like a network trained on ``prediction="flow"``
    (for :func:`flow_sample`)."""
    T = integer("T", T, minimum=1)

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        s = flow_time(t, T).to(torch.float64).cpu()
        v = mixture_velocity(x.cpu(), s, means, stds, weights)
        return v.to(x.device, x.dtype)

    return velocity


def flow_from_vp(x_t: Tensor, alpha_bar) -> tuple[Tensor, Tensor]:
    """The straight path's (x_s, s) at the point x_t = a x0 + b eps of the
    VP path, a = sqrt(alpha_bar), b = sqrt(1 - alpha_bar): divided by
    a + b it is (1 - s) x0 + s eps with s = b / (a + b), the same x0 and
    eps. ``alpha_bar`` a float or a tensor that broadcasts against x_t."""
    alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float64)
    a, b = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    return x_t / (a + b), b / (a + b)


def velocity_from_v(x_t: Tensor, alpha_bar, v: Tensor) -> Tensor:
    """The straight path's velocity eps - x0 from x_t and the v of chapter
    3, v = a eps - b x0 (a = sqrt(alpha_bar), b = sqrt(1 - alpha_bar)).
    With eps = b x_t + a v and x0 = a x_t - b v (chapter 3)::

        eps - x0 = (b - a) x_t + (a + b) v
    """
    alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float64)
    a, b = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    return (b - a) * x_t + (a + b) * v


def flow_path(velocity, x: Tensor, s_grid, method: str = "heun") -> Tensor:
    """Every state of dx/ds = velocity(x, s) solved from ``x`` (B, ...)
    at s_grid[0] through the times ``s_grid`` (K + 1 floats, either
    direction): (K + 1, B, ...). ``velocity(x, s)`` takes a float s.
    ``"euler"``: x' = x + h v(x, s); ``"heun"``: the average of v there
    and at the end of the Euler step (2 calls per step)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, "
                         f"got {method!r}")
    s_grid = [float(s) for s in s_grid]
    path = [x]
    for s, s_next in zip(s_grid[:-1], s_grid[1:]):
        v = velocity(x, s)
        x_euler = x + (s_next - s) * v
        if method == "heun":
            v = 0.5 * (v + velocity(x_euler, s_next))
        x = x + (s_next - s) * v
        path.append(x)
    return torch.stack(path)


def straightness(path: Tensor, s_grid) -> Tensor:
    """How far a path's velocity is from its chord's, per path (B,)::

        S = int_0^1 |dz/du - (z(1) - z(0))|^2 du / |z(1) - z(0)|^2

    with u = (s - s_0) / (s_K - s_0) and z the piecewise-linear path
    through the states ``path`` (K + 1, B, ...) at ``s_grid`` (K + 1,).
    0 for a straight path at constant speed; Liu et al. (2023) average
    the numerator (their S). Equal to sum_k |dz_k|^2 / du_k / |c|^2 - 1.
    """
    s = torch.as_tensor([float(v) for v in s_grid], dtype=torch.float64)
    u = (s - s[0]) / (s[-1] - s[0])                             # (K + 1,)
    z = path.flatten(2).to(torch.float64)                 # (K + 1, B, D)
    chord = z[-1] - z[0]
    dz = z[1:] - z[:-1]
    velocity = dz / (u[1:] - u[:-1])[:, None, None]
    excess = ((velocity - chord) ** 2).sum(-1)                  # (K, B)
    energy = (excess * (u[1:] - u[:-1])[:, None]).sum(0)
    return energy / (chord**2).sum(-1)


def chord_distance(path: Tensor) -> Tensor:
    """The largest distance of a path's states (K + 1, B, ...) from the
    segment between its two ends, over the segment's length: (B,). Does
    not depend on how the path is timed."""
    z = path.flatten(2).to(torch.float64)                 # (K + 1, B, D)
    chord = z[-1] - z[0]
    u = ((z - z[0]) * chord).sum(-1) / (chord**2).sum(-1)   # (K + 1, B)
    nearest = z[0] + u.clamp(0, 1)[..., None] * chord
    gap = (z - nearest).norm(dim=-1).amax(0)
    return gap / chord.norm(dim=-1)
