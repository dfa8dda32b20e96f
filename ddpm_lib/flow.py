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

    and v is their difference. The exact flow keeps
    (x_s - (1 - s) mu) / sqrt(var_s) constant along each path.
    """
    mu, sigma_data = real("mu", mu), real("sigma_data", sigma_data)
    if not sigma_data > 0:
        raise ValueError(f"sigma_data must be positive, got {sigma_data}")

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        s = flow_time(t, T).to(torch.float64).view(-1, *[1] * (x.dim() - 1))
        x64 = x.to(torch.float64)
        var = (1 - s) ** 2 * sigma_data**2 + s**2
        centred = x64 - (1 - s) * mu
        x0 = mu + (1 - s) * sigma_data**2 * centred / var
        eps = s * centred / var
        return (eps - x0).to(x.dtype)

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
