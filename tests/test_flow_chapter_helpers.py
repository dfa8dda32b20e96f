"""What chapter 15 adds to ddpm_lib/flow.py: the exact velocity of a Gaussian mixture (against
the score of the hand-written density, the continuity equation, and the Gaussian case), the VP
path seen on the straight one (x_t / (a + b) and the velocity from v), the ODE solver in
continuous s (its order), and the two measures of straightness."""
import math

import pytest
import torch

from ddpm_lib import NoiseSchedule, flow
from ddpm_lib.analytic import gaussian_mixture_eps_predictor

f64 = torch.float64
MEANS = torch.tensor([[-0.6, -0.4], [0.6, -0.4], [0.0, 0.6]], dtype=f64)
STDS = torch.tensor([0.12, 0.2, 0.15], dtype=f64)
WEIGHTS = torch.tensor([0.6, 0.3, 0.1], dtype=f64)


def log_p(x, s):
    """log p_s(x) of the mixture on the straight path, written out by hand: component k is
    N((1 - s) m_k, ((1 - s)^2 sigma_k^2 + s^2) I). x (B, 2), s a float."""
    var = (1 - s) ** 2 * STDS**2 + s**2                                   # (K,)
    sq = ((x[:, None, :] - (1 - s) * MEANS) ** 2).sum(-1)                  # (B, K)
    return torch.logsumexp(WEIGHTS.log() - sq / (2 * var) - torch.log(2 * math.pi * var), dim=1)


def _points(n=200, seed=0):
    return 1.3 * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=f64)


@pytest.mark.parametrize("s", [0.05, 0.3, 0.5, 0.8, 0.97])
def test_mixture_velocity_from_the_score(s):
    """Tweedie on the straight path: E[eps | x_s] = -s grad log p_s, E[x0 | x_s] =
    (x - s E[eps | x_s]) / (1 - s), so v = E[eps - x0 | x_s] = -(s grad log p_s + x) / (1 - s)."""
    x = _points().requires_grad_()
    (grad,) = torch.autograd.grad(log_p(x, s).sum(), x)
    expected = -(s * grad + x.detach()) / (1 - s)
    v = flow.mixture_velocity(x.detach(), s, MEANS, STDS, WEIGHTS)
    assert v.shape == (200, 2) and v.dtype == f64
    assert torch.allclose(v, expected, rtol=1e-9, atol=1e-10)


def test_mixture_velocity_solves_the_continuity_equation():
    """d p_s / ds + div(p_s v) = 0 on a grid: the marginal velocity carries the marginals."""
    x = _points(400, seed=1)
    for s in [0.1, 0.4, 0.7, 0.9]:
        h = 1e-5
        dp_ds = (log_p(x, s + h).exp() - log_p(x, s - h).exp()) / (2 * h)
        xr = x.clone().requires_grad_()
        flux = log_p(xr, s).exp()[:, None] * flow.mixture_velocity(xr, s, MEANS, STDS, WEIGHTS)
        div = sum(torch.autograd.grad(flux[:, j].sum(), xr, retain_graph=True)[0][:, j]
                  for j in range(2))
        assert torch.allclose(dp_ds + div, torch.zeros_like(div), atol=1e-6 * dp_ds.abs().max())


def test_one_component_is_the_gaussian_velocity_and_times_can_differ():
    T = 1000
    one = flow.gaussian_mixture_velocity(T, [[0.3, 0.3]], [0.6])
    gauss = flow.gaussian_velocity(T, 0.3, 0.6)
    x, t = _points(64, seed=2), torch.randint(0, T, (64,), generator=torch.Generator().manual_seed(3))
    assert torch.allclose(one(x, t), gauss(x, t), rtol=1e-5, atol=1e-6)
    # one s per point equals each point alone
    s = torch.rand(64, generator=torch.Generator().manual_seed(4), dtype=f64)
    together = flow.mixture_velocity(x, s, MEANS, STDS, WEIGHTS)
    alone = torch.cat([flow.mixture_velocity(x[i:i + 1], s[i].item(), MEANS, STDS, WEIGHTS)
                       for i in range(64)])
    assert torch.allclose(together, alone, rtol=1e-12, atol=1e-14)


def test_the_vp_point_on_the_straight_path():
    """x_t = a x0 + b eps divided by a + b is (1 - s) x0 + s eps with s = b / (a + b); and
    eps - x0 = (b - a) x_t + (a + b) v for chapter 3's v = a eps - b x0."""
    schedule = NoiseSchedule.linear(T=1000)
    g = torch.Generator().manual_seed(5)
    x0, eps = torch.randn(16, 3, generator=g, dtype=f64), torch.randn(16, 3, generator=g, dtype=f64)
    for t in [0, 10, 300, 999]:
        ab = schedule.float64("alpha_bars")[t]
        x_t, _ = schedule.q_sample(x0, t, eps)
        x_s, s = flow.flow_from_vp(x_t, ab)
        b = (1 - ab).sqrt()
        assert math.isclose(s.item(), (b / (ab.sqrt() + b)).item(), rel_tol=1e-12)
        assert torch.allclose(x_s, (1 - s) * x0 + s * eps, rtol=1e-10, atol=1e-12)
        v = schedule.velocity(x0, t, eps)
        assert torch.allclose(flow.velocity_from_v(x_t, ab, v), eps - x0, rtol=1e-10, atol=1e-12)


def test_the_exact_eps_predictor_gives_the_exact_flow_velocity():
    """DDPM's best predictor, rewritten as v and moved to the straight path, is the marginal
    flow velocity: the two models are one model in two parameterisations."""
    schedule = NoiseSchedule.linear(T=1000)
    eps_model = gaussian_mixture_eps_predictor(schedule, MEANS, STDS, WEIGHTS)
    x_t = _points(100, seed=6)
    for t in [5, 100, 400, 900]:
        ab = schedule.float64("alpha_bars")[t]
        eps = eps_model(x_t, torch.full((100,), t))
        v = schedule.velocity(schedule.predict_x0(x_t, t, eps), t, eps)
        x_s, s = flow.flow_from_vp(x_t, ab)
        expected = flow.mixture_velocity(x_s, s.item(), MEANS, STDS, WEIGHTS)
        assert torch.allclose(flow.velocity_from_v(x_t, ab, v), expected, rtol=1e-8, atol=1e-9)


def test_flow_path_orders_on_gaussian_data():
    """For x0 ~ N(mu, sigma^2 I) the exact flow keeps (x_s - (1 - s) mu) / sqrt(var_s) constant.
    Solved from s = 1 to 0 on N even steps: Euler's error halves, Heun's quarters."""
    mu, sigma = 0.3, 0.5
    velocity = lambda x, s: flow.mixture_velocity(x, s, [[mu, mu]], [sigma])      # noqa: E731
    x1 = _points(32, seed=7)
    exact = mu + sigma * x1             # at s = 0: var = sigma^2, (1 - s) mu = mu
    errors = {}
    for method in ["euler", "heun"]:
        for N in [20, 40]:
            path = flow.flow_path(velocity, x1, torch.linspace(1, 0, N + 1), method)
            assert path.shape == (N + 1, 32, 2) and torch.equal(path[0], x1)
            errors[method, N] = (path[-1] - exact).abs().max().item()
    assert 1.7 < errors["euler", 20] / errors["euler", 40] < 2.3
    assert 3.4 < errors["heun", 20] / errors["heun", 40] < 4.6
    with pytest.raises(ValueError, match="method"):
        flow.flow_path(velocity, x1, [1.0, 0.0], "rk4")


def test_straightness_of_known_paths():
    s = torch.linspace(1, 0, 1001, dtype=f64)
    tau = 1 - s                                                      # 0 .. 1 along the path
    c = torch.tensor([[2.0, -1.0]], dtype=f64)
    straight = tau[:, None, None] * c                                # (K + 1, 1, 2)
    assert flow.straightness(straight, s).abs().max() < 1e-12
    assert flow.chord_distance(straight).abs().max() < 1e-12
    # straight but not at constant speed: z = tau^2 c, S = int (2 tau - 1)^2 = 1/3 (minus the
    # piecewise-linear path's 1 / (3 K^2))
    accelerating = tau[:, None, None] ** 2 * c
    assert flow.straightness(accelerating, s).item() == pytest.approx(1 / 3 - 1 / (3 * 1000**2),
                                                                       rel=1e-9)
    assert flow.chord_distance(accelerating).abs().max() < 1e-12
    # an L: (0, 0) -> (0.5, 0.5) -> (1, 0) at constant speed: velocities (1, 1) and (1, -1)
    # against the chord (1, 0): S = 1; the corner is 0.5 from the chord of length 1
    corner = torch.tensor([[[0.0, 0.0]], [[0.5, 0.5]], [[1.0, 0.0]]], dtype=f64)
    assert flow.straightness(corner, [1.0, 0.5, 0.0]).item() == pytest.approx(1.0)
    assert flow.chord_distance(corner).item() == pytest.approx(0.5)
    # the distance is to the segment, not to its line: an overshoot to (2, 0) is 1 away
    overshoot = torch.tensor([[[0.0, 0.0]], [[2.0, 0.0]], [[1.0, 0.0]]], dtype=f64)
    assert flow.chord_distance(overshoot).item() == pytest.approx(1.0)
    # the distance does not depend on the timing, the straightness does
    assert flow.straightness(corner, [1.0, 0.9, 0.0]).item() > 1.5
