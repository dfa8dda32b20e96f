"""Editing (ddpm_lib.editing, issue #20): SDEdit, inpainting and DDIM inversion, checked on
Gaussian data whose exact noise predictor is known, so every number below is a property of
the method and not of a network. Tolerances: each comment gives the value measured (float32,
the seeds below) and the margin."""
import math

import pytest
import torch

from ddpm_lib import NoiseSchedule
from ddpm_lib.analytic import gaussian_eps_predictor
from ddpm_lib.editing import (INPAINTING, ddim_invert, ddim_reconstruct, inpaint, repaint_step,
                              replace_step, sdedit)
from ddpm_lib.guidance import guided_model
from ddpm_lib.samplers import SAMPLERS, Sampler, Trajectory, ddim_step, ddim_timesteps, sample

MU, SIGMA_DATA = 0.3, 0.5


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gaussian_images(n: int, seed: int = 0, shape=(1, 4, 4)) -> torch.Tensor:
    """n images of independent N(MU, SIGMA_DATA^2) pixels."""
    return MU + SIGMA_DATA * torch.randn(n, *shape, generator=seeded(seed))


def alpha_bar(schedule, t: int) -> float:
    return schedule.float64("alpha_bars")[t].item()


def zero_eps(x_t, t):
    """A model that sees no noise anywhere: x0_hat = x_t / sqrt(alpha_bar)."""
    return torch.zeros_like(x_t)


# ----------------------------------------------------------------------------------------
# sample() takes a Sampler itself
# ----------------------------------------------------------------------------------------
def test_sample_runs_a_sampler_given_as_an_instance(linear):
    model = gaussian_eps_predictor(linear, MU, SIGMA_DATA)
    x_T = torch.randn(4, 1, 3, 3, generator=seeded(0))
    mine = Sampler(ddim_step, "my DDIM", 10, "time", {"eta": 0.0})          # not in SAMPLERS
    a = sample(model, linear, x_T.shape, sampler=mine, x_T=x_T)
    b = sample(model, linear, x_T.shape, sampler="ddim", steps=10, x_T=x_T)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="the my DDIM sampler has no option sigma; it takes eta"):
        sample(model, linear, x_T.shape, sampler=mine, sigma="beta")
    for bad in ["plms", 3, None, ["ddim"], ddim_step]:
        with pytest.raises(ValueError, match="sampler must be one of ddim, ddpm, .* or a Sampler, got"):
            sample(model, linear, x_T.shape, sampler=bad)


# ----------------------------------------------------------------------------------------
# SDEdit
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("t_start", [0, 10, 300])
def test_sdedit_noises_x0_to_t_start(linear, t_start):
    """With a model that predicts no noise, the DDIM steps keep x / sqrt(alpha_bar), so the
    output is x_{t_start} / sqrt(alpha_bar_{t_start}) = x0 + sqrt((1 - ab) / ab) z, z the
    generator's first draw: this pins the forward noising to exactly t_start (one timestep off
    changes the scale by 6% at t_start = 10). Measured: agreement to 1.5e-6 (float32)."""
    x0 = gaussian_images(8)
    out = sdedit(zero_eps, linear, x0, t_start, generator=seeded(1), clip_x0=False)
    z = torch.randn(x0.shape, generator=seeded(1))
    ab = alpha_bar(linear, t_start)
    assert torch.allclose(out, x0 + math.sqrt((1 - ab) / ab) * z, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sdedit_from_t_start_0_returns_nearly_the_input(linear, sampler):
    """One step of noise (std sqrt(beta_0) = 0.01), one step back: x0 up to about 0.01.
    Measured: rms 0.0100, max 0.042 over 16,000 pixels (both samplers)."""
    x0 = gaussian_images(1000)
    model = gaussian_eps_predictor(linear, MU, SIGMA_DATA)
    out = sdedit(model, linear, x0, 0, sampler=sampler, generator=seeded(1), clip_x0=False)
    assert (out - x0).pow(2).mean().sqrt() < 0.015 and (out - x0).abs().max() < 0.08


def test_sdedit_from_the_last_timestep_forgets_the_input(linear):
    """t_start = T-1 keeps sqrt(alpha_bar) = 0.006 of x0: the output has the data's statistics
    whatever the input (here every pixel -0.8). DDIM, 250 steps. Measured on 16,000 pixels:
    mean 0.300 (standard error 0.004), std 0.493 (-1.3%: DDIM's discretisation)."""
    x0 = torch.full((1000, 1, 4, 4), -0.8)
    model = gaussian_eps_predictor(linear, MU, SIGMA_DATA)
    out = sdedit(model, linear, x0, linear.T - 1, steps=250, generator=seeded(2), clip_x0=False)
    assert out.mean().item() == pytest.approx(MU, abs=5 * SIGMA_DATA / math.sqrt(out.numel()))
    assert out.std().item() == pytest.approx(SIGMA_DATA, rel=0.03)


def test_sdedit_stochastic_samples_the_posterior_deterministic_follows_the_flow(linear):
    """From images of constant c, noised to t_start = 300 (ab = alpha_bar, v = ab s^2 + 1 - ab):
    the reverse SDE (DDPM) draws from p(x0 | x_{t_start}), mean mu + s^2 ab (c - mu) / v;
    the ODE (DDIM) maps x_{t_start} through the flow, mean mu + s sqrt(ab) (c - mu) / sqrt(v).
    Stochastic SDEdit forgets more of the input. Measured: DDPM 0.1463 (exact 0.1462), std
    0.4950 (exact 0.4951); DDIM 50 steps -0.101 (exact -0.111: the 50-step discretisation)."""
    c, t_start = -0.8, 300
    x0 = torch.full((1000, 1, 4, 4), c)
    model = gaussian_eps_predictor(linear, MU, SIGMA_DATA)
    ab = alpha_bar(linear, t_start)
    v = ab * SIGMA_DATA**2 + 1 - ab
    sde = sdedit(model, linear, x0, t_start, sampler="ddpm", generator=seeded(2), clip_x0=False)
    ode = sdedit(model, linear, x0, t_start, sampler="ddim", generator=seeded(2), clip_x0=False)
    standard_error = SIGMA_DATA / math.sqrt(x0.numel())
    assert sde.mean().item() == pytest.approx(MU + SIGMA_DATA**2 * ab * (c - MU) / v, abs=5 * standard_error)
    sde_std = math.sqrt(SIGMA_DATA**2 * (1 - ab) / v + SIGMA_DATA**4 * ab * (1 - ab) / v**2)
    assert sde.std().item() == pytest.approx(sde_std, rel=0.02)
    ode_mean = MU + SIGMA_DATA * math.sqrt(ab) * (c - MU) / math.sqrt(v)
    assert ode.mean().item() == pytest.approx(ode_mean, abs=0.03)


def test_sdedit_with_a_guided_model_edits_towards_another_class(linear):
    """A class-conditional toy (class k: pixels N(mu_k, 0.2^2), exact predictor), images of
    class 0 edited towards class 1 through guided_model: the larger t_start, the further.
    Measured means: -0.49, 0.02, 0.37, 0.48, 0.51 for the t_start below."""
    predictors = [gaussian_eps_predictor(linear, mu, 0.2) for mu in (-0.5, 0.5)]

    def conditional(x_t, t, y):                    # w = 1: guided_model passes the class y alone
        assert (y == y[0]).all()
        return predictors[int(y[0])](x_t, t)

    x0 = -0.5 + 0.2 * torch.randn(64, 1, 2, 2, generator=seeded(0))
    to_class_1 = guided_model(conditional, y=1, w=1.0, null_class=2)     # 2: "no class", unused at w = 1
    means = [sdedit(to_class_1, linear, x0, t, steps=min(20, t + 1), generator=seeded(1),
                    clip_x0=False).mean().item() for t in (0, 100, 300, 600, 999)]
    assert means[0] == pytest.approx(-0.5, abs=0.05) and means[-1] == pytest.approx(0.5, abs=0.05)
    assert all(a < b for a, b in zip(means, means[1:])), means


def test_sdedit_explains_bad_input(linear):
    x0 = gaussian_images(2)
    for kwargs, message in [(dict(t_start=-1), r"t_start must be a timestep in 0\.\.999"),
                            (dict(t_start=1000), r"t_start must be a timestep in 0\.\.999"),
                            (dict(t_start=2.5), "t_start must be an integer"),
                            (dict(t_start=10, steps=12), r"steps must be at most t_start \+ 1 = 11"),
                            (dict(t_start=10, steps=0), "steps must be an integer >= 1"),
                            (dict(t_start=10, timesteps=[10, 0]), "sdedit sets timesteps itself"),
                            (dict(t_start=10, x_T=x0), "sdedit sets x_T itself"),
                            (dict(t_start=10, sampler="plms"), "sampler must be one of"),
                            (dict(t_start=10, eta=2.0), r"eta must lie in \[0, 1\]")]:
        with pytest.raises(ValueError, match=message):
            sdedit(zero_eps, linear, x0, **kwargs)
    for bad, message in [(x0.long(), "x0 must be a floating-point tensor of images"),
                         ([0.1, 0.2], "x0 must be a floating-point tensor"),
                         (x0 * float("nan"), "x0 contains NaN")]:
        with pytest.raises(ValueError, match=message):
            sdedit(zero_eps, linear, bad, 10)


# ----------------------------------------------------------------------------------------
# Inpainting
# ----------------------------------------------------------------------------------------
def left_half_known(shape=(1, 1, 4, 4)) -> torch.Tensor:
    mask = torch.zeros(shape)
    mask[..., :2] = 1.0
    return mask


def test_replace_step_is_a_ddpm_step_then_the_noised_data(linear):
    """One step by hand in float64 (Ho et al. 2020, Algorithm 2, then q_sample at t_prev), on a
    respaced pair (t, t_prev) = (500, 480); the step's noise is the generator's first draw,
    the known region's its second. After the last step the known pixels are x_known exactly.
    Measured: agreement to 5e-7."""
    g = seeded(3)
    x_t, eps, x_known = (torch.randn(3, 1, 2, 2, generator=g) for _ in range(3))
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(1, 1, 2, 2)
    t, t_prev = 500, 480
    x0_hat = linear.predict_x0(x_t, t, eps)
    out = replace_step(linear, x_t, t, t_prev, eps, x0_hat, state={}, generator=seeded(7),
                       x_known=x_known, mask=mask)
    g = seeded(7)
    z_step = torch.randn(x_t.shape, generator=g).double()             # the DDPM step's noise, then ...
    z_known = torch.randn(x_t.shape, generator=g).double()            # ... q_sample's
    ab, ab_prev = alpha_bar(linear, t), alpha_bar(linear, t_prev)
    alpha = ab / ab_prev
    x_prev = (x_t.double() - (1 - alpha) / math.sqrt(1 - ab) * eps.double()) / math.sqrt(alpha) \
        + math.sqrt(1 - alpha) * z_step
    known = math.sqrt(ab_prev) * x_known.double() + math.sqrt(1 - ab_prev) * z_known
    assert torch.allclose(out.x_prev.double(), mask * known + (1 - mask) * x_prev, atol=1e-5)
    last = replace_step(linear, x_t, 0, -1, eps, x0_hat, state={}, generator=seeded(7),
                        x_known=x_known, mask=mask)
    known_pixels = mask.expand_as(x_t).bool()
    assert torch.equal(last.x_prev[known_pixels], x_known[known_pixels])


def test_repaint_step_renoises_one_step_back_up_and_redoes_it(linear):
    """U = 3 passes: between them x_t = sqrt(alpha) x_prev + sqrt(1 - alpha) z with
    alpha = alpha_bar_t / alpha_bar_prev (the merged forward step of the grid), z the next
    draw, and the model called again at t; the result is the last pass. Replayed here with
    replace_step (checked above) and the same generator. Measured: agreement to 1e-6."""
    g = seeded(3)
    x_t, x_known = torch.randn(3, 1, 2, 2, generator=g), torch.randn(3, 1, 2, 2, generator=g)
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]]).reshape(1, 1, 2, 2)
    t, t_prev = 500, 480
    model = gaussian_eps_predictor(linear, MU, SIGMA_DATA)
    seen = []

    def denoise(x, t_at):
        seen.append((t_at, x.clone()))
        eps = model(x, torch.full((x.shape[0],), t_at))
        return eps, linear.predict_x0(x, t_at, eps)

    eps, x0_hat = denoise(x_t, t)
    seen.clear()
    common = dict(state={}, x_known=x_known, mask=mask)
    out = repaint_step(linear, x_t, t, t_prev, eps, x0_hat, denoise=denoise, generator=seeded(7),
                       resample=3, **common)
    calls, seen[:] = list(seen), []
    assert [t_at for t_at, _ in calls] == [t, t]
    g, alpha = seeded(7), alpha_bar(linear, t) / alpha_bar(linear, t_prev)
    expected = replace_step(linear, x_t, t, t_prev, eps, x0_hat, generator=g, **common)
    for _, x_again in calls:
        z = torch.randn(x_t.shape, generator=g)
        renoised = math.sqrt(alpha) * expected.x_prev + math.sqrt(1 - alpha) * z
        assert torch.allclose(x_again, renoised, atol=1e-6)
        eps, x0_hat = denoise(x_again, t)
        expected = replace_step(linear, x_again, t, t_prev, eps, x0_hat, generator=g, **common)
    assert torch.allclose(out.x_prev, expected.x_prev, atol=1e-6)
    seen.clear()
    repaint_step(linear, x_t, 0, -1, eps, x0_hat, denoise=denoise, resample=3, **common)
    assert not seen                                # the last step is done once


def test_repaint_with_one_pass_is_replace(linear):
    model = gaussian_eps_predictor(linear, MU, SIGMA_DATA)
    x_known, mask = gaussian_images(16), left_half_known()
    a = inpaint(model, linear, x_known, mask, method="replace", steps=20, generator=seeded(4))
    b = inpaint(model, linear, x_known, mask, method="repaint", resample=1, steps=20, generator=seeded(4))
    assert torch.equal(a, b)
    c = inpaint(model, linear, x_known, mask, method="repaint", resample=2, steps=20, generator=seeded(4))
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("method", ["replace", "repaint"])
def test_known_pixels_follow_the_forward_process(linear, method):
    """At every timestep the sampler visits, the known pixels are x_t ~ q(x_t | x_known):
    (x_t - sqrt(ab_t) x_known) / sqrt(1 - ab_t) has mean 0 and std 1 (4,000 values per
    timestep, standard errors 0.016 and 0.011; 50 timesteps; measured: |mean| <= 0.037, std
    within 0.973..1.038). A re-noise to the wrong timestep or without noise breaks it (std 0,
    or far from 1 at small t). After the last step: x_known exactly."""
    model = gaussian_eps_predictor(linear, MU, SIGMA_DATA)
    x_known, mask = gaussian_images(500), left_half_known()
    traj = Trajectory()
    out = inpaint(model, linear, x_known, mask, method=method, resample=2 if method == "repaint" else None,
                  steps=50, clip_x0=False, generator=seeded(5), trajectory=traj)
    assert traj.t == ddim_timesteps(linear.T, 50)
    known = mask.expand_as(x_known).bool()
    for t, x_t in zip(traj.t, traj.x_t):
        ab = alpha_bar(linear, t)
        r = ((x_t - math.sqrt(ab) * x_known) / math.sqrt(1 - ab))[known]
        assert abs(r.mean().item()) < 0.07 and 0.94 < r.std().item() < 1.06, (t, r.mean(), r.std())
    assert torch.equal(out[known], x_known[known])


def test_the_hole_of_independent_gaussian_pixels_is_the_data(linear):
    """Independent pixels: the hole is N(mu, s^2) whatever is known. 100 respaced DDPM steps,
    4,000 hole pixels. Measured: mean 0.299 (standard error 0.008), std 0.510 (+1.9%)."""
    model = gaussian_eps_predictor(linear, MU, SIGMA_DATA)
    x_known, mask = gaussian_images(500), left_half_known()
    hole = inpaint(model, linear, x_known, mask, steps=100, clip_x0=False, generator=seeded(1))[..., 2:]
    assert hole.mean().item() == pytest.approx(MU, abs=5 * SIGMA_DATA / math.sqrt(hole.numel()))
    assert hole.std().item() == pytest.approx(SIGMA_DATA, rel=0.04)


def equicorrelated_eps_predictor(schedule, mu: float, shared: float, own: float):
    """The exact E[eps | x_t] for images x0 = mu + shared * c + own * n, c ~ N(0, 1) one number
    per image and n ~ N(0, I) one per pixel: Sigma = shared^2 11^T + own^2 I over D pixels, so
    Cov(x_t) = ab Sigma + (1 - ab) I = a 11^T + b I with a = ab shared^2, b = ab own^2 + 1 - ab,
    and E[eps | x_t] = sqrt(1 - ab) Cov(x_t)^-1 (x_t - sqrt(ab) mu), inverted by
    Sherman-Morrison: (b I + a 11^T)^-1 y = (y - a sum(y) / (b + D a)) / b."""
    def eps_model(x_t, t):
        ab = schedule.at("alpha_bars", t, x_t)                            # (B, 1, 1, 1), float64
        y = x_t.double() - ab.sqrt() * mu
        a, b = ab * shared**2, ab * own**2 + 1 - ab
        total = y.flatten(1).sum(1).reshape(ab.shape)
        return ((1 - ab).sqrt() * (y - a * total / (b + x_t[0].numel() * a)) / b).float()
    return eps_model


def test_repaint_harmonises_where_replacement_does_not(linear):
    """2 x 2 images with strongly correlated pixels (shared std 0.5, own 0.2, mu 0.1); the two
    top pixels known (0.9, 0.7). The exact conditional of each hole pixel: mean 0.748, std
    0.242 (Gaussian conditioning, computed below). Replacement never lets the known pixels
    steer the hole, and lands short; RePaint's resampling does (50 steps, U = 10).
    Measured: replace mean 0.529 (std 0.32), RePaint 0.723 (std 0.252, +4%)."""
    mu, shared, own = 0.1, 0.5, 0.2
    model = equicorrelated_eps_predictor(linear, mu, shared, own)
    sigma = shared**2 * torch.ones(4, 4, dtype=torch.float64) + own**2 * torch.eye(4, dtype=torch.float64)
    k, h = [0, 1], [2, 3]
    x_k = torch.tensor([0.9, 0.7], dtype=torch.float64)
    gain = sigma[h][:, k] @ torch.linalg.inv(sigma[k][:, k])
    exact_mean = (mu + gain @ (x_k - mu))[0].item()
    exact_std = (sigma[h][:, h] - gain @ sigma[k][:, h]).diagonal().sqrt()[0].item()
    x_known = torch.zeros(1000, 1, 2, 2)
    x_known[:, 0, 0] = torch.tensor([0.9, 0.7])
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]]).reshape(1, 1, 2, 2)
    holes = {method: inpaint(model, linear, x_known, mask, method=method, steps=50, clip_x0=False,
                             generator=seeded(0))[:, 0, 1] for method in ("replace", "repaint")}
    replace_error = abs(holes["replace"].mean().item() - exact_mean)
    repaint_error = abs(holes["repaint"].mean().item() - exact_mean)
    assert replace_error > 0.1 and repaint_error < 0.05 and repaint_error < 0.25 * replace_error
    assert holes["repaint"].std().item() == pytest.approx(exact_std, rel=0.1)


def test_inpaint_explains_bad_input(linear):
    x_known = gaussian_images(2)
    half = left_half_known()
    for kwargs, message in [(dict(mask=torch.ones(3, 1, 4, 4)), r"mask has shape \(3, 1, 4, 4\), which does"),
                            (dict(mask=torch.ones(4, 4, 4)), "does not broadcast to x_known's"),
                            (dict(mask=2 * half), r"mask values must lie in \[0, 1\]"),
                            (dict(mask=half - 0.5), r"mask values must lie in \[0, 1\]"),
                            (dict(mask=[[1, 0]]), "mask must be a tensor"),
                            (dict(mask=half, method="blend"), "method must be 'replace' or 'repaint'"),
                            (dict(mask=half, resample=5), "resample .* is RePaint's"),
                            (dict(mask=half, method="repaint", resample=0),
                             r"resample \(RePaint's U.*must be an integer >= 1"),
                            (dict(mask=half, sigma="small"), "sigma must be 'beta' or 'beta_tilde'")]:
        with pytest.raises(ValueError, match=message):
            inpaint(zero_eps, linear, x_known, steps=2, **kwargs)
    with pytest.raises(ValueError, match="x_known contains NaN"):
        inpaint(zero_eps, linear, x_known * float("nan"), left_half_known(), steps=2)
    # the checks run in the driver too, for the entries used directly
    with pytest.raises(ValueError, match=r"mask values must lie in \[0, 1\]"):
        sample(zero_eps, linear, x_known.shape, sampler=INPAINTING["replace"], steps=2,
               x_known=x_known, mask=torch.full((1, 1, 4, 4), 255.0))
    # a bool mask and one mask for all images are fine
    out = inpaint(zero_eps, linear, x_known, left_half_known((4, 4)).bool(), steps=2, generator=seeded(0))
    assert torch.equal(out[..., :2], x_known[..., :2])


# ----------------------------------------------------------------------------------------
# DDIM inversion
# ----------------------------------------------------------------------------------------
def test_inversion_is_exact_when_eps_is_constant_along_the_path(linear):
    """A model that returns the same eps everywhere: every DDIM step keeps x0_hat = x0, so the
    inversion lands on q_sample(x0, T-1, eps) and sampling returns x0, with 3 steps as with
    1000. Measured: x_T to 1.2e-7; x0 back to 2.1e-5 (float32 rounding of x_T, divided by
    sqrt(alpha_bar_{T-1}) = 0.0064)."""
    eps = torch.randn(4, 1, 4, 4, generator=seeded(3))
    x0 = 0.5 * torch.randn(4, 1, 4, 4, generator=seeded(4))
    x_T = ddim_invert(lambda x, t: eps, linear, x0, 3)
    assert torch.allclose(x_T, linear.q_sample(x0, linear.T - 1, eps)[0], atol=2e-6)
    assert torch.allclose(ddim_reconstruct(lambda x, t: eps, linear, x_T, 3), x0, atol=2e-4)


def test_inversion_of_gaussian_data_drifts_at_first_order_and_is_affine(linear):
    """Exact predictor of N(mu, s^2) pixels. eps is then affine in x_t, so each DDIM step and
    the whole inversion is an affine map x0 -> x_T = k x0 + d; the probability-flow ODE keeps
    the quantile, k = sqrt(v_T) / s, d = sqrt(ab_T) mu - k mu (v_T = ab_T s^2 + 1 - ab_T), so
    std(x_T) = sqrt(v_T) std(x0) / s. Measured at 50 / 100 / 200 steps (16,000 pixels):
    round-trip max error 0.236 / 0.120 / 0.061, slope k off by 5.6% / 2.8% / 1.4%: both halve
    as the steps double (Euler, first order); the affine fit's residual 5e-6."""
    model = gaussian_eps_predictor(linear, MU, SIGMA_DATA)
    x0 = gaussian_images(1000)
    ab = alpha_bar(linear, linear.T - 1)
    v = ab * SIGMA_DATA**2 + 1 - ab
    k_ode = math.sqrt(v) / SIGMA_DATA
    design = torch.stack([x0.flatten().double(), torch.ones(x0.numel(), dtype=torch.float64)], 1)
    round_trip, slope_error = [], []
    for steps in (50, 100, 200):
        x_T = ddim_invert(model, linear, x0, steps)
        k, d = torch.linalg.lstsq(design, x_T.flatten().double()[:, None]).solution.flatten().tolist()
        assert (design @ torch.tensor([k, d], dtype=torch.float64) - x_T.flatten()).abs().max() < 1e-4
        round_trip.append((ddim_reconstruct(model, linear, x_T, steps) - x0).abs().max().item())
        slope_error.append(abs(k / k_ode - 1))
    assert round_trip[2] < 0.08 and slope_error[2] < 0.025, (round_trip, slope_error)
    assert d == pytest.approx(math.sqrt(ab) * MU - k_ode * MU, abs=0.02)        # measured -0.5897 vs -0.5981
    assert x_T.std().item() == pytest.approx(k_ode * x0.std().item(), rel=0.025)  # measured -1.4%
    for errors in (round_trip, slope_error):
        assert 0.4 < errors[1] / errors[0] < 0.6 and 0.4 < errors[2] / errors[1] < 0.6, errors


def test_inversion_grid_trajectory_and_arguments(linear):
    """The grid climbed is the sampling grid reversed; the trajectory records it clean to
    noisy and ends at the returned x_T; reconstruction is sample(sampler="ddim") on that grid."""
    model = gaussian_eps_predictor(linear, MU, SIGMA_DATA)
    x0 = gaussian_images(4)
    traj = Trajectory()
    x_T = ddim_invert(model, linear, x0, timesteps=[999, 500, 100, 0], trajectory=traj)
    assert traj.t == [0, 100, 500, 999] and torch.equal(traj.x_t[-1], x_T)
    back = ddim_reconstruct(model, linear, x_T, timesteps=[999, 500, 100, 0])
    assert torch.equal(back, sample(model, linear, x0.shape, sampler="ddim", timesteps=[999, 500, 100, 0],
                                    x_T=x_T, clip_x0=False))
    default = Trajectory()
    ddim_invert(model, linear, x0, trajectory=default)
    assert default.t == ddim_timesteps(linear.T, 50)[::-1]
    for kwargs, message in [(dict(prediction="score"), "prediction must be 'eps', 'x0' or 'v'"),
                            (dict(steps=0), "steps must be an integer >= 1"),
                            (dict(timesteps=[0, 999]), "strictly decreasing"),
                            (dict(trajectory=traj), r"new Trajectory\(\)")]:
        with pytest.raises(ValueError, match=message):
            ddim_invert(model, linear, x0, **kwargs)
    with pytest.raises(ValueError, match="x0 must be a floating-point tensor of images"):
        ddim_invert(model, linear, x0.flatten())
