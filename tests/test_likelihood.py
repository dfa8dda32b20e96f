"""The likelihood bound (ddpm_lib.likelihood): each term against its closed form."""
import math

import pytest
import torch

from conftest import tiny_unet
from ddpm_lib import NoiseSchedule, analytic, diffusion, likelihood

PIXELS = torch.arange(256, dtype=torch.float64) / 127.5 - 1     # the 256 values of an 8-bit pixel


@pytest.mark.parametrize("mean", [-1.3, -0.2, 0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("std", [1e-3, 0.01, 0.3, 3.0])
def test_discrete_decoder_is_a_distribution_over_the_256_values(mean, std):
    logp = likelihood.discrete_gaussian_log_likelihood(PIXELS, torch.tensor(mean, dtype=torch.float64), std)
    assert torch.isfinite(logp).all()
    assert abs(torch.logsumexp(logp, 0).item()) < 1e-9


def test_discrete_decoder_bins_by_hand():
    # erfc keeps its relative precision in the tails, where 1 + erf(z) cancels
    phi = lambda z: 0.5 * math.erfc(-z / math.sqrt(2))           # noqa: E731
    phi_above = lambda z: 0.5 * math.erfc(z / math.sqrt(2))      # noqa: E731  1 - Phi(z)
    mean, std = 0.1, 0.2
    for k in (0, 17, 128, 255):
        x = k / 127.5 - 1
        lo = -math.inf if k == 0 else (x - 1 / 255 - mean) / std
        hi = math.inf if k == 255 else (x + 1 / 255 - mean) / std
        p = phi(hi) if k == 0 else phi_above(lo) if k == 255 else phi(hi) - phi(lo)
        got = likelihood.discrete_gaussian_log_likelihood(
            torch.tensor(x, dtype=torch.float64), torch.tensor(mean, dtype=torch.float64), std)
        assert got.item() == pytest.approx(math.log(p), rel=1e-9)


def test_discrete_decoder_far_tail_stays_finite():
    """About 50 standard deviations away on either side: log Phi(-z) ~ -z^2/2 - log(z sqrt(2 pi))."""
    x = torch.tensor(128 / 127.5 - 1, dtype=torch.float64)      # a pixel value near 0
    for mean in (x + 0.5, x - 0.5):
        logp = likelihood.discrete_gaussian_log_likelihood(x, mean, 0.01)
        z_near = (0.5 - 1 / 255) / 0.01
        tail = -0.5 * z_near ** 2 - math.log(z_near * math.sqrt(2 * math.pi))
        assert logp.item() == pytest.approx(tail, abs=0.05)


def test_prior_kl_closed_form():
    schedule = NoiseSchedule.linear(T=100)
    x0 = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    a = schedule.float64("alpha_bars")[-1]
    expected = (0.5 * (a * x0.double() ** 2 + (1 - a) - 1 - torch.log(1 - a))).flatten(1).sum(1)
    assert torch.allclose(likelihood.prior_kl(schedule, x0), expected, rtol=1e-12)


def test_kl_terms_equal_the_weighted_eps_error_when_sigma_is_beta_tilde():
    """With sigma_t^2 = beta_tilde_t, L_t = lambda_t ||eps - eps_theta||^2 (Chapter 3)."""
    schedule = NoiseSchedule.linear(T=50)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(6, 1, 3, 3, generator=gen, dtype=torch.float64) * 2 - 1
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    model = lambda x_t, t: 0.3 * x_t + 0.01 * t.double()[:, None, None, None]   # noqa: E731
    t = torch.tensor([1, 2, 5, 20, 40, 49])
    got = likelihood.elbo_terms(model, schedule, x0, t, eps, sigma="beta_tilde")
    x_t, _ = schedule.q_sample(x0, t, eps)
    beta, ab = schedule.float64("betas")[t], schedule.float64("alpha_bars")[t]
    lam = diffusion.elbo_weight(beta, ab, schedule.float64("beta_tilde")[t])
    expected = lam * ((eps - model(x_t, t)) ** 2).flatten(1).sum(1)
    assert torch.allclose(got, expected, rtol=1e-9)


@pytest.mark.parametrize("sigma", ["beta", "beta_tilde"])
def test_kl_terms_on_gaussian_data_match_their_closed_form(sigma):
    """x0 ~ N(mu, s^2) with the exact eps predictor: the mean of L_t over data and noise is
    D [ (c^2 Var(x0 | x_t) + beta_tilde) / (2 sigma^2) + log(sigma / sqrt(beta_tilde)) - 1/2 ],
    c = sqrt(alpha_bar_prev) beta / (1 - alpha_bar), Var(x0 | x_t) = s^2 (1 - ab) / (ab s^2 + 1 - ab)."""
    mu, s, T, n, D = 0.2, 0.5, 100, 20_000, 4
    schedule = NoiseSchedule.linear(T=T, beta_end=0.2)
    model = analytic.gaussian_eps_predictor(schedule, mu, s)
    gen = torch.Generator().manual_seed(2)
    for t_index in (1, 10, 60):
        x0 = mu + s * torch.randn(n, 1, 1, D, generator=gen, dtype=torch.float64)
        eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
        terms = likelihood.elbo_terms(model, schedule, x0, torch.full((n,), t_index), eps, sigma)
        beta = schedule.float64("betas")[t_index]
        ab, ab_prev = schedule.float64("alpha_bars")[t_index], schedule.float64("alpha_bars_prev")[t_index]
        beta_tilde = schedule.float64("beta_tilde")[t_index]
        var = beta if sigma == "beta" else beta_tilde
        c = ab_prev.sqrt() * beta / (1 - ab)
        var_x0 = s ** 2 * (1 - ab) / (ab * s ** 2 + 1 - ab)
        expected = D * ((c ** 2 * var_x0 + beta_tilde) / (2 * var) + 0.5 * torch.log(var / beta_tilde) - 0.5)
        se = terms.std() / math.sqrt(n)
        assert abs(terms.mean() - expected) < 4 * se + 1e-12, (t_index, terms.mean(), expected, se)


def test_stratified_estimate_is_unbiased():
    """Averaged over draws, the stratified sum equals the full sum over t = 1..T-1."""
    schedule = NoiseSchedule.linear(T=40, beta_end=0.3)
    model = analytic.gaussian_eps_predictor(schedule, 0.0, 0.5)
    gen = torch.Generator().manual_seed(3)
    x0 = (torch.randint(0, 256, (1, 1, 2, 2), generator=gen).double() / 127.5 - 1).expand(4000, 1, 2, 2)
    x0 = x0.contiguous()
    full = likelihood.nll_bound(model, schedule, x0, generator=gen, batch_size=4000)
    strat = likelihood.nll_bound(model, schedule, x0, num_timesteps=3, generator=gen, batch_size=4000)
    se = math.sqrt(full.diffusion.var() / 4000 + strat.diffusion.var() / 4000)
    assert abs(full.diffusion.mean() - strat.diffusion.mean()) < 4 * se
    t, sizes = likelihood._stratified_timesteps(40, 3, 1000, gen)
    assert sizes.sum() == 39 and t.min() >= 1 and t.max() <= 39
    assert set(t.flatten().tolist()) == set(range(1, 40))


def test_nll_bound_rejects_what_it_cannot_bound():
    schedule = NoiseSchedule.linear(T=10)
    model = analytic.gaussian_eps_predictor(schedule, 0.0, 0.5)
    with pytest.raises(ValueError, match="8-bit"):
        likelihood.nll_bound(model, schedule, torch.full((2, 1, 2, 2), 0.1234))
    good = torch.zeros(2, 1, 2, 2) + 1 / 127.5 - 1
    with pytest.raises(ValueError, match="num_timesteps"):
        likelihood.nll_bound(model, schedule, good, num_timesteps=0)
    with pytest.raises(ValueError, match="sigma"):
        likelihood.nll_bound(model, schedule, good, sigma="beta_hat")
    summary = likelihood.nll_bound(model, schedule, good).summary()
    assert summary["n_images"] == 2 and math.isfinite(summary["bits_per_dim"])


def test_decoder_term_uses_the_predicted_clean_image():
    """At the first step the reverse mean is x0_hat = (x_1 - sqrt(1 - alpha_bar_1) eps_theta) / sqrt(alpha_bar_1):
    L_0 is the discrete likelihood of x0 around it, with sigma_1^2 = beta_1."""
    schedule = NoiseSchedule.linear(T=20)
    gen = torch.Generator().manual_seed(4)
    x0 = torch.randint(0, 256, (5, 1, 3, 3), generator=gen).double() / 127.5 - 1
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    model = lambda x_t, t: 0.7 * x_t - 0.1                                      # noqa: E731
    got = likelihood.elbo_terms(model, schedule, x0, torch.zeros(5, dtype=torch.long), eps)
    ab, beta = schedule.float64("alpha_bars")[0], schedule.float64("betas")[0]
    x1 = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    x0_hat = diffusion.x0_from_eps(x1, ab, model(x1, None))
    expected = -likelihood.discrete_gaussian_log_likelihood(x0, x0_hat, beta.sqrt()).flatten(1).sum(1)
    assert torch.allclose(got, expected, rtol=1e-9)


def test_nll_bound_of_a_float32_unet():
    """A real network takes float32 input: the bound must feed it x_t in the images' dtype."""
    model = tiny_unet(image_size=8).eval()
    schedule = NoiseSchedule.linear(T=20)
    x0 = torch.randint(0, 256, (3, 1, 8, 8), generator=torch.Generator().manual_seed(5)) / 127.5 - 1
    bound = likelihood.nll_bound(model, schedule, x0.float(), num_timesteps=4,
                                 generator=torch.Generator().manual_seed(6))
    assert bound.total.shape == (3,) and torch.isfinite(bound.total).all()
