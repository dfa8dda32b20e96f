"""The schedules and the forward process: every identity checked numerically."""
import math

import pytest
import torch

from ddpm_lib import NoiseSchedule
from ddpm_lib.schedules import cosine_betas, linear_betas, rescale_zero_terminal_snr


def test_linear_schedule_values(linear):
    assert linear.T == 1000
    assert linear.betas[0].item() == pytest.approx(1e-4)
    assert linear.betas[-1].item() == pytest.approx(0.02)
    # the seed's schedule leaves almost no signal at the last step (Ho et al. 2020)
    assert linear.alpha_bars[-1].item() == pytest.approx(4.04e-5, rel=2e-3)
    b = linear_betas(1000, 1e-4, 0.02)
    assert torch.allclose(linear.float64("alpha_bars"), torch.cumprod(1 - b, 0))


def test_derived_tensors_are_float32_from_float64(linear):
    for name in ("betas", "alphas", "alpha_bars", "alpha_bars_prev", "beta_tilde"):
        assert getattr(linear, name).dtype == torch.float32
        assert getattr(linear, name).shape == (1000,)
        assert linear.float64(name).dtype == torch.float64
    assert linear.alpha_bars_prev[0].item() == 1.0
    assert torch.equal(linear.alpha_bars_prev[1:], linear.alpha_bars[:-1])
    assert torch.allclose(linear.alphas, 1 - linear.betas)


def test_beta_tilde_formula(linear):
    b, ab, abp = (linear.float64(n) for n in ("betas", "alpha_bars", "alpha_bars_prev"))
    expected = (1 - abp) / (1 - ab) * b
    assert torch.allclose(linear.float64("beta_tilde"), expected, rtol=1e-12)
    assert linear.beta_tilde[0].item() == 0.0
    assert (linear.beta_tilde[1:] < linear.betas[1:]).all()


def test_cosine_schedule_endpoints_and_cap():
    T, s = 1000, 0.008
    sched = NoiseSchedule.cosine(T, s=s, max_beta=0.999)
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    # first step: alpha_bar_1 = f(1/T) / f(0)
    assert sched.float64("alpha_bars")[0].item() == pytest.approx(f(1 / T) / f(0), rel=1e-10)
    # a middle step, uncapped
    assert sched.float64("alpha_bars")[T // 2 - 1].item() == pytest.approx(f(0.5) / f(0), rel=1e-8)
    # f(1) = 0, so the last uncapped beta would be 1: it is capped at max_beta
    assert sched.betas.max().item() == pytest.approx(0.999)
    assert sched.betas[-1].item() == pytest.approx(0.999)
    assert (cosine_betas(T, s, 0.5) <= 0.5).all()
    assert sched.alpha_bars[-1].item() < 1e-5
    # alpha_bar decreases monotonically
    assert (sched.alpha_bars[1:] < sched.alpha_bars[:-1]).all()


def test_log_snr(linear):
    ab = linear.float64("alpha_bars")
    assert torch.allclose(linear.log_snr.double(), torch.log(ab / (1 - ab)), rtol=1e-5)
    assert torch.allclose(linear.snr.double(), ab / (1 - ab), rtol=1e-5)
    assert (linear.log_snr[1:] < linear.log_snr[:-1]).all()


def test_closed_form_matches_iterated_chain(linear):
    """Run the one-step chain q(x_t | x_{t-1}) from x0 and compare mean and variance of x_t
    with the closed form N(sqrt(alpha_bar_t) x0, (1 - alpha_bar_t) I)."""
    g = torch.Generator().manual_seed(1)
    n = 20000
    x0 = torch.tensor([-0.8, 0.3, 1.0]).repeat(n, 1)  # (n, 3): three data values
    x = x0.clone()
    for t, check in [(t, t in (9, 99, 499, 999)) for t in range(1000)]:
        x = linear.q_step(x, t, generator=g)
        if check:
            ab = linear.float64("alpha_bars")[t].item()
            mean, var = x.double().mean(0), x.double().var(0)
            se_mean = math.sqrt((1 - ab) / n)
            se_var = (1 - ab) * math.sqrt(2 / (n - 1))
            assert torch.allclose(mean, math.sqrt(ab) * x0[0].double(), atol=5 * se_mean), t
            assert torch.allclose(var, torch.full((3,), 1 - ab, dtype=torch.float64), atol=5 * se_var), t
    # and the closed form itself has those moments
    x_t, _ = linear.q_sample(x0, torch.full((n,), 499), generator=g)
    ab = linear.float64("alpha_bars")[499].item()
    assert torch.allclose(x_t.double().mean(0), math.sqrt(ab) * x0[0].double(), atol=5 * math.sqrt((1 - ab) / n))
    assert torch.allclose(x_t.double().var(0), torch.full((3,), 1 - ab, dtype=torch.float64),
                          atol=5 * (1 - ab) * math.sqrt(2 / n))


def test_q_sample_is_the_formula(linear, gen):
    x0 = torch.rand(4, 1, 5, 5, generator=gen) * 2 - 1
    eps = torch.randn(4, 1, 5, 5, generator=gen)
    t = torch.tensor([0, 10, 500, 999])
    x_t, noise = linear.q_sample(x0, t, eps)
    assert noise is eps
    ab = linear.float64("alpha_bars")[t].view(-1, 1, 1, 1)
    expected = ab.sqrt() * x0.double() + (1 - ab).sqrt() * eps.double()
    # float32 alpha_bar near 1 leaves 1 - alpha_bar with ~1e-3 relative error at t = 0
    # (sqrt(1 - alpha_bar) = 0.01 there), hence a few 1e-6 absolute; a wrong formula is off by >1e-3
    assert torch.allclose(x_t.double(), expected, atol=1e-5)


def test_predict_x0_inverts_q_sample(linear, gen):
    x0 = torch.rand(6, 1, 8, 8, generator=gen) * 2 - 1
    t = torch.tensor([0, 1, 100, 400, 800, 999])
    x_t, eps = linear.q_sample(x0, t, generator=gen)
    x0_hat = linear.predict_x0(x_t, t, eps)
    # at t = 999 sqrt(alpha_bar) is 0.006: float32 error is amplified ~160x there
    assert torch.allclose(x0_hat[:5], x0[:5], atol=1e-5)
    assert torch.allclose(x0_hat[5], x0[5], atol=1e-3)
    assert torch.allclose(linear.predict_eps(x_t, t, x0), eps, atol=1e-4)


def test_eps_x0_v_round_trips(linear, gen):
    x0 = torch.rand(5, 3, 4, 4, generator=gen) * 2 - 1
    t = torch.tensor([0, 50, 300, 700, 990])
    x_t, eps = linear.q_sample(x0, t, generator=gen)
    v = linear.velocity(x0, t, eps)
    ab = linear.float64("alpha_bars")[t].view(-1, 1, 1, 1)
    assert torch.allclose(v.double(), ab.sqrt() * eps.double() - (1 - ab).sqrt() * x0.double(), atol=1e-6)
    assert torch.allclose(linear.x0_from_v(x_t, t, v), x0, atol=1e-5)
    assert torch.allclose(linear.eps_from_v(x_t, t, v), eps, atol=1e-5)
    assert torch.allclose(linear.predict_eps(x_t, t, linear.x0_from_v(x_t, t, v)), eps, atol=2e-4)
    # v is unit-variance for unit-variance x0 and eps: the reason v-prediction is well scaled
    big = torch.randn(20000, 1, generator=gen)
    noise = torch.randn(20000, 1, generator=gen)
    assert linear.velocity(big, 500, noise).var().item() == pytest.approx(1.0, abs=0.05)


def test_to_device_keeps_values(linear):
    moved = linear.to("cpu")
    assert torch.equal(moved.alpha_bars, linear.alpha_bars) and moved.T == linear.T


@pytest.mark.parametrize("betas", [[1.0, 0.1], [0.1, 1.5], [0.0, 0.1], [-0.1], [0.1, float("nan")], [[0.1, 0.2]], []])
def test_bad_betas_raise(betas):
    with pytest.raises(ValueError):
        NoiseSchedule(torch.tensor(betas))


@pytest.mark.parametrize("kwargs", [dict(T=0), dict(T=10.5), dict(beta_start=0.0), dict(beta_end=1.5)])
def test_bad_linear_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        NoiseSchedule.linear(**kwargs)


def test_bad_timesteps_and_shapes_raise(linear):
    x0 = torch.zeros(2, 1, 4, 4)
    for t in (1000, -1, torch.tensor([0, 1000]), torch.tensor([0.5, 1.0]), torch.zeros(2, 2, dtype=torch.long),
              torch.tensor([1, 2, 3]), True):
        with pytest.raises(ValueError):
            linear.q_sample(x0, t)
    with pytest.raises(ValueError, match="t in 0..999|lie in 0..999"):
        linear.q_sample(x0, 1000)
    with pytest.raises(ValueError, match="shapes must match"):
        linear.q_sample(x0, 3, torch.zeros(2, 1, 4, 5))
    with pytest.raises(ValueError, match="NaN"):
        linear.q_sample(torch.full((2, 1, 4, 4), float("nan")), 3)
    with pytest.raises(ValueError, match="shapes must match"):
        linear.posterior(x0, torch.zeros(3, 1, 4, 4), 1)
    with pytest.raises(ValueError, match="floating"):
        linear.q_sample(torch.zeros(2, 1, 4, 4, dtype=torch.long), 3)


def test_linear_betas_must_rise():
    with pytest.raises(ValueError, match="beta_start .* is larger than beta_end .* swap"):
        NoiseSchedule.linear(T=10, beta_start=0.02, beta_end=1e-4)
    constant = NoiseSchedule.linear(T=5, beta_start=0.01, beta_end=0.01)
    assert torch.equal(constant.betas, torch.full((5,), 0.01))


def test_betas_too_small_for_float64_are_refused():
    """1 - 1e-30 is 1 in float64: alpha_bar_0 = 1 and beta_tilde_1 = 0 / 0. Refused, with why."""
    with pytest.raises(ValueError, match=r"beta at step t=0 is 1e-30.*1 - beta rounds to 1"):
        NoiseSchedule(torch.tensor([1e-30, 0.1, 0.2], dtype=torch.float64))
    small = NoiseSchedule(torch.tensor([1e-15, 0.1, 0.2], dtype=torch.float64))   # small, but there
    for values in (small.beta_tilde, small.snr, small.log_snr, small.float64("beta_tilde")):
        assert torch.isfinite(values).all()


def test_alpha_bar_that_underflows_is_refused():
    with pytest.raises(ValueError, match="alpha_bar at the last step .* 0 in float32"):
        NoiseSchedule(torch.full((200,), 0.5))


def test_T_of_any_integer_type():
    np = pytest.importorskip("numpy")
    for T in (np.int64(50), np.int32(50), torch.tensor(50)):
        assert torch.equal(NoiseSchedule.linear(T).betas, NoiseSchedule.linear(50).betas)
        assert torch.equal(NoiseSchedule.cosine(T).betas, NoiseSchedule.cosine(50).betas)
    for T in (True, 50.0, "50"):
        with pytest.raises(ValueError, match="T .the number of diffusion steps. must be an int"):
            NoiseSchedule.linear(T)


def test_timesteps_that_are_not_integers_say_what_t_must_be(linear):
    x0 = torch.zeros(2, 1, 4, 4)
    for t in ("5", None, object()):
        with pytest.raises(ValueError, match=r"timestep t must be an integer in 0..999 or an int"):
            linear.q_sample(x0, t)
    with pytest.raises(ValueError, match="on one device"):
        linear.q_sample(x0, 3, torch.zeros(2, 1, 4, 4, device="meta"))
    with pytest.raises(ValueError, match="the schedule has no tensor 'alpha_bar'; it has betas"):
        linear.float64("alpha_bar")


# ----------------------------------------------------------------------------------------
# Zero terminal SNR (Lin et al. 2024, Algorithm 1)
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_rescaled_schedule_ends_in_pure_noise_and_keeps_its_first_step(kind):
    original = getattr(NoiseSchedule, kind)()
    rescaled = getattr(NoiseSchedule, kind)(zero_terminal_snr=True)
    assert rescaled.zero_terminal_snr and not original.zero_terminal_snr
    ab, ab_new = original.float64("alpha_bars"), rescaled.float64("alpha_bars")
    assert ab_new[-1].item() == 0.0 and rescaled.float64("betas")[-1].item() == 1.0      # exactly
    assert ab_new[0].item() == pytest.approx(ab[0].item(), rel=3e-16, abs=0)             # 1 ulp
    # sqrt(alpha_bar) is the paper's affine map of the original: shifted so the last value
    # is 0, scaled so the first is kept
    root, root_T, root_0 = ab.sqrt(), ab[-1].sqrt(), ab[0].sqrt()
    expected = (root - root_T) * root_0 / (root_0 - root_T)
    assert torch.allclose(ab_new.sqrt(), expected, rtol=1e-11, atol=1e-15)
    assert torch.equal(rescaled.float64("betas"), rescale_zero_terminal_snr(original.float64("betas")))
    # a valid schedule: alpha_bar falls strictly, every beta in (0, 1) but the last
    assert (ab_new[1:] < ab_new[:-1]).all() and (rescaled.float64("betas")[:-1] < 1).all()
    assert rescaled.alpha_bars[-2].item() > 0                                              # in float32 too


def test_zero_terminal_quantities_at_the_last_step():
    """SNR = 0, log-SNR = -inf (the truth), beta_tilde and the posterior finite; x0 from v is
    -v exactly, eps from v is x_t; the eps formulas are refused with a pointer to v."""
    sched = NoiseSchedule.linear(T=100, beta_start=1e-3, beta_end=0.05, zero_terminal_snr=True)
    T = sched.T
    assert sched.snr[-1].item() == 0.0 and sched.log_snr[-1].item() == -math.inf
    assert torch.isfinite(sched.log_snr[:-1]).all() and torch.isfinite(sched.beta_tilde).all()
    assert sched.float64("beta_tilde")[-1].item() == pytest.approx(1 - sched.float64("alpha_bars")[-2].item())
    g = torch.Generator().manual_seed(0)
    x0, eps, v = (torch.randn(3, 1, 2, 2, generator=g) for _ in range(3))
    x_t, _ = sched.q_sample(x0, T - 1, eps)
    assert torch.equal(x_t, eps)                                  # pure noise: no trace of x0
    assert torch.equal(sched.x0_from_v(x_t, T - 1, v), -v)
    assert torch.equal(sched.eps_from_v(x_t, T - 1, v), x_t)
    assert torch.equal(sched.velocity(x0, T - 1, eps), -x0)
    mean, var = sched.posterior(x0, x_t, T - 1)
    ab_prev = sched.float64("alpha_bars")[-2].item()
    assert torch.allclose(mean, math.sqrt(ab_prev) * x0, atol=1e-7) and torch.isfinite(var).all()
    for method in (sched.predict_x0, sched.reverse_mean):
        with pytest.raises(ValueError, match=r"alpha_bar = 0 \(zero terminal SNR\).*prediction='v'"):
            method(x_t, torch.tensor([5, T - 1, 7]), eps)
        assert torch.isfinite(method(x_t, T - 2, eps)).all()      # every other step as before


def test_only_the_last_beta_may_be_one():
    short = NoiseSchedule(torch.tensor([0.1, 1.0]))               # T = 2, zero terminal SNR
    assert short.zero_terminal_snr and short.alpha_bars.tolist() == [pytest.approx(0.9), 0.0]
    assert short.to("cpu").zero_terminal_snr
    with pytest.raises(ValueError, match=r"strictly between 0 and 1 \(the last may be 1.*found \[1.0\]"):
        NoiseSchedule(torch.tensor([1.0, 0.1]))
    # the float32 underflow is still refused before a last beta of 1, with the step named
    with pytest.raises(ValueError, match=r"alpha_bar at step t=199, before the last .* 0 in float32"):
        NoiseSchedule(torch.cat([torch.full((200,), 0.5), torch.ones(1)]))
    with pytest.raises(ValueError, match="at least 2 betas in"):
        rescale_zero_terminal_snr([0.1])
    with pytest.raises(ValueError, match="at least 2 betas in"):
        rescale_zero_terminal_snr(short.float64("betas"))       # already ends in pure noise
