"""What the network predicts and how timesteps are weighted (ddpm_lib/objectives.py), and flow
matching on the straight path (ddpm_lib/flow.py): each target's formula, that the three VP
targets describe the same sampler, min-SNR's closed form, the flow path and its exact velocity
as the MSE optimum, the flow ODE sampler's accuracy and order, and training with each target."""
import math

import numpy as np
import pytest
import torch

from ddpm_lib import NoiseSchedule, diffusion, flow, objectives
from ddpm_lib.analytic import gaussian_eps_predictor
from ddpm_lib.samplers import sample
from ddpm_lib.train import TrainConfig, train

MU, SIGMA = 0.3, 0.6


@pytest.fixture
def linear():
    return NoiseSchedule.linear(T=1000)


def _batch(seed=0, n=4096, shape=(1, 2, 2)):
    g = torch.Generator().manual_seed(seed)
    x0 = MU + SIGMA * torch.randn((n, *shape), generator=g, dtype=torch.float64)
    eps = torch.randn((n, *shape), generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (n,), generator=g)
    return x0.float(), t, eps.float()


def test_each_target_is_its_formula(linear):
    x0, t, eps = _batch(n=8)
    ab = linear.float64("alpha_bars")[t].view(-1, 1, 1, 1)
    for prediction, expected in [("eps", eps), ("x0", x0),
                                 ("v", ab.sqrt() * eps - (1 - ab).sqrt() * x0)]:
        x_t, target = objectives.noisy_and_target(linear, x0, t, eps, prediction)
        assert torch.allclose(x_t.double(), ab.sqrt() * x0 + (1 - ab).sqrt() * eps, atol=1e-6)
        assert torch.allclose(target.double(), expected.double(), atol=1e-6), prediction
    x_s, target = objectives.noisy_and_target(linear, x0, t, eps, "flow")
    s = ((t.double() + 1) / 1000).view(-1, 1, 1, 1)
    assert torch.allclose(x_s.double(), (1 - s) * x0 + s * eps, atol=1e-6)
    assert torch.equal(target, eps - x0)


def test_the_three_vp_targets_give_the_same_sample(linear):
    """The exact eps-predictor of Gaussian data, rewritten as an x0- and a v-predictor with
    the schedule's conversions, drives DDIM to the same samples (float32 rounding)."""
    eps_model = gaussian_eps_predictor(linear, MU, SIGMA)
    models = {"eps": eps_model,
              "x0": lambda x, t: linear.predict_x0(x, t, eps_model(x, t)),
              "v": lambda x, t: linear.velocity(linear.predict_x0(x, t, eps_model(x, t)), t,
                                                eps_model(x, t))}
    x_T = torch.randn(256, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    out = {p: sample(m, linear, x_T.shape, sampler="ddim", steps=50, x_T=x_T, prediction=p,
                     clip_x0=False) for p, m in models.items()}
    for p in ("x0", "v"):
        assert (out[p] - out["eps"]).abs().max() < 1e-4, p
    assert abs(out["eps"].mean() - MU) < 0.05 and abs(out["eps"].std() - SIGMA) < 0.05


def test_min_snr_weights_have_their_closed_form(linear):
    t = torch.tensor([0, 100, 300, 600, 999])
    snr = linear.float64("alpha_bars")[t] / (1 - linear.float64("alpha_bars")[t])
    gamma = 5.0
    clamp = torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64))
    expected = {"eps": clamp / snr, "x0": clamp, "v": clamp / (snr + 1)}
    for prediction, w in expected.items():
        got = objectives.loss_weights(linear, t, prediction, "min_snr", gamma).double()
        assert torch.allclose(got, w, rtol=1e-5), prediction
    assert objectives.loss_weights(linear, t, "eps", "uniform") is None
    # high noise (SNR < gamma) keeps eps-weight 1; low noise is down-weighted to gamma / SNR
    w = objectives.loss_weights(linear, t, "eps", "min_snr", gamma)
    assert w[-1] == pytest.approx(1.0) and w[0] == pytest.approx(gamma / snr[0].item(), rel=1e-5)


def test_weighted_loss_is_the_weighted_mean_of_squared_errors(linear):
    x0, t, eps = _batch(n=16)
    model = lambda x, tt: 0.5 * x                                  # noqa: E731
    for prediction in ("eps", "x0", "v"):
        x_t, target = objectives.noisy_and_target(linear, x0, t, eps, prediction)
        per = ((0.5 * x_t - target) ** 2).flatten(1).mean(1)
        w = objectives.loss_weights(linear, t, prediction, "min_snr", 5.0)
        got = objectives.diffusion_loss(model, linear, x0, t, eps, prediction=prediction,
                                        weighting="min_snr", reduction="none")
        assert torch.allclose(got, per * w, rtol=1e-5), prediction


def test_bad_objectives_are_refused():
    with pytest.raises(ValueError, match="prediction must be one of eps, x0, v, flow"):
        TrainConfig(prediction="score")
    with pytest.raises(ValueError, match="weighting must be one of uniform, min_snr, elbo"):
        TrainConfig(weighting="elbo-ish")
    with pytest.raises(ValueError, match="flow matching trains with weighting='uniform'"):
        TrainConfig(prediction="flow", weighting="min_snr")
    with pytest.raises(ValueError, match="snr_gamma must be positive"):
        TrainConfig(weighting="min_snr", snr_gamma=0)


def test_the_exact_velocity_is_the_mse_optimum():
    """v(x, s) = E[eps - x0 | x_s = x]: on the straight path its squared error equals the
    closed-form irreducible error, and any perturbation of it does worse."""
    T = 1000
    v_exact = flow.gaussian_velocity(T, MU, SIGMA)
    x0, t, eps = _batch(seed=3, n=200_000, shape=(1,))
    x_s, target = objectives.noisy_and_target(NoiseSchedule.linear(T), x0, t, eps, "flow")
    v = v_exact(x_s, t)
    mse = ((v - target) ** 2).mean().item()
    s = (t.double() + 1) / T
    var = (1 - s) ** 2 * SIGMA**2 + s**2
    # Var(eps - x0 | x_s) = Var(eps - x0) - Cov^2 / Var(x_s), with Var(eps - x0) = 1 + SIGMA^2
    # and Cov(eps - x0, x_s) = s - (1 - s) SIGMA^2
    irreducible = (1 + SIGMA**2 - (s - (1 - s) * SIGMA**2) ** 2 / var).mean().item()
    se = ((v - target) ** 2).std().item() / math.sqrt(len(t))
    assert abs(mse - irreducible) < 5 * se, (mse, irreducible, se)
    for delta in (lambda x: 0.05, lambda x: 0.05 * x):
        worse = ((v + delta(x_s) - target) ** 2).mean().item()
        assert worse > mse


def test_velocity_conversions_recover_x0_and_eps():
    x0, t, eps = _batch(n=8)
    s = ((t.float() + 1) / 1000).view(-1, 1, 1, 1)
    x_s = (1 - s) * x0 + s * eps
    v = eps - x0
    assert torch.allclose(flow.x0_from_velocity(x_s, s, v), x0, atol=1e-5)
    assert torch.allclose(flow.eps_from_velocity(x_s, s, v), eps, atol=1e-5)


def _exact_endpoint(z):
    return MU + SIGMA * z          # the exact flow maps x_1 = z to mu + sigma z


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_flow_sampler_reaches_the_data(method):
    T = 1000
    x_T = torch.randn(20_000, 1, 1, 1, generator=torch.Generator().manual_seed(4))
    x = flow.flow_sample(flow.gaussian_velocity(T, MU, SIGMA), x_T.shape, T=T, steps=50,
                         method=method, x_T=x_T)
    se_mean, se_std = SIGMA / math.sqrt(len(x)), SIGMA / math.sqrt(2 * len(x))
    # the discretisation error at 50 steps, measured: Euler's samples are 3% too narrow
    # (std 0.580 for 0.6), Heun's within 0.1%; allowed: a little more, plus 5 standard errors
    bias = {"euler": 0.03, "heun": 0.003}[method]
    assert abs(x.mean().item() - MU) < 5 * se_mean + bias
    assert abs(x.std().item() - SIGMA) < 5 * se_std + bias
    # each sample lands near where the exact flow takes its noise
    assert (x - _exact_endpoint(x_T)).abs().max() < {"euler": 0.1, "heun": 0.001}[method]


def test_flow_sampler_convergence_order():
    """Error at s = 0 against the exact map, on a log-log plot against the number of steps:
    slope 1 for Euler, 2 for Heun (measured 1.02 and 1.85 here)."""
    T = 10_000                       # a fine timestep lattice, so grids are nearly even in s
    model = flow.gaussian_velocity(T, MU, SIGMA)
    z = torch.linspace(-2.5, 2.5, 11, dtype=torch.float32).view(-1, 1, 1, 1)
    steps = [8, 16, 32, 64]
    slopes = {}
    for method in ("euler", "heun"):
        errors = [(flow.flow_sample(model, z.shape, T=T, steps=k, method=method, x_T=z)
                   - _exact_endpoint(z)).abs().max().item() for k in steps]
        slopes[method] = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert abs(slopes["euler"] - 1) < 0.25, slopes
    assert abs(slopes["heun"] - 2) < 0.4, slopes


def test_flow_sampler_refuses_bad_input():
    model = flow.gaussian_velocity(10, MU, SIGMA)
    with pytest.raises(ValueError, match="method must be one of euler, heun"):
        flow.flow_sample(model, (1, 1, 1, 1), T=10, method="rk4")
    with pytest.raises(ValueError, match="x_T has shape"):
        flow.flow_sample(model, (2, 1, 1, 1), T=10, steps=5, x_T=torch.zeros(1, 1, 1, 1))


@pytest.mark.parametrize("prediction", ["x0", "v", "flow"])
def test_training_with_each_target_lowers_its_loss(prediction):
    """A tiny network on a few images: the loss of the chosen target falls, and a resumed run
    must keep the target it started with."""
    from conftest import tiny_unet
    images = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    model = tiny_unet(image_size=8)
    result = train(model, NoiseSchedule.linear(T=50), images, steps=60, batch_size=16, lr=2e-3,
                   log_every=10, prediction=prediction, progress=False)
    loss = result.history["loss"]
    assert loss[-1] < loss[0], loss


def test_elbo_weights_make_the_eps_mse_the_elbo_terms(linear):
    """With kappa's scale put back, the "elbo"-weighted eps-MSE of any predictor is the
    ELBO's KL term L_{t-1} between q(x_{t-1} | x_t, x0) and p's Gaussian of variance
    beta_tilde, per pixel, for t >= 1; the same weight is (SNR_{t-1} - SNR_t) / (2 SNR_t);
    and x0 and v carry it converted, so the three targets weigh the same error alike."""
    w = objectives.elbo_eps_weights(linear)
    ab = linear.float64("alpha_bars")
    snr = ab / (1 - ab)
    assert w.mean().item() == pytest.approx(1.0, rel=1e-12)
    scale = 1.0 / (2.0 * (1.0 - linear.float64("betas")[0])) / w[0]   # kappa_0 = 1/(2 alpha_1)
    kappa = w * scale
    assert torch.allclose(kappa[1:], (snr[:-1] - snr[1:]) / (2 * snr[1:]), rtol=1e-9)
    # the KL of each image's pixels, from the posterior means: an independent route
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(6, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 10, 100, 400, 800, 999])
    model = lambda x, tt: 0.7 * x + 0.1                                  # noqa: E731
    got = objectives.diffusion_loss(model, linear, x0.float(), t, eps.float(),
                                    weighting="elbo", reduction="none").double()
    a, b = ab[t].view(-1, 1, 1, 1), linear.float64("betas")[t].view(-1, 1, 1, 1)
    a_prev = linear.float64("alpha_bars_prev")[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    mu_q = diffusion.posterior_mean(x0, x_t, b, a, a_prev)
    mu_p = diffusion.reverse_mean_from_eps(x_t, model(x_t, t), b, a)
    var = linear.float64("beta_tilde")[t].view(-1, 1, 1, 1)
    kl = diffusion.gaussian_kl(mu_q, var, mu_p, var).flatten(1).mean(1)
    assert torch.allclose(got * scale, kl, rtol=1e-3)
    for prediction, factor in (("x0", snr), ("v", snr / (snr + 1))):
        wp = objectives.loss_weights(linear, t, prediction, "elbo").double()
        assert torch.allclose(wp, (w * factor)[t], rtol=1e-5), prediction


def test_zero_terminal_snr_weights_are_finite_and_eps_is_refused():
    """On a zero-terminal-SNR schedule (alpha_bar_{T-1} = 0, SNR = 0): min-SNR gives x0 and v
    the weight 0 there; the ELBO's kappa is infinite there but its x0 (and v) weight kappa SNR
    is the limit (SNR_{T-2} - 0) / 2, scaled like the others, and is the ELBO's KL term
    L_{T-1} computed from the posterior means; an eps target is refused."""
    sched = NoiseSchedule.linear(T=1000, zero_terminal_snr=True)
    T = sched.T
    t = torch.tensor([0, 500, T - 2, T - 1])
    for prediction in ("x0", "v"):
        for weighting in ("min_snr", "elbo"):
            w = objectives.loss_weights(sched, t, prediction, weighting)
            assert torch.isfinite(w).all(), (prediction, weighting)
        assert objectives.loss_weights(sched, t, prediction, "min_snr")[-1].item() == 0.0
    ab = sched.float64("alpha_bars")
    snr = ab / (1 - ab)
    w_eps, w_x0 = objectives.elbo_eps_weights(sched), objectives.elbo_x0_weights(sched)
    assert w_eps[-1].item() == math.inf and torch.isfinite(w_eps[:-1]).all()
    assert torch.allclose(w_x0[:-1], (w_eps * snr)[:-1], rtol=1e-9)
    # kappa SNR = (SNR_{t-1} - SNR_t) / 2 for t >= 1: the last over the one before
    assert (w_x0[-1] / w_x0[-2]).item() == pytest.approx((snr[-2] / (snr[-3] - snr[-2])).item(), rel=1e-9)
    elbo = {p: objectives.loss_weights(sched, t, p, "elbo").double() for p in ("x0", "v")}
    assert torch.allclose(elbo["x0"], w_x0[t], rtol=1e-6)
    assert torch.allclose(elbo["v"], (w_x0 / (snr + 1))[t], rtol=1e-6)     # SNR + 1 = 1 at T-1
    assert torch.allclose(elbo["v"][:-1], (w_eps * snr / (snr + 1))[t[:-1]], rtol=1e-6)
    # the KL at t = T-1 from the posterior means: q's mean sqrt(ab_prev) x0, p's with x0_theta
    g = torch.Generator().manual_seed(0)
    x0, x0_theta = (torch.randn(4, 1, 2, 2, generator=g, dtype=torch.float64) for _ in range(2))
    a_prev = ab[-2]
    var = sched.float64("beta_tilde")[-1]
    kl = diffusion.gaussian_kl(a_prev.sqrt() * x0, var, a_prev.sqrt() * x0_theta, var).flatten(1).mean(1)
    mse = ((x0 - x0_theta) ** 2).flatten(1).mean(1)
    scale = (snr[-3] - snr[-2]) / 2 / w_x0[-2]                  # kappa_x0 / weight, from the step before
    assert torch.allclose(w_x0[-1] * scale * mse, kl, rtol=1e-9)
    # training: v and x0 give finite losses at every weighting, eps is refused
    x0b, tb, epsb = _batch(n=64)
    tb[:8] = T - 1
    model = lambda x, tt: 0.5 * x                                  # noqa: E731
    for prediction in ("x0", "v"):
        for weighting in ("uniform", "min_snr", "elbo"):
            loss = objectives.diffusion_loss(model, sched, x0b, tb, epsb, prediction=prediction, weighting=weighting)
            assert torch.isfinite(loss), (prediction, weighting)
    for call in (lambda: objectives.loss_simple(model, sched, x0b, tb, epsb),
                 lambda: objectives.loss_weights(sched, tb, "eps", "min_snr")):
        with pytest.raises(ValueError, match=r"zero terminal SNR.*prediction='v'"):
            call()
