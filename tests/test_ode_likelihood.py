"""The likelihood of the probability-flow ODE's model (ddpm_lib/likelihood.py, chapter 15):
Hutchinson's trace estimator (unbiased, with its variance, on a linear map), the grid, the
ODE log-likelihood on Gaussian data against the closed-form log-density (to 0.02 nats per
dimension at 64 steps, converging at second order), and the two ways of turning it into bits
per dimension of 8-bit images (uniform dequantisation, chapter 3's decoder) against their
closed forms."""
import itertools
import math

import pytest
import torch

from ddpm_lib import NoiseSchedule, likelihood
from ddpm_lib.analytic import gaussian_eps_predictor

f64 = torch.float64
MU, SIGMA = 0.3, 0.5


@pytest.fixture(scope="module")
def linear():
    return NoiseSchedule.linear(T=1000)


def _matrix(D=4, seed=0):
    return torch.randn(D, D, generator=torch.Generator().manual_seed(seed), dtype=f64)


def test_rademacher_probes_are_random_signs():
    z = likelihood.rademacher((20_000,), torch.Generator().manual_seed(0))
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(z.mean().item()) < 5 / math.sqrt(len(z))


def test_hutchinson_is_unbiased_with_its_variance_on_a_linear_map():
    """All 2^D Rademacher probes of f(x) = A x, D = 4: the mean of z^T A z is tr(A) exactly,
    and its variance is 2 (|S|_F^2 - sum_i S_ii^2), S = (A + A^T) / 2 (Hutchinson 1990)."""
    A = _matrix()
    x = torch.randn(1, 4, dtype=f64, requires_grad=True)
    out = x @ A.T
    probes = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=4)), dtype=f64)
    estimates = likelihood.divergence(out, x, probes[:, None, :])[:, 0]      # (16,)
    S = (A + A.T) / 2
    assert estimates.shape == (16,)
    assert torch.isclose(estimates.mean(), A.trace(), rtol=1e-12)
    variance = 2 * ((S**2).sum() - (S.diagonal() ** 2).sum())
    assert torch.isclose(estimates.var(unbiased=False), variance, rtol=1e-12)
    # and the exact mode returns the trace itself
    exact = likelihood.divergence(out, x, None)
    assert exact.shape == (1, 1) and torch.isclose(exact[0, 0], A.trace(), rtol=1e-12)


def test_exact_divergence_of_a_nonlinear_map():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, generator=g, dtype=f64, requires_grad=True)
    out = torch.tanh(x @ _matrix(3).T) * x.sum(1, keepdim=True)
    div = likelihood.divergence(out, x, None)[0]
    for b in range(5):
        J = torch.autograd.functional.jacobian(
            lambda v: torch.tanh(v @ _matrix(3).T) * v.sum(), x[b].detach())
        assert torch.isclose(div[b], J.trace(), rtol=1e-12)


def test_ode_grid(linear):
    for steps in [1, 8, 64, 999]:
        ts = likelihood.ode_timesteps(linear, steps)
        assert len(ts) == steps + 1 and ts[0] == 0 and ts[-1] == 999
        assert all(b > a for a, b in zip(ts[:-1], ts[1:]))
    with pytest.raises(ValueError, match="steps"):
        likelihood.ode_timesteps(linear, 1000)


def _noisy_gaussian(schedule, n, seed, shape=(1, 2, 2)):
    """x at timestep 0 for data N(MU, SIGMA^2 I), and its exact log-density, nats (n,)."""
    g = torch.Generator().manual_seed(seed)
    ab = schedule.float64("alpha_bars")[0]
    x0 = MU + SIGMA * torch.randn((n, *shape), generator=g, dtype=f64)
    x = ab.sqrt() * x0 + (1 - ab).sqrt() * torch.randn((n, *shape), generator=g, dtype=f64)
    v = ab * SIGMA**2 + 1 - ab
    exact = torch.distributions.Normal(ab.sqrt() * MU, v.sqrt()).log_prob(x).flatten(1).sum(1)
    return x, exact


def test_ode_log_likelihood_of_gaussian_data(linear):
    """With the exact eps predictor the ODE carries N(0, I) to (nearly) the data's own noised
    density: log p_0 agrees with the Gaussian's to 0.02 nats per dimension at 64 steps, and
    the error shrinks about four times per doubling of the steps (second order)."""
    eps_model = gaussian_eps_predictor(linear, MU, SIGMA)
    x, exact = _noisy_gaussian(linear, 64, seed=2)
    errors = {}
    for steps in [16, 32, 64]:
        log_p = likelihood.ode_log_likelihood(eps_model, linear, x, steps=steps, probes=None)
        assert log_p.shape == (1, 64)
        errors[steps] = ((log_p[0] - exact).abs().max() / 4).item()
    assert errors[64] < 0.02
    assert errors[16] / errors[32] > 2.8 and errors[32] / errors[64] > 2.8


def _full_covariance_eps(schedule, mu, Sigma):
    """E[eps | x_t] for data N(mu, Sigma) in D = 4 (x (B, 4)): a linear map of x_t whose
    Jacobian is not diagonal, so Hutchinson's estimates vary from probe to probe."""
    def eps_model(x_t, t):
        ab = schedule.at("alpha_bars", t, x_t)[:, :, None]                  # (B, 1, 1)
        cov = ab * Sigma + (1 - ab) * torch.eye(4, dtype=f64)
        centred = (x_t.double() - ab[:, 0].sqrt() * mu)[..., None]
        return ((1 - ab).sqrt() * torch.linalg.solve(cov, centred))[..., 0].to(x_t.dtype)
    return eps_model


def test_hutchinson_along_the_ode_is_unbiased(linear):
    """For data N(mu, Sigma) with a full covariance, the mean of 400 probes' estimates lies
    within 5 standard errors of the exact-trace value, which matches the closed form."""
    L = torch.tensor([[1.0, 0, 0, 0], [0.6, 0.5, 0, 0], [-0.3, 0.2, 0.4, 0], [0.1, 0.3, -0.2, 0.7]],
                     dtype=f64)
    Sigma, mu = 0.3 * L @ L.T, torch.tensor([0.2, -0.1, 0.4, 0.0], dtype=f64)
    eps_model = _full_covariance_eps(linear, mu, Sigma)
    ab = linear.float64("alpha_bars")[0]
    g = torch.Generator().manual_seed(3)
    x0 = mu + torch.randn(6, 4, generator=g, dtype=f64) @ torch.linalg.cholesky(Sigma).T
    x = ab.sqrt() * x0 + (1 - ab).sqrt() * torch.randn(6, 4, generator=g, dtype=f64)
    exact_trace = likelihood.ode_log_likelihood(eps_model, linear, x, steps=64, probes=None)[0]
    closed = torch.distributions.MultivariateNormal(
        ab.sqrt() * mu, ab * Sigma + (1 - ab) * torch.eye(4, dtype=f64)).log_prob(x)
    assert ((exact_trace - closed).abs() / 4).max() < 0.02
    probes = likelihood.ode_log_likelihood(eps_model, linear, x, steps=64, probes=400,
                                           generator=g)
    assert probes.shape == (400, 6) and (probes.std(0) > 0.01).all()   # a real variance
    z = (probes.mean(0) - exact_trace) / (probes.std(0) / math.sqrt(400))
    assert z.abs().max() < 5


def _eight_bit(n, seed, shape=(1, 2, 2)):
    g = torch.Generator().manual_seed(seed)
    x = (MU + SIGMA * torch.randn((n, *shape), generator=g, dtype=f64)).clamp(-1, 1)
    return ((x + 1) * 127.5).round() / 127.5 - 1


def test_bits_with_uniform_dequantisation_match_the_closed_form(linear):
    """Data N(MU, SIGMA^2) quantised to 8 bits, exact eps. The model's density of y = x0 + u is
    N(MU, SIGMA^2 + rho_0^2); averaged over the uniform u in the bin,
    -log p(y) = 1/2 log(2 pi v) + ((x0 - MU)^2 + h^2 / 3) / (2 v) per value, h = 1/255, and
    bits = that / ln 2 + log2(127.5). Mean over 500 images within 5 standard errors + 1e-3."""
    eps_model = gaussian_eps_predictor(linear, MU, SIGMA)
    x0 = _eight_bit(500, seed=4)
    out = likelihood.ode_bits_per_dim(eps_model, linear, x0, steps=128, probes=None,
                                      batch_size=500, generator=torch.Generator().manual_seed(5))
    assert out.per_probe.shape == (500, 1) and (out.decoder == 0).all()
    ab0 = linear.float64("alpha_bars")[0].item()
    v = SIGMA**2 + (1 - ab0) / ab0
    h = 1 / 255
    nats = 0.5 * math.log(2 * math.pi * v) + ((x0 - MU) ** 2 + h**2 / 3) / (2 * v)
    expected = nats.flatten(1).mean(1) / math.log(2) + math.log2(127.5)
    diff = out.total - expected
    assert abs(diff.mean()) < 5 * diff.std() / math.sqrt(500) + 1e-3


def test_uniform_dequantisation_counts_the_scaling_and_the_bin():
    """On a schedule with alpha_bar_0 = 0.98, where the Jacobian alpha_bar_0^(D/2) of
    x = sqrt(alpha_bar_0) y is 0.015 bits per value: the bits are exactly
    -[log p_0(sqrt(alpha_bar_0) y) + D/2 log alpha_bar_0] / (D ln 2) + log2(127.5), y the
    dequantised image (the generator's first draw), with the probes drawn after it."""
    schedule = NoiseSchedule(torch.full((1000,), 0.02, dtype=f64))
    eps_model = gaussian_eps_predictor(schedule, MU, SIGMA)
    x0 = _eight_bit(8, seed=8)
    out = likelihood.ode_bits_per_dim(eps_model, schedule, x0, steps=16, probes=3,
                                      generator=torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    y = x0 + (2 * torch.rand(x0.shape, generator=g, dtype=f64) - 1) / 255
    ab0 = 0.98
    log_p = likelihood.ode_log_likelihood(eps_model, schedule, math.sqrt(ab0) * y, steps=16,
                                          probes=3, generator=g)
    expected = -(log_p + 2 * math.log(ab0)) / (4 * math.log(2)) + math.log2(127.5)
    assert out.per_probe.shape == (8, 3)
    assert torch.allclose(out.per_probe, expected.T, rtol=0, atol=1e-9)


def test_bits_with_the_decoder_match_the_closed_form(linear):
    """With chapter 3's decoder: bits - decoder part = [log q(x_1 | x0) - log p_0(x_1)] / (D ln 2),
    whose mean over x_1 ~ q is the KL between N(sqrt(ab) x0, (1 - ab) I) and the Gaussian
    p_0 = N(sqrt(ab) MU, (ab SIGMA^2 + 1 - ab) I). The decoder part is chapter 3's L_0."""
    eps_model = gaussian_eps_predictor(linear, MU, SIGMA)
    x0 = _eight_bit(400, seed=6)
    out = likelihood.ode_bits_per_dim(eps_model, linear, x0, steps=128, probes=None,
                                      dequantize="decoder", batch_size=400,
                                      generator=torch.Generator().manual_seed(7))
    ab = linear.float64("alpha_bars")[0].item()
    v = ab * SIGMA**2 + 1 - ab
    kl = 0.5 * (math.log(v / (1 - ab)) + ((1 - ab) + ab * (x0 - MU) ** 2) / v - 1)
    expected = kl.flatten(1).mean(1) / math.log(2)
    diff = out.total - out.decoder - expected
    assert abs(diff.mean()) < 5 * diff.std() / math.sqrt(400) + 2e-3
    # the decoder part: chapter 3's L_0 for the same noise (the first draw of the generator)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7), dtype=f64)
    L0 = likelihood.elbo_terms(eps_model, linear, x0, torch.zeros(400, dtype=torch.long), eps)
    assert torch.allclose(out.decoder, L0 / (4 * math.log(2)), rtol=1e-9)


def test_summary_separates_the_probes_noise():
    per_probe = torch.tensor([[1.0, 1.2], [2.0, 2.2], [3.0, 2.8]], dtype=f64)
    s = likelihood.ODEBits(per_probe, torch.zeros(3, dtype=f64)).summary()
    assert s["bits_per_dim"] == pytest.approx(2.0333333333)
    assert s["standard_error"] == pytest.approx(torch.tensor([1.1, 2.1, 2.9]).std().item() / math.sqrt(3))
    assert s["probe_standard_error"] == pytest.approx(math.sqrt(0.02 / 6))
    assert s["n_images"] == 3 and s["probes"] == 2


def test_ode_bits_refuses_what_it_cannot_score(linear):
    eps_model = gaussian_eps_predictor(linear, MU, SIGMA)
    with pytest.raises(ValueError, match="8-bit"):
        likelihood.ode_bits_per_dim(eps_model, linear, torch.full((2, 1, 2, 2), 0.001))
    with pytest.raises(ValueError, match="dequantize"):
        likelihood.ode_bits_per_dim(eps_model, linear, _eight_bit(2, 0), dequantize="gauss")
