"""The posterior, the reverse mean, the ELBO's KL terms and L_simple."""
import math

import pytest
import torch

from ddpm_lib import NoiseSchedule, diffusion
from ddpm_lib.analytic import gaussian_eps_predictor
from ddpm_lib.train import loss_simple


def gaussian_conditioning(x0, x_t, t, sched):
    """q(x_{t-1} | x_t, x0) by conditioning the joint Gaussian of (x_{t-1}, x_t) given x0,
    built only from the definitions: x_{t-1} ~ q(x_{t-1}|x0), x_t = sqrt(alpha) x_{t-1} + sqrt(beta) e.
    Independent of ddpm_lib.diffusion's closed-form posterior."""
    beta = sched.float64("betas")[t].item()
    abp = sched.float64("alpha_bars_prev")[t].item()
    alpha = 1 - beta
    m_prev = math.sqrt(abp) * x0                      # E[x_{t-1} | x0]
    v_prev = 1 - abp                                  # Var[x_{t-1} | x0]
    m_t = math.sqrt(alpha) * m_prev                   # E[x_t | x0]
    cov = torch.tensor([[v_prev, math.sqrt(alpha) * v_prev],
                        [math.sqrt(alpha) * v_prev, alpha * v_prev + beta]], dtype=torch.float64)
    gain = cov[0, 1] / cov[1, 1]
    return m_prev + gain * (x_t - m_t), cov[0, 0] - gain * cov[1, 0]


@pytest.mark.parametrize("t", [1, 2, 10, 250, 600, 999])
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_posterior_matches_gaussian_conditioning(t, kind):
    sched = getattr(NoiseSchedule, kind)()
    g = torch.Generator().manual_seed(t)
    x0 = torch.rand(3, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    x_t = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    mean, var = sched.posterior(x0.float(), x_t.float(), t)
    ref_mean, ref_var = gaussian_conditioning(x0, x_t, t, sched)
    assert torch.allclose(mean.double(), ref_mean, atol=2e-5)
    assert var.shape == (3, 1, 1, 1)
    assert torch.allclose(var.double().flatten(), torch.full((3,), ref_var.item(), dtype=torch.float64), rtol=1e-5)


def test_posterior_at_t0_returns_x0(linear):
    x0 = torch.rand(2, 1, 3, 3) * 2 - 1
    x_t, _ = linear.q_sample(x0, 0)
    mean, var = linear.posterior(x0, x_t, 0)
    assert torch.allclose(mean, x0, atol=1e-6) and (var == 0).all()


def test_posterior_by_monte_carlo(linear):
    """Sample (x0 fixed, x_{t-1}, x_t) forward, keep pairs with x_t near a value, compare."""
    g = torch.Generator().manual_seed(3)
    t, n, x0 = 300, 400_000, 0.5
    x_prev, _ = linear.q_sample(torch.full((n, 1), x0), t - 1, generator=g)
    x_t = linear.q_step(x_prev, t, generator=g)
    near = (x_t - 0.2).abs() < 0.01
    mean, var = linear.posterior(torch.full((1, 1), x0), torch.full((1, 1), 0.2), t)
    sel = x_prev[near].double()
    assert sel.numel() > 1000
    assert sel.mean().item() == pytest.approx(mean.item(), abs=5 * math.sqrt(var.item() / sel.numel()) + 2e-4)
    assert sel.var().item() == pytest.approx(var.item(), rel=0.1)


def test_reverse_mean_from_eps_is_posterior_mean_at_predicted_x0(linear, gen):
    x0 = torch.rand(4, 1, 6, 6, generator=gen) * 2 - 1
    t = torch.tensor([1, 40, 400, 900])
    x_t, eps = linear.q_sample(x0, t, generator=gen)
    eps_theta = eps + 0.3 * torch.randn(eps.shape, generator=gen)
    beta, ab = linear.at("betas", t, x_t), linear.at("alpha_bars", t, x_t)
    mu = diffusion.reverse_mean_from_eps(x_t.double(), eps_theta.double(), beta, ab).float()
    mu_post, _ = linear.posterior(linear.predict_x0(x_t, t, eps_theta), x_t, t)
    assert torch.allclose(mu, mu_post, atol=1e-4)


def test_gaussian_kl_closed_form():
    m1, v1, m2, v2 = (torch.tensor(x, dtype=torch.float64) for x in (0.3, 0.5, -0.2, 1.7))
    # direct integral of p log p/q by quadrature
    x = torch.linspace(-12, 12, 200001, dtype=torch.float64)
    p = torch.exp(-(x - m1) ** 2 / (2 * v1)) / torch.sqrt(2 * math.pi * v1)
    log_ratio = -0.5 * torch.log(v1 / v2) - (x - m1) ** 2 / (2 * v1) + (x - m2) ** 2 / (2 * v2)
    integral = torch.trapezoid(p * log_ratio, x)
    assert diffusion.gaussian_kl(m1, v1, m2, v2).item() == pytest.approx(integral.item(), rel=1e-8)
    assert diffusion.gaussian_kl(m1, v1, m1, v1).item() == 0.0


@pytest.mark.parametrize("t", [1, 100, 500, 999])
@pytest.mark.parametrize("sigma", ["beta", "beta_tilde"])
def test_kl_term_is_weighted_eps_mse(linear, t, sigma):
    """L_{t-1} = KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) = lambda_t ||eps - eps_theta||^2
    when p has variance sigma_t^2 and its mean uses eps_theta (q's variance set to sigma_t^2 too)."""
    g = torch.Generator().manual_seed(t)
    x0 = torch.rand(2, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    eps_theta = eps + 0.1 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    b = linear.float64("betas")[t]
    ab = linear.float64("alpha_bars")[t]
    abp = linear.float64("alpha_bars_prev")[t]
    s2 = linear.float64("betas" if sigma == "beta" else "beta_tilde")[t]
    x_t = diffusion.q_sample(x0, ab, eps)
    mu_q = diffusion.posterior_mean(x0, x_t, b, ab, abp)
    mu_p = diffusion.reverse_mean_from_eps(x_t, eps_theta, b, ab)
    kl = diffusion.gaussian_kl(mu_q, s2, mu_p, s2).sum()
    weighted = diffusion.elbo_weight(b, ab, s2) * ((eps - eps_theta) ** 2).sum()
    assert kl.item() == pytest.approx(weighted.item(), rel=1e-9)


def test_loss_simple_is_eps_mse(linear, gen):
    x0 = torch.rand(3, 1, 4, 4, generator=gen) * 2 - 1
    t = torch.tensor([5, 50, 500])
    eps = torch.randn(x0.shape, generator=gen)
    seen = {}

    def model(x_t, tt):
        seen["x_t"], seen["t"] = x_t, tt
        return torch.zeros_like(x_t)

    per_image = loss_simple(model, linear, x0, t, eps, reduction="none")
    assert torch.allclose(per_image, (eps ** 2).flatten(1).mean(1))
    assert torch.allclose(seen["x_t"], linear.q_sample(x0, t, eps)[0]) and torch.equal(seen["t"], t)
    # the library averages in float32 (per image, then over images): against the float64 mean,
    # rounding of up to ~n float32 ulps, whatever the order of the sums (SIMD width, threads)
    exact = (eps.double() ** 2).mean().item()
    assert loss_simple(model, linear, x0, t, eps).item() == pytest.approx(exact, rel=1e-5)
    with pytest.raises(ValueError):
        loss_simple(model, linear, x0, t, eps, reduction="sum")


def test_gaussian_eps_predictor_is_conditional_expectation(linear):
    """E[eps | x_t] by regression on samples agrees with the closed form."""
    g = torch.Generator().manual_seed(0)
    mu, sigma_data, t, n = 0.4, 0.3, 200, 200_000
    x0 = mu + sigma_data * torch.randn(n, 1, generator=g, dtype=torch.float64)
    x_t, eps = linear.q_sample(x0.float(), t, generator=g)
    slope = torch.cov(torch.stack([x_t.flatten().double(), eps.flatten().double()]))
    slope = slope[0, 1] / slope[0, 0]
    model = gaussian_eps_predictor(linear, mu, sigma_data)
    pred = model(torch.tensor([[0.0], [1.0]]), torch.tensor([t, t]))
    assert (pred[1] - pred[0]).item() == pytest.approx(slope.item(), rel=0.02)
    with pytest.raises(ValueError):
        gaussian_eps_predictor(linear, 0.0, 0.0)


def test_loss_simple_refuses_a_model_output_of_another_shape(linear, gen):
    """F.mse_loss would broadcast (B, 1, 1, 1) against (B, C, H, W) with only a warning."""
    x0 = torch.rand(3, 1, 4, 4, generator=gen) * 2 - 1
    t, eps = torch.tensor([5, 50, 500]), torch.randn(3, 1, 4, 4, generator=gen)
    with pytest.raises(ValueError, match=r"eps shaped like x_t, \(3, 1, 4, 4\); got \(3, 1, 1, 1"):
        loss_simple(lambda x_t, tt: x_t.mean((2, 3), keepdim=True), linear, x0, t, eps)
    with pytest.raises(ValueError, match="eps .the noise added to x0. must be a tensor"):
        loss_simple(lambda x_t, tt: x_t, linear, x0, t, None)
    with pytest.raises(ValueError, match="standard deviation sigma_data must be a finite real number"):
        gaussian_eps_predictor(linear, 0.0, "0.5")


def test_gaussian_mixture_eps_predictor_is_the_posterior_mean_of_eps():
    """E[eps | x_t] of a two-component mixture in 1-D, by quadrature over x0, against the
    closed form; one component reduces to gaussian_eps_predictor; the score relation."""
    import math
    from ddpm_lib import NoiseSchedule
    from ddpm_lib.analytic import gaussian_mixture_eps_predictor
    schedule = NoiseSchedule.linear(T=1000)
    means, stds, weights = [-0.6, 0.5], [0.15, 0.3], [0.3, 0.7]
    mixture = gaussian_mixture_eps_predictor(schedule, means, stds, weights)
    x0 = torch.linspace(-4, 4, 200_001, dtype=torch.float64)
    dx = (x0[1] - x0[0]).item()
    prior = sum(w / (s * math.sqrt(2 * math.pi)) * torch.exp(-0.5 * ((x0 - m) / s) ** 2)
                for m, s, w in zip(means, stds, weights))
    for t in (0, 100, 500, 999):
        ab = schedule.float64("alpha_bars")[t].item()
        for x_t in (-1.0, 0.1, 0.8):
            eps_of_x0 = (x_t - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
            joint = prior * torch.exp(-0.5 * eps_of_x0 ** 2) * dx        # p(x0) q(x_t | x0), up to a constant
            by_quadrature = ((eps_of_x0 * joint).sum() / joint.sum()).item()
            got = mixture(torch.tensor([[x_t]], dtype=torch.float64), torch.tensor([t])).item()
            assert got == pytest.approx(by_quadrature, rel=1e-6, abs=1e-9), (t, x_t)
    single = gaussian_mixture_eps_predictor(schedule, [0.3], [0.5])
    x = torch.linspace(-2, 2, 9, dtype=torch.float64)[:, None]
    t = torch.full((9,), 300)
    assert torch.allclose(single(x, t), gaussian_eps_predictor(schedule, 0.3, 0.5)(x, t), rtol=1e-12)
    with pytest.raises(ValueError, match="shape"):
        mixture(torch.zeros(2, 3, dtype=torch.float64), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="positive"):
        gaussian_mixture_eps_predictor(schedule, [0.0], [0.0])
