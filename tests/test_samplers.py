"""Samplers driven by the exact noise predictor of Gaussian data must reproduce that data."""
import math

import pytest
import torch

from ddpm_lib import NoiseSchedule
from ddpm_lib.diffusion import gaussian_eps_predictor
from ddpm_lib.samplers import ddim_sample, ddim_timesteps, ddpm_sample

MU, S = 0.3, 0.5
SHAPE = (2000, 1, 4, 4)  # 32,000 values


def check_moments(x, mu=MU, s=S, k=5.0, std_tol=0.02):
    n = x.numel()
    assert x.mean().item() == pytest.approx(mu, abs=k * s / math.sqrt(n)), "mean"
    assert x.std().item() == pytest.approx(s, rel=std_tol), "std"


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("sigma", ["beta", "beta_tilde"])
def test_ddpm_reproduces_gaussian_data(kind, sigma):
    sched = getattr(NoiseSchedule, kind)()
    model = gaussian_eps_predictor(sched, MU, S)
    x = ddpm_sample(model, sched, SHAPE, sigma=sigma, clip_x0=False, generator=torch.Generator().manual_seed(0))
    check_moments(x)


@pytest.mark.parametrize("steps", [1000, 250])
def test_ddim_reproduces_gaussian_data(linear, steps):
    model = gaussian_eps_predictor(linear, MU, S)
    x = ddim_sample(model, linear, SHAPE, steps=steps, clip_x0=False, generator=torch.Generator().manual_seed(1))
    check_moments(x)


def test_ddim_eta1_full_is_ddpm_beta_tilde(linear):
    """DDIM with eta = 1 over all T steps is DDPM with sigma^2 = beta_tilde, noise for noise."""
    model = gaussian_eps_predictor(linear, MU, S)
    a = ddpm_sample(model, linear, (8, 1, 3, 3), sigma="beta_tilde", generator=torch.Generator().manual_seed(5))
    b = ddim_sample(model, linear, (8, 1, 3, 3), steps=1000, eta=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(a, b, atol=1e-4)


def test_ddim_eta0_is_deterministic(linear):
    model = gaussian_eps_predictor(linear, MU, S)
    x_T = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(2))
    a = ddim_sample(model, linear, x_T.shape, steps=20, x_T=x_T, generator=torch.Generator().manual_seed(3))
    b = ddim_sample(model, linear, x_T.shape, steps=20, x_T=x_T, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    c = ddim_sample(model, linear, x_T.shape, steps=20, eta=0.5, x_T=x_T, generator=torch.Generator().manual_seed(4))
    assert not torch.allclose(a, c)


def test_ddim_step_matches_formula(linear):
    """One DDIM update computed by hand in float64 from Song et al. (2021), eq. 12."""
    g = torch.Generator().manual_seed(0)
    eps_fixed = torch.randn(3, 1, 2, 2, generator=g)
    model = lambda x, t: eps_fixed  # noqa: E731
    x_T = torch.randn(3, 1, 2, 2, generator=g)
    timesteps = [999, 600]
    x, traj = ddim_sample(model, linear, x_T.shape, timesteps=timesteps, eta=0.0, clip_x0=False, x_T=x_T,
                          return_trajectory=True)
    ab = linear.float64("alpha_bars")
    e, xt = eps_fixed.double(), x_T.double()
    x0 = (xt - (1 - ab[999]).sqrt() * e) / ab[999].sqrt()
    x_600 = ab[600].sqrt() * x0 + (1 - ab[600]).sqrt() * e
    assert torch.allclose(traj.x_t[1].double(), x_600, atol=1e-4)
    x0_600 = (x_600 - (1 - ab[600]).sqrt() * e) / ab[600].sqrt()
    assert torch.allclose(x.double(), x0_600, atol=1e-4)   # last step: alpha_bar_prev = 1


def test_clipping_rederives_eps(linear):
    """With clip_x0, the last DDPM step returns exactly the clipped x0 (alpha_bar_prev = 1)."""
    big = lambda x, t: -10 * torch.ones_like(x)  # noqa: E731  implies x0 far outside [-1, 1]
    x = ddpm_sample(big, linear, (2, 1, 2, 2), generator=torch.Generator().manual_seed(0))
    assert x.abs().max().item() <= 1.0 + 1e-5
    y = ddim_sample(big, linear, (2, 1, 2, 2), steps=10, generator=torch.Generator().manual_seed(0))
    assert y.abs().max().item() <= 1.0 + 1e-5


def test_trajectory(linear):
    model = gaussian_eps_predictor(linear, MU, S)
    x, traj = ddim_sample(model, linear, (2, 1, 3, 3), steps=10, return_trajectory=True)
    assert traj.t == ddim_timesteps(1000, 10) and traj.t[0] == 999 and traj.t[-1] == 0
    assert traj.x_t.shape == (10, 2, 1, 3, 3) and traj.x0_hat.shape == (10, 2, 1, 3, 3)
    assert torch.allclose(traj.x0_hat[-1], x)
    x, traj = ddpm_sample(model, NoiseSchedule.linear(T=50), (2, 1, 3, 3), return_trajectory=True)
    assert traj.t == list(range(49, -1, -1)) and traj.x_t.shape[0] == 50


def test_bad_sampler_arguments(linear):
    model = gaussian_eps_predictor(linear, MU, S)
    with pytest.raises(ValueError, match="sigma"):
        ddpm_sample(model, linear, (1, 1, 2, 2), sigma="large")
    with pytest.raises(ValueError, match="steps"):
        ddim_sample(model, linear, (1, 1, 2, 2), steps=0)
    with pytest.raises(ValueError, match="steps"):
        ddim_sample(model, linear, (1, 1, 2, 2), steps=1001)
    with pytest.raises(ValueError, match="eta"):
        ddim_sample(model, linear, (1, 1, 2, 2), eta=2.0)
    with pytest.raises(ValueError, match="decreasing"):
        ddim_sample(model, linear, (1, 1, 2, 2), timesteps=[5, 10])
    with pytest.raises(ValueError, match="shape"):
        ddpm_sample(model, linear, (1, 0, 2, 2))
    with pytest.raises(ValueError, match="returned shape"):
        ddpm_sample(lambda x, t: x[:, :0], linear, (1, 1, 2, 2))


@pytest.mark.parametrize("sigma", ["beta", "beta_tilde"])
def test_ddpm_adds_noise_of_the_chosen_variance(sigma):
    """T = 2 and a model that predicts eps = 0: x_T = 0 gives x_1 = sigma_2 z, and the last
    (noise-free) step divides by sqrt(alpha_1), so x_0 = sigma_2 z / sqrt(alpha_1) exactly."""
    sched = NoiseSchedule(torch.tensor([0.1, 0.2]))
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    shape = (4, 1, 2, 2)
    x = ddpm_sample(zero, sched, shape, sigma=sigma, clip_x0=False, x_T=torch.zeros(shape),
                    generator=torch.Generator().manual_seed(7))
    z = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    var = {"beta": 0.2, "beta_tilde": (1 - 0.9) / (1 - 0.9 * 0.8) * 0.2}[sigma]
    assert torch.allclose(x, math.sqrt(var) * z / math.sqrt(0.9), atol=1e-6)
