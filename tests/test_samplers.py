"""Samplers driven by the exact noise predictor of Gaussian data must reproduce that data."""
import math

import pytest
import torch

from conftest import tiny_unet
from ddpm_lib import NoiseSchedule
from ddpm_lib.analytic import gaussian_eps_predictor
from ddpm_lib.samplers import Trajectory, ddim_sample, ddim_timesteps, ddpm_sample

MU, SIGMA_DATA = 0.3, 0.5
SHAPE = (2000, 1, 4, 4)  # 32,000 values


def check_moments(x, mu=MU, sigma_data=SIGMA_DATA, k=5.0, std_tol=0.02):
    n = x.numel()
    assert x.mean().item() == pytest.approx(mu, abs=k * sigma_data / math.sqrt(n)), "mean"
    assert x.std().item() == pytest.approx(sigma_data, rel=std_tol), "std"


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("sigma", ["beta", "beta_tilde"])
def test_ddpm_reproduces_gaussian_data(kind, sigma):
    sched = getattr(NoiseSchedule, kind)()
    model = gaussian_eps_predictor(sched, MU, SIGMA_DATA)
    x = ddpm_sample(model, sched, SHAPE, sigma=sigma, clip_x0=False, generator=torch.Generator().manual_seed(0))
    check_moments(x)


@pytest.mark.parametrize("steps", [1000, 250])
def test_ddim_reproduces_gaussian_data(linear, steps):
    model = gaussian_eps_predictor(linear, MU, SIGMA_DATA)
    x = ddim_sample(model, linear, SHAPE, steps=steps, clip_x0=False, generator=torch.Generator().manual_seed(1))
    check_moments(x)


def test_ddim_eta1_full_is_ddpm_beta_tilde(linear):
    """DDIM with eta = 1 over all T steps is DDPM with sigma^2 = beta_tilde, noise for noise."""
    model = gaussian_eps_predictor(linear, MU, SIGMA_DATA)
    a = ddpm_sample(model, linear, (8, 1, 3, 3), sigma="beta_tilde", generator=torch.Generator().manual_seed(5))
    b = ddim_sample(model, linear, (8, 1, 3, 3), steps=1000, eta=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(a, b, atol=1e-4)


def test_ddim_eta0_is_deterministic(linear):
    model = gaussian_eps_predictor(linear, MU, SIGMA_DATA)
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
    traj = Trajectory()
    x = ddim_sample(model, linear, x_T.shape, timesteps=timesteps, eta=0.0, clip_x0=False, x_T=x_T,
                    trajectory=traj)
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
    assert torch.allclose(x, torch.ones_like(x))                # x0 = +inf-ish, clipped to 1
    traj = Trajectory()
    y = ddim_sample(big, linear, (2, 1, 2, 2), steps=10, generator=torch.Generator().manual_seed(0),
                    trajectory=traj)
    assert y.abs().max().item() <= 1.0 + 1e-5
    # eps re-derived from the clipped x0 keeps every x_t in range (measured max 2.17; with the
    # network's eps kept, the trajectory reaches about 10)
    assert traj.x_t[1:].abs().max() < 3


def test_trajectory(linear):
    model = gaussian_eps_predictor(linear, MU, SIGMA_DATA)
    traj = Trajectory()
    x = ddim_sample(model, linear, (2, 1, 3, 3), steps=10, trajectory=traj)
    assert traj.t == ddim_timesteps(1000, 10) and traj.t[0] == 999 and traj.t[-1] == 0
    assert traj.x_t.shape == (10, 2, 1, 3, 3) and traj.x0_hat.shape == (10, 2, 1, 3, 3)
    assert torch.allclose(traj.x0_hat[-1], x)
    traj = Trajectory()
    x = ddpm_sample(model, NoiseSchedule.linear(T=50), (2, 1, 3, 3), trajectory=traj)
    assert traj.t == list(range(49, -1, -1)) and traj.x_t.shape[0] == 50


def test_bad_sampler_arguments(linear):
    model = gaussian_eps_predictor(linear, MU, SIGMA_DATA)
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


# ----------------------------------------------------------------------------------------
# Independent float64 re-derivations: DDIM (Song et al. 2021, eq. 12) and
# DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), written from alpha_bar alone
# ----------------------------------------------------------------------------------------
from ddpm_lib.samplers import dpm_solver_sample, guided_model, logsnr_timesteps  # noqa: E402


def close(got, want, tol=1e-5):
    """Agreement to float32 precision relative to the size of the values."""
    want = want.double()
    return (got.double() - want).abs().max().item() <= tol * max(1.0, want.abs().max().item())


def wavy_eps(x, t):
    """A made-up noise predictor that depends on x_t and t (works in float32 and float64)."""
    return torch.tanh(x) * (0.5 + t.to(x.dtype)[:, None, None, None] / 1000) + 0.1 * torch.sin(3 * x)


def ddim_reference(model, alpha_bars, timesteps, x_T, eta=0.0, noises=None):
    """DDIM in float64 from eq. 12 of Song et al. (2021); returns every x visited and the output."""
    ab = alpha_bars.double()
    x, xs = x_T.double(), []
    for i, t in enumerate(timesteps):
        xs.append(x)
        a = ab[t]
        a_prev = ab[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.tensor(1.0, dtype=torch.float64)
        eps = model(x, torch.full((x.shape[0],), t))
        x0 = (x - torch.sqrt(1 - a) * eps) / torch.sqrt(a)
        sigma = eta * torch.sqrt((1 - a_prev) / (1 - a)) * torch.sqrt(1 - a / a_prev)
        x = torch.sqrt(a_prev) * x0 + torch.sqrt(1 - a_prev - sigma ** 2) * eps
        if sigma > 0:
            x = x + sigma * noises.pop(0)
    return xs, x


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_matches_float64_reference_over_several_steps(linear, eta):
    x_T = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    for timesteps in ([999, 500], [999, 750, 500, 250, 100, 20, 0]):
        # the sampler draws its noise (for eta > 0) from this generator, in step order
        g = torch.Generator().manual_seed(1)
        noises = [torch.randn(x_T.shape, generator=g).double() for _ in timesteps[:-1]]
        traj = Trajectory()
        x = ddim_sample(wavy_eps, linear, x_T.shape, timesteps=timesteps, eta=eta, clip_x0=False,
                        x_T=x_T, trajectory=traj, generator=torch.Generator().manual_seed(1))
        xs, x_ref = ddim_reference(wavy_eps, linear.float64("alpha_bars"), timesteps, x_T, eta, noises)
        for got, want in zip(traj.x_t, xs):
            assert close(got, want)
        assert close(x, x_ref)


def dpm_solver_2m_reference(model, alpha_bars, timesteps, x_T):
    """DPM-Solver++(2M) in float64, written in the 'integral' form of Lu et al. (2022):

        x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^{-h}) (x0_s + h/2 * (x0_s - x0_prev) / h_prev)

    i.e. the exact solution of the ODE with x0_hat taken linear in lambda, whose slope
    (x0_s - x0_prev) / h_prev is weighted by h/2 (their phi_2 ~ phi_1 / 2). The first step
    has no slope, the last (to clean data) returns x0_hat."""
    ab = alpha_bars.double()
    alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
    lam = torch.log(alpha / sigma)
    x, xs, x0_prev = x_T.double(), [], None
    for i, t in enumerate(timesteps):
        xs.append(x)
        eps = model(x, torch.full((x.shape[0],), t))
        x0 = (x - sigma[t] * eps) / alpha[t]
        if i + 1 == len(timesteps):
            return xs, x0
        s, u = t, timesteps[i + 1]
        h = lam[u] - lam[s]
        slope = 0 if x0_prev is None else (x0 - x0_prev) / (lam[s] - lam[timesteps[i - 1]])
        x = sigma[u] / sigma[s] * x + alpha[u] * (1 - torch.exp(-h)) * (x0 + h / 2 * slope)
        x0_prev = x0


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_dpm_solver_2m_matches_float64_reference(kind):
    sched = getattr(NoiseSchedule, kind)()
    x_T = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    for timesteps in ([999, 700, 400], [999, 700, 400, 0], logsnr_timesteps(sched, 12)):
        traj = Trajectory()
        x = dpm_solver_sample(wavy_eps, sched, x_T.shape, timesteps=timesteps, clip_x0=False, x_T=x_T,
                              trajectory=traj)
        xs, x_ref = dpm_solver_2m_reference(wavy_eps, sched.float64("alpha_bars"), timesteps, x_T)
        assert len(xs) == len(traj.x_t) == len(timesteps)
        for got, want in zip(traj.x_t, xs):   # xs[2] is the first second-order step
            assert close(got, want)
        assert close(x, x_ref)


@pytest.mark.parametrize("clip_x0", [False, True])
def test_dpm_solver_order1_is_ddim_eta0(linear, clip_x0):
    x_T = 1.5 * torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    for timesteps in (ddim_timesteps(1000, 10), logsnr_timesteps(linear, 7), [999, 3, 0], [999]):
        a = dpm_solver_sample(wavy_eps, linear, x_T.shape, timesteps=timesteps, order=1, clip_x0=clip_x0, x_T=x_T)
        b = ddim_sample(wavy_eps, linear, x_T.shape, timesteps=timesteps, eta=0.0, clip_x0=clip_x0, x_T=x_T)
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    # spacing="time" with `steps` is DDIM's default grid
    a = dpm_solver_sample(wavy_eps, linear, x_T.shape, steps=15, spacing="time", order=1, clip_x0=clip_x0, x_T=x_T)
    b = ddim_sample(wavy_eps, linear, x_T.shape, steps=15, clip_x0=clip_x0, x_T=x_T)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_logsnr_timesteps(linear):
    lam = 0.5 * torch.log(linear.float64("alpha_bars") / (1 - linear.float64("alpha_bars")))
    for sched in (linear, NoiseSchedule.cosine(), NoiseSchedule.linear(T=10)):
        for steps in sorted({1, 2, 5, min(20, sched.T), sched.T}):
            ts = logsnr_timesteps(sched, steps)
            assert len(ts) == steps and ts[0] == sched.T - 1 and (steps == 1 or ts[-1] == 0)
            assert all(a > b for a, b in zip(ts, ts[1:]))
    gaps = lam[logsnr_timesteps(linear, 20)].diff()        # even in lambda, up to rounding to integer t
    even = (lam[0] - lam[-1]) / 19
    assert ((gaps[:-3] - even).abs() < 0.05 * even).all()  # (near t = 0 one step of t moves lambda by 0.4)
    assert ((gaps - even).abs() < 0.3 * even).all()
    assert logsnr_timesteps(linear, 1000) == list(range(999, -1, -1))


# ----------------------------------------------------------------------------------------
# DPM-Solver++(2M) with the exact predictor of Gaussian data
# ----------------------------------------------------------------------------------------
def exact_ode_solution(sched, x_T, mu=MU, s=SIGMA_DATA):
    """The deterministic (probability-flow) ODE for data N(mu, s^2) keeps the standardised
    value z = (x_t - alpha_t mu) / sqrt(alpha_t^2 s^2 + sigma_t^2) fixed: x at timestep 0 in
    closed form, then the samplers' last step x0_hat(x_0, 0). Float64."""
    ab = sched.float64("alpha_bars")
    a0, aT = ab[0], ab[-1]
    z = (x_T.double() - aT.sqrt() * mu) / (aT * s ** 2 + 1 - aT).sqrt()
    x = a0.sqrt() * mu + (a0 * s ** 2 + 1 - a0).sqrt() * z
    eps = (1 - a0).sqrt() * (x - a0.sqrt() * mu) / (a0 * s ** 2 + 1 - a0)
    return (x - (1 - a0).sqrt() * eps) / a0.sqrt()


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_dpm_solver_reproduces_gaussian_data_in_few_steps(kind):
    """Measured (linear / cosine): std 0.516 / 0.494 at 10 steps, 0.507 / 0.515 at 20, for s = 0.5;
    DDIM on the same grid: 0.38 / 0.33 and 0.44 / 0.41."""
    sched = getattr(NoiseSchedule, kind)()
    model = gaussian_eps_predictor(sched, MU, SIGMA_DATA)
    for steps, tol in ((10, 0.06), (20, 0.05)):
        x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(steps))
        x = dpm_solver_sample(model, sched, SHAPE, steps=steps, clip_x0=False, x_T=x_T)
        check_moments(x, std_tol=tol)
        y = ddim_sample(model, sched, SHAPE, timesteps=logsnr_timesteps(sched, steps), clip_x0=False, x_T=x_T)
        assert abs(x.std().item() - SIGMA_DATA) < abs(y.std().item() - SIGMA_DATA) / 3


def test_dpm_solver_converges_at_second_order(linear):
    """Error against the exact ODE solution: 2M falls ~4x per doubling of the steps, DDIM ~2x.

    Measured max errors (logSNR grid, linear schedule), steps 10 / 20 / 40:
    DDIM 0.35 / 0.18 / 0.090, DPM-Solver++(2M) 0.048 / 0.022 / 0.0058."""
    model = gaussian_eps_predictor(linear, MU, SIGMA_DATA)
    x_T = torch.linspace(-3, 3, 101).reshape(1, 1, 1, 101)
    exact = exact_ode_solution(linear, x_T)
    err = {}
    for steps in (10, 20, 40, 1000):
        ts = logsnr_timesteps(linear, steps)
        err["2M", steps] = (dpm_solver_sample(model, linear, x_T.shape, timesteps=ts, clip_x0=False, x_T=x_T)
                            .double() - exact).abs().max().item()
        err["DDIM", steps] = (ddim_sample(model, linear, x_T.shape, timesteps=ts, clip_x0=False, x_T=x_T)
                              .double() - exact).abs().max().item()
    assert err["2M", 1000] < 1e-3                     # the 1000-step solution is the ODE's
    for steps in (10, 20, 40):
        assert err["2M", steps] < err["DDIM", steps] / 5
    assert err["2M", 20] / err["2M", 40] > 3.0        # second order: x4 per doubling (asymptotically)
    assert 1.7 < err["DDIM", 20] / err["DDIM", 40] < 2.5   # first order: x2
    assert 1.7 < err["DDIM", 10] / err["DDIM", 20] < 2.5


def test_dpm_solver_basics(linear):
    model = gaussian_eps_predictor(linear, MU, SIGMA_DATA)
    traj = Trajectory()
    x = dpm_solver_sample(model, linear, (2, 1, 3, 3), steps=10, trajectory=traj,
                          generator=torch.Generator().manual_seed(0))
    assert traj.t == logsnr_timesteps(linear, 10) and traj.x_t.shape == (10, 2, 1, 3, 3)
    assert torch.equal(traj.x0_hat[-1], x)            # the last step returns x0_hat at t = 0
    y = dpm_solver_sample(model, linear, (2, 1, 3, 3), steps=10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, y)                           # deterministic given x_T
    big = lambda x, t: -10 * torch.ones_like(x)  # noqa: E731
    assert dpm_solver_sample(big, linear, (2, 1, 2, 2), steps=5).abs().max().item() <= 1.0 + 1e-5
    with pytest.raises(ValueError, match="order"):
        dpm_solver_sample(model, linear, (1, 1, 2, 2), order=3)
    with pytest.raises(ValueError, match="spacing"):
        dpm_solver_sample(model, linear, (1, 1, 2, 2), spacing="karras")
    with pytest.raises(ValueError, match="steps"):
        dpm_solver_sample(model, linear, (1, 1, 2, 2), steps=0)
    with pytest.raises(ValueError, match="decreasing"):
        dpm_solver_sample(model, linear, (1, 1, 2, 2), timesteps=[3, 5])


# ----------------------------------------------------------------------------------------
# Classifier-free guidance
# ----------------------------------------------------------------------------------------
class LabelledModel(torch.nn.Module):
    """eps = 0.5 x + y + t/1000: each label shifts eps by a known amount; counts its calls."""
    num_classes = 3

    def __init__(self):
        super().__init__()
        self.batch_sizes = []

    def forward(self, x, t, y):
        self.batch_sizes.append(x.shape[0])
        return 0.5 * x + y.float()[:, None, None, None] + t.float()[:, None, None, None] / 1000


def test_guided_model_formula():
    model = LabelledModel()
    x = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 500, 900, 999])
    y = torch.tensor([0, 1, 2, 1])
    cond, null = model(x, t, y), model(x, t, torch.full_like(y, 3))
    for w in (0.0, 0.5, 1.0, 2.0, 7.5):
        model.batch_sizes.clear()
        eps = guided_model(model, y, w)(x, t)
        assert torch.allclose(eps, null + w * (cond - null), atol=1e-5)
        assert model.batch_sizes == ([4] if w in (0.0, 1.0) else [8])   # one call; 2B rows when guiding
    assert torch.equal(guided_model(model, y, 0.0)(x, t), null)         # w = 0: unconditional, exactly
    assert torch.equal(guided_model(model, y, 1.0)(x, t), cond)         # w = 1: conditional, exactly
    # an int label is the same for the whole batch; null_class can be given explicitly
    assert torch.equal(guided_model(model, 2, 3.0)(x, t), guided_model(model, torch.full((4,), 2), 3.0)(x, t))
    assert torch.allclose(guided_model(model, y, 2.0, null_class=0)(x, t),
                          model(x, t, torch.zeros_like(y)) + 2 * (cond - model(x, t, torch.zeros_like(y))))


def tiny_conditional_unet():
    return tiny_unet(base_channels=16, attention_resolutions=(4,), num_classes=3, image_size=8).eval()


def test_guided_unet_batched_call_equals_two_calls():
    net = tiny_conditional_unet()
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([5, 400, 999]), torch.tensor([0, 2, 1])
    with torch.no_grad():
        cond, null = net(x, t, y), net(x, t, torch.full_like(y, 3))
        assert torch.equal(guided_model(net, y, 0)(x, t), null)
        assert torch.equal(guided_model(net, y, 1)(x, t), cond)
        assert torch.allclose(guided_model(net, y, 3.0)(x, t), -2 * null + 3 * cond, atol=1e-5)


def test_guided_model_works_with_every_sampler():
    net = tiny_conditional_unet()
    sched = NoiseSchedule.linear(T=20, beta_start=1e-3, beta_end=0.2)
    shape = (2, 1, 8, 8)
    unconditional = lambda x, t: net(x, t, torch.full_like(t, 3))  # noqa: E731
    for sample_fn, kw in ((ddpm_sample, {}), (ddim_sample, {"steps": 5}), (dpm_solver_sample, {"steps": 5})):
        out = sample_fn(guided_model(net, torch.tensor([0, 1]), 2.0), sched, shape,
                        generator=torch.Generator().manual_seed(0), **kw)
        assert out.shape == shape and torch.isfinite(out).all()
        a = sample_fn(guided_model(net, 1, 0.0), sched, shape, generator=torch.Generator().manual_seed(1), **kw)
        b = sample_fn(unconditional, sched, shape, generator=torch.Generator().manual_seed(1), **kw)
        assert torch.equal(a, b)                        # w = 0 samples the unconditional model


def test_guided_model_arguments():
    model = LabelledModel()
    x, t = torch.zeros(2, 1, 2, 2), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="unconditional"):
        guided_model(lambda x, t, y: x, 0, 2.0)
    with pytest.raises(ValueError, match="w must"):
        guided_model(model, 0, -1.0)
    with pytest.raises(ValueError, match="shape"):
        guided_model(model, torch.tensor([0, 1, 2]), 2.0)(x, t)
    with pytest.raises(ValueError, match="integers"):
        guided_model(model, 0.5, 2.0)(x, t)


def test_sampler_arguments_of_the_wrong_type(linear):
    model = gaussian_eps_predictor(linear, MU, SIGMA_DATA)
    for sample_fn in (ddpm_sample, ddim_sample, dpm_solver_sample):
        with pytest.raises(ValueError, match=r"shape \(B, C, H, W\)\[0\] must be an integer >= 1"):
            sample_fn(model, linear, (8.5, 1, 28, 28))
        with pytest.raises(ValueError, match="schedule must be a NoiseSchedule"):
            sample_fn(model, (1, 1, 2, 2), linear)
        with pytest.raises(ValueError, match="model must return a tensor"):
            sample_fn(lambda x, t: (x,), linear, (1, 1, 2, 2))
        with pytest.raises(ValueError, match="x_T must be a floating-point tensor"):
            sample_fn(model, linear, (1, 1, 2, 2), x_T=torch.zeros(1, 1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"timesteps\[0\] must be an integer"):
        ddim_sample(model, linear, (1, 1, 2, 2), timesteps=[999.5, 10])
    with pytest.raises(ValueError, match="eta must be a finite real number"):
        ddim_sample(model, linear, (1, 1, 2, 2), eta="0.5")
    with pytest.raises(ValueError, match="order must be an integer"):
        dpm_solver_sample(model, linear, (1, 1, 2, 2), order=True)
    with pytest.raises(ValueError, match="null_class must be an integer"):
        guided_model(LabelledModel(), 1, 2.0, null_class=3.5)
    # any integer type is an integer: NumPy's, a tensor's
    a = ddim_sample(model, linear, (2, 1, 2, 2), steps=5, x_T=torch.ones(2, 1, 2, 2))
    b = ddim_sample(model, linear, torch.Size([2, 1, 2, 2]), steps=torch.tensor(5), x_T=torch.ones(2, 1, 2, 2))
    c = ddim_sample(model, linear, (2, 1, 2, 2), x_T=torch.ones(2, 1, 2, 2),
                    timesteps=torch.tensor(ddim_timesteps(1000, 5)))
    assert torch.equal(a, b) and torch.equal(a, c)


# ----------------------------------------------------------------------------------------
# The driver and the registry
# ----------------------------------------------------------------------------------------
from ddpm_lib.samplers import (SAMPLERS, SPACINGS, Sampler, StepOutput,  # noqa: E402
                               resolve_timesteps, sample)


def test_the_registry_drives_every_sampler():
    """Every entry of SAMPLERS runs through sample(); the named functions are sample() too."""
    sched = NoiseSchedule.linear(T=50, beta_start=1e-3, beta_end=0.2)
    model = gaussian_eps_predictor(sched, MU, SIGMA_DATA)
    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    named = {"ddpm": ddpm_sample, "ddim": ddim_sample, "dpm_solver": dpm_solver_sample}
    assert set(named) <= set(SAMPLERS)
    for name, entry in SAMPLERS.items():
        traj = Trajectory()
        x = sample(model, sched, x_T.shape, sampler=name, x_T=x_T, trajectory=traj,
                   generator=torch.Generator().manual_seed(1))
        assert x.shape == x_T.shape and x.dtype == torch.float32 and torch.isfinite(x).all()
        steps = sched.T if entry.steps is None else min(entry.steps, sched.T)
        assert traj.t == resolve_timesteps(sched, steps, entry.spacing) and traj.x_t.shape[0] == len(traj.t)
        if name in named:
            y = named[name](model, sched, x_T.shape, x_T=x_T, generator=torch.Generator().manual_seed(1))
            assert torch.equal(x, y)


def euler_step(schedule, x_t, t, t_prev, eps, x0_hat, *, state, denoise=None, generator=None,
               scale=1.0):
    """Chapter 8's Euler step of d(x / sqrt(alpha_bar)) / d rho = eps, rho = sqrt((1 - ab) / ab):
    the same update as DDIM with eta = 0, written another way (``scale`` is a toy option)."""
    ab = schedule.float64("alpha_bars")
    ab_t, ab_prev = ab[t].item(), (ab[t_prev].item() if t_prev >= 0 else 1.0)
    rho, rho_prev = math.sqrt((1 - ab_t) / ab_t), math.sqrt((1 - ab_prev) / ab_prev)
    x = math.sqrt(ab_prev) * (x_t / math.sqrt(ab_t) + scale * (rho_prev - rho) * eps)
    return StepOutput(x, x0_hat)


def test_a_new_sampler_is_one_step_function_and_one_registry_line(monkeypatch, linear):
    monkeypatch.setitem(SAMPLERS, "euler", Sampler(euler_step, "Euler", steps=10, options={"scale": 1.0}))
    x_T = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    traj = Trajectory()
    x = sample(wavy_eps, linear, x_T.shape, sampler="euler", x_T=x_T, clip_x0=False, trajectory=traj)
    assert traj.t == ddim_timesteps(1000, 10)
    y = ddim_sample(wavy_eps, linear, x_T.shape, steps=10, x_T=x_T, clip_x0=False)
    assert torch.allclose(x, y, rtol=1e-4, atol=1e-4)
    z = sample(wavy_eps, linear, x_T.shape, sampler="euler", x_T=x_T, clip_x0=False, scale=0.5,
               timesteps=logsnr_timesteps(linear, 5))
    assert torch.isfinite(z).all() and not torch.allclose(z, y)
    with pytest.raises(ValueError, match="the euler sampler has no option eta; it takes scale"):
        sample(wavy_eps, linear, x_T.shape, sampler="euler", eta=0.5)


def heun_step(schedule, x_t, t, t_prev, eps, x0_hat, *, state, denoise, generator=None):
    """Heun's method on the ODE of :func:`euler_step`: an Euler step, the model called again
    at its end (``denoise``), then the average slope; Euler on the last step (to t = -1)."""
    ab = schedule.float64("alpha_bars")
    ab_t, ab_prev = ab[t].item(), (ab[t_prev].item() if t_prev >= 0 else 1.0)
    rho, rho_prev = math.sqrt((1 - ab_t) / ab_t), math.sqrt((1 - ab_prev) / ab_prev)
    y = x_t / math.sqrt(ab_t) + (rho_prev - rho) * eps
    if t_prev >= 0:
        eps_end, _ = denoise(math.sqrt(ab_prev) * y, t_prev)
        y = x_t / math.sqrt(ab_t) + (rho_prev - rho) * 0.5 * (eps + eps_end)
    return StepOutput(math.sqrt(ab_prev) * y, x0_hat)


def test_a_two_evaluation_sampler_is_one_step_function_too(monkeypatch, linear):
    """Heun calls the model twice per step through ``denoise``: still one step function and
    one registry line. On the Gaussian toy (exact eps) its 10 steps land closer to a
    1000-step DDIM solution than Euler's 10 do."""
    monkeypatch.setitem(SAMPLERS, "heun", Sampler(heun_step, "Heun", steps=10))
    monkeypatch.setitem(SAMPLERS, "euler", Sampler(euler_step, "Euler", steps=10, options={"scale": 1.0}))
    calls = []
    model = gaussian_eps_predictor(linear, MU, SIGMA_DATA)

    def counted(x_t, t):
        calls.append(int(t[0]))
        return model(x_t, t)

    x_T = torch.randn(256, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    ref = ddim_sample(model, linear, x_T.shape, steps=1000, x_T=x_T, clip_x0=False)
    heun = sample(counted, linear, x_T.shape, sampler="heun", x_T=x_T, clip_x0=False)
    assert len(calls) == 2 * 10 - 1                    # two per step, one on the last
    euler = sample(model, linear, x_T.shape, sampler="euler", x_T=x_T, clip_x0=False)
    heun_error, euler_error = (heun - ref).abs().max(), (euler - ref).abs().max()
    assert heun_error < 0.5 * euler_error, (heun_error, euler_error)


def test_sampler_names_and_options_are_checked(linear):
    model = gaussian_eps_predictor(linear, MU, SIGMA_DATA)
    with pytest.raises(ValueError, match="sampler must be one of ddim, ddpm, dpm_solver, euler"):
        sample(model, linear, (1, 1, 2, 2), sampler="plms")
    with pytest.raises(ValueError, match="ddpm sampler has no option eta; it takes sigma"):
        sample(model, linear, (1, 1, 2, 2), sampler="ddpm", eta=1.0)
    with pytest.raises(ValueError, match="no option return_trajectory.*trajectory=Trajectory()"):
        ddim_sample(model, linear, (1, 1, 2, 2), return_trajectory=True)
    with pytest.raises(ValueError, match="prediction must be"):
        sample(model, linear, (1, 1, 2, 2), sampler="ddim", prediction="score")
    with pytest.raises(ValueError, match="ddpm_sample walks all T timesteps"):
        ddpm_sample(model, linear, (1, 1, 2, 2), steps=10)
    traj = Trajectory()
    ddim_sample(model, linear, (1, 1, 2, 2), steps=2, trajectory=traj)
    with pytest.raises(ValueError, match="new Trajectory"):
        ddim_sample(model, linear, (1, 1, 2, 2), steps=2, trajectory=traj)   # one per run


def test_resolve_timesteps(linear):
    short = NoiseSchedule.linear(T=10)
    assert resolve_timesteps(short) == list(range(9, -1, -1))                      # default: all T
    assert resolve_timesteps(short, spacing="logsnr") == list(range(9, -1, -1))
    assert resolve_timesteps(linear, 7) == ddim_timesteps(1000, 7)
    assert resolve_timesteps(linear, 7, "logsnr") == logsnr_timesteps(linear, 7)
    assert resolve_timesteps(linear, timesteps=torch.tensor([900, 3])) == [900, 3]
    for kwargs, message in [(dict(steps=0), "steps must be an integer >= 1"),
                            (dict(steps=11), r"steps must be an integer in 1\.\.10"),
                            (dict(steps=2.0), "steps must be an integer"),
                            (dict(spacing="karras"), "spacing must be one of 'time', 'logsnr'"),
                            (dict(steps=3, timesteps=[9, 0]), "not both"),
                            (dict(timesteps=[]), "strictly decreasing"),
                            (dict(timesteps=[5, 5, 0]), "strictly decreasing"),
                            (dict(timesteps=[10, 0]), r"within 0\.\.9"),
                            (dict(timesteps=[3, -1]), r"within 0\.\.9")]:
        with pytest.raises(ValueError, match=message):
            resolve_timesteps(short, **kwargs)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm_solver"])
def test_x0_and_v_predictions_give_the_samples_of_eps(linear, name):
    """A model that returns the exact x0 or v of the Gaussian toy samples what its eps does."""
    eps_model = gaussian_eps_predictor(linear, MU, SIGMA_DATA)
    models = {"eps": eps_model,
              "x0": lambda x, t: linear.predict_x0(x, t, eps_model(x, t)),
              "v": lambda x, t: linear.velocity(linear.predict_x0(x, t, eps_model(x, t)), t, eps_model(x, t))}
    x_T = torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    out = {}
    for prediction, model in models.items():
        for clip_x0 in (False, True):
            out[prediction, clip_x0] = sample(model, linear, x_T.shape, sampler=name, prediction=prediction,
                                              clip_x0=clip_x0, x_T=x_T, generator=torch.Generator().manual_seed(1))
    for (prediction, clip_x0), x in out.items():
        assert (x - out["eps", clip_x0]).abs().max().item() < 1e-5, (prediction, clip_x0)   # measured 5e-7
    assert not torch.allclose(out["eps", False], out["eps", True])   # some x0_hat leave [-1, 1]


def test_ddpm_on_a_respaced_grid_is_ddim_with_eta_1(linear):
    """On any grid, DDPM with sigma^2 = beta_tilde of the merged step is DDIM with eta = 1."""
    x_T = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    a = sample(wavy_eps, linear, x_T.shape, sampler="ddpm", sigma="beta_tilde", steps=25, x_T=x_T,
               generator=torch.Generator().manual_seed(1))
    b = ddim_sample(wavy_eps, linear, x_T.shape, steps=25, eta=1.0, x_T=x_T,
                    generator=torch.Generator().manual_seed(1))
    assert torch.allclose(a, b, atol=1e-4)


# ----------------------------------------------------------------------------------------
# Zero terminal SNR (Lin et al. 2024): v-prediction from t = T-1, where alpha_bar = 0
# ----------------------------------------------------------------------------------------
from ddpm_lib.samplers import ddim_step  # noqa: E402


def gaussian_v_predictor(sched, mu=MU, s=SIGMA_DATA):
    """The exact v = sqrt(ab) E[eps | x_t] - sqrt(1 - ab) E[x0 | x_t] of data N(mu, s^2), in
    closed form (no division by sqrt(alpha_bar)): at alpha_bar = 0 it is -mu."""
    def model(x, t):
        ab = sched.at("alpha_bars", t, x)
        var = ab * s**2 + 1 - ab                                   # Var(x_t)
        e = (1 - ab).sqrt() * (x - ab.sqrt() * mu) / var           # E[eps | x_t]
        x0 = mu + ab.sqrt() * s**2 * (x - ab.sqrt() * mu) / var    # E[x0 | x_t]
        return (ab.sqrt() * e - (1 - ab).sqrt() * x0).float()
    return model


@pytest.fixture(scope="module")
def zero_snr():
    return NoiseSchedule.linear(zero_terminal_snr=True)


@pytest.mark.parametrize("name, steps, ode_error", [("ddim", 1000, 0.015), ("dpm_solver", 50, 0.02),
                                                    ("ddpm", None, None)])
def test_samplers_from_pure_noise_reproduce_gaussian_data(zero_snr, name, steps, ode_error):
    """From x_{T-1} ~ N(0, I), exact there, with the exact v: the data's moments within 5
    standard errors (32,000 values: mean 5 * 0.5 / sqrt(n) = 0.014; std 5 * 0.5 / sqrt(2n)
    = 0.0099, 2%), no NaN. Grids fine enough for the discretisation bias to stay below one
    standard error (measured std: DDIM 1000 steps 0.4988, 2M 50 steps 0.5028, DDPM 0.4964; DDIM
    at 250 steps is 1.1% narrow, 2M at 20 steps 2.6% wide, as on the linear schedule's wider
    log-SNR range). The deterministic ones also land where the exact ODE takes each x_T (at
    alpha_bar_{T-1} = 0, x_0 = mu + s x_T up to the last step): measured max error 0.0060 and
    0.0107."""
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(11))
    traj = Trajectory()
    x = sample(gaussian_v_predictor(zero_snr), zero_snr, SHAPE, sampler=name, steps=steps, prediction="v",
               clip_x0=False, x_T=x_T, trajectory=traj, generator=torch.Generator().manual_seed(12))
    assert traj.t[0] == zero_snr.T - 1 and torch.isfinite(traj.x_t).all() and torch.isfinite(x).all()
    assert torch.allclose(traj.x0_hat[0], torch.full_like(x_T, MU))   # at pure noise: E[x0] = mu
    check_moments(x)
    if ode_error is not None:
        assert (x.double() - exact_ode_solution(zero_snr, x_T)).abs().max() < ode_error


def test_every_registered_sampler_runs_from_pure_noise(zero_snr):
    """SAMPLERS' entries that cannot step from alpha_bar = 0 themselves (Sampler.zero_snr
    False: the Euler, Heun and Euler-Maruyama steps divide by it) take that first step with
    DDIM: finite samples, mean within 5 standard errors, std within 10% (100 steps, or every
    timestep; 4,000 values, 5 standard errors of the std are 5.6%; measured std: Euler 0.464,
    7% narrow on the EDM grid, which spends many of its steps at the huge sigma of t = T-2;
    the others 0.483 to 0.501)."""
    x_T = torch.randn(4000, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    for name, entry in SAMPLERS.items():
        x = sample(gaussian_v_predictor(zero_snr), zero_snr, x_T.shape, sampler=name, prediction="v",
                   x_T=x_T, steps=100 if entry.steps else None, clip_x0=False,
                   generator=torch.Generator().manual_seed(1))
        assert torch.isfinite(x).all(), name
        check_moments(x, std_tol=0.1)
        assert entry.zero_snr == (name in ("ddpm", "ddim", "dpm_solver")), name


def test_eps_prediction_from_pure_noise_is_refused(zero_snr):
    model = gaussian_eps_predictor(zero_snr, MU, SIGMA_DATA)
    for name in ("ddpm", "ddim", "dpm_solver"):
        with pytest.raises(ValueError, match=r"zero terminal SNR.*eps-prediction gives no x0.*prediction='v'"):
            sample(model, zero_snr, (2, 1, 2, 2), sampler=name, steps=10)
    # a grid that starts below T-1 never meets alpha_bar = 0: eps works there
    x = ddim_sample(model, zero_snr, (2, 1, 2, 2), timesteps=[998, 500, 0])
    assert torch.isfinite(x).all()


def test_the_first_steps_from_pure_noise(zero_snr):
    """DPM-Solver++(2M) from lambda = -inf: h = inf, exp(-h) = 0, so its first step is
    b_prev x_T + a_prev x0_hat, DDIM's, and the second is first order too (r = inf): both
    equal DDIM's on the same grid. DDPM's first step is the posterior at alpha = 0:
    sqrt(alpha_bar_prev) x0_hat + sigma z."""
    x_T = torch.randn(5, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    model, grid = gaussian_v_predictor(zero_snr), resolve_timesteps(zero_snr, 8, "logsnr")
    runs = {}
    for name in ("dpm_solver", "ddim"):
        runs[name] = Trajectory()
        sample(model, zero_snr, x_T.shape, sampler=name, timesteps=grid, prediction="v", x_T=x_T,
               trajectory=runs[name])
    ab = zero_snr.float64("alpha_bars")
    first = ab[grid[1]].sqrt() * MU + (1 - ab[grid[1]]).sqrt() * x_T.double()
    assert torch.allclose(runs["dpm_solver"].x_t[1].double(), first, atol=1e-6)
    assert torch.allclose(runs["dpm_solver"].x_t[:3], runs["ddim"].x_t[:3], atol=1e-6)
    # ... and 2M from the third step on: the two part by 0.35 at the end (measured; 2e-7 at x_t[2])
    assert (runs["dpm_solver"].x_t[-1] - runs["ddim"].x_t[-1]).abs().max() > 0.1
    for sigma, var in (("beta", 1.0), ("beta_tilde", 1 - ab[-2].item())):
        traj = Trajectory()
        sample(model, zero_snr, x_T.shape, sampler="ddpm", sigma=sigma, prediction="v", x_T=x_T,
               trajectory=traj, generator=torch.Generator().manual_seed(3))
        z = torch.randn(x_T.shape, generator=torch.Generator().manual_seed(3))
        assert torch.allclose(traj.x_t[1], ab[-2].sqrt().item() * MU + math.sqrt(var) * z, atol=1e-6)
    # DDIM inversion's own use of ddim_step (t = t_prev) reaches alpha_bar = 0 without 0 / 0
    out = ddim_step(zero_snr, x_T, 999, 999, x_T, x_T, state={})
    assert torch.equal(out.x_prev, x_T)


def test_grids_of_a_zero_terminal_schedule_start_at_pure_noise(zero_snr):
    """log-SNR is -inf at T-1: the grid is spaced over the first T-1 steps, its first
    timestep (T-2) moved up to T-1. Every spacing starts at T-1 and ends at 0."""
    short = NoiseSchedule(zero_snr.float64("betas")[:-1])
    for steps in (1, 2, 10, 20, 999, 1000):
        for spacing in SPACINGS:
            ts = resolve_timesteps(zero_snr, steps, spacing)
            assert ts[0] == 999 and len(ts) == steps and (steps == 1 or ts[-1] == 0), (spacing, steps)
            assert all(a > b for a, b in zip(ts, ts[1:]))
        if steps < 1000:
            assert logsnr_timesteps(zero_snr, steps) == [999] + logsnr_timesteps(short, steps)[1:]
    assert resolve_timesteps(zero_snr, 10) == ddim_timesteps(1000, 10)    # "time" reads no alpha_bar
