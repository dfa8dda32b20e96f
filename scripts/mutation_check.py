"""Check that the tests guard the formulas: break one formula at a time in a copy of the
repository and run the tests; every mutation must make at least one test fail.

    python scripts/mutation_check.py            # unit tests only
    python scripts/mutation_check.py --chapters # also the chapters under nbval (slower)

Prints one line per mutation: which tests caught it. Exit status 1 if any survived.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (name, file, original text, mutated text)
MUTATIONS = [
    ("closed form: sqrt(alpha_bar) -> alpha_bar", "ddpm_lib/diffusion.py",
     "return torch.sqrt(alpha_bar) * x0 + torch.sqrt(1.0 - alpha_bar) * eps",
     "return alpha_bar * x0 + torch.sqrt(1.0 - alpha_bar) * eps"),
    ("one step: sqrt(1 - beta) -> (1 - beta)", "ddpm_lib/diffusion.py",
     "return torch.sqrt(1.0 - beta) * x_prev + torch.sqrt(beta) * eps",
     "return (1.0 - beta) * x_prev + torch.sqrt(beta) * eps"),
    ("posterior mean: alpha_bar_prev -> alpha_bar in the x0 coefficient", "ddpm_lib/diffusion.py",
     "return (torch.sqrt(alpha_bar_prev) * beta / (1.0 - alpha_bar) * x0",
     "return (torch.sqrt(alpha_bar) * beta / (1.0 - alpha_bar) * x0"),
    ("posterior mean: drop sqrt on alpha in the x_t coefficient", "ddpm_lib/diffusion.py",
     "+ torch.sqrt(alpha) * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * x_t)",
     "+ alpha * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * x_t)"),
    ("posterior variance: beta_tilde -> beta", "ddpm_lib/diffusion.py",
     "return (1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * beta",
     "return beta"),
    ("x0 from eps: sign", "ddpm_lib/diffusion.py",
     "return (x_t - torch.sqrt(1.0 - alpha_bar) * eps) / torch.sqrt(alpha_bar)",
     "return (x_t + torch.sqrt(1.0 - alpha_bar) * eps) / torch.sqrt(alpha_bar)"),
    ("v: swap the roles of eps and x0", "ddpm_lib/diffusion.py",
     "return torch.sqrt(alpha_bar) * eps - torch.sqrt(1.0 - alpha_bar) * x0",
     "return torch.sqrt(alpha_bar) * x0 - torch.sqrt(1.0 - alpha_bar) * eps"),
    ("reverse mean: beta / sqrt(1 - alpha_bar) -> beta / (1 - alpha_bar)", "ddpm_lib/diffusion.py",
     "return (x_t - beta / torch.sqrt(1.0 - alpha_bar) * eps) / torch.sqrt(alpha)",
     "return (x_t - beta / (1.0 - alpha_bar) * eps) / torch.sqrt(alpha)"),
    ("ELBO weight: drop the factor 2", "ddpm_lib/diffusion.py",
     "return beta ** 2 / (2.0 * sigma2 * alpha * (1.0 - alpha_bar))",
     "return beta ** 2 / (sigma2 * alpha * (1.0 - alpha_bar))"),
    ("alpha_bar: cumsum instead of cumprod", "ddpm_lib/schedules.py",
     "alpha_bars = torch.cumprod(alphas, dim=0)",
     "alpha_bars = 1 - torch.cumsum(betas, dim=0).clamp(max=0.9999)"),
    ("alpha_bars_prev shifted the wrong way", "ddpm_lib/schedules.py",
     "alpha_bars_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bars[:-1]])",
     "alpha_bars_prev = torch.cat([alpha_bars[1:], alpha_bars[-1:]])"),
    ("cosine schedule: drop the offset s", "ddpm_lib/schedules.py",
     "f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2",
     "f = torch.cos(steps * math.pi / 2) ** 2"),
    ("DDPM sampler: noise on the last step too", "ddpm_lib/samplers.py",
     "if t_prev < 0:                       # the last step returns the mean: no noise",
     "if False:                            # the last step returns the mean: no noise"),
    ("DDPM sampler: sigma uses beta_tilde when asked for beta", "ddpm_lib/samplers.py",
     'variance = beta if sigma == "beta" else (1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * beta',
     "variance = (1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * beta"),
    ("DDIM: sigma without eta", "ddpm_lib/samplers.py",
     "sigma = eta * math.sqrt(", "sigma = math.sqrt("),
    ("samplers: alpha_bar after the last step is not 1 (the last DDIM/DDPM step)", "ddpm_lib/samplers.py",
     'return float(schedule.float64("alpha_bars")[t]) if t >= 0 else 1.0',
     'return float(schedule.float64("alpha_bars")[max(t, 0)])'),
    ("clipping: eps not re-derived", "ddpm_lib/samplers.py",
     "    if clip_x0 or eps is None:\n", "    if eps is None:\n"),
    ("EMA: no warm-up", "ddpm_lib/ema.py",
     "return min(self.decay, (1 + n) / (10 + n))", "return self.decay"),
    ("time embedding: cos replaced by sin", "ddpm_lib/layers.py",
     "torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)",
     "torch.cat([torch.sin(angles), torch.sin(angles)], dim=1)"),
    ("training resume: RNG state not restored", "ddpm_lib/train.py",
     "    run.gens.load_state_dict(state[\"rng\"])\n", "\n"),
    ("DPM-Solver++(2M): 1/(2r) -> 1/r in the second-order combination", "ddpm_lib/samplers.py",
     'x0_2m = (1.0 + 0.5 / r) * x0_hat - (0.5 / r) * state["x0_last"]',
     'x0_2m = (1.0 + 1.0 / r) * x0_hat - (1.0 / r) * state["x0_last"]'),
    ("DPM-Solver++: expm1(-h) -> expm1(h)", "ddpm_lib/samplers.py",
     "(b_prev / b) * x_t - a_prev * math.expm1(-h) * x0_2m",
     "(b_prev / b) * x_t - a_prev * math.expm1(h) * x0_2m"),
    ("Frechet distance: drop the 2 in the trace term", "ddpm_lib/metrics.py",
     "- 2.0 * trace_sqrt_product(sigma1, sigma2)",
     "- trace_sqrt_product(sigma1, sigma2)"),
    ("guidance: swap the conditional and unconditional predictions", "ddpm_lib/guidance.py",
     "return (1.0 - w) * eps_uncond + w * eps_cond",
     "return (1.0 - w) * eps_cond + w * eps_uncond"),
    ("KID: biased estimate (keep the diagonal)", "ddpm_lib/metrics.py",
     "sum_xx = k_xx.sum() - k_xx.diagonal().sum()",
     "sum_xx = k_xx.sum()"),
    ("fp16 resume: loss scale not restored", "ddpm_lib/train.py",
     "        run.scaler.load_state_dict(state[\"scaler\"])\n", "        pass\n"),
    ("hflip: never flips", "ddpm_lib/train.py",
     "x0 = torch.where(flip[shard].to(device).view(-1, 1, 1, 1), x0.flip(-1), x0)", "x0 = x0"),
    ("mixture eps predictor: responsibilities ignore the mixture weights", "ddpm_lib/analytic.py",
     "log_r = (weights.log() -", "log_r = (0 * weights -"),
    ("likelihood decoder: bins twice as wide", "ddpm_lib/likelihood.py",
     "BIN_HALF_WIDTH = 1.0 / 255.0", "BIN_HALF_WIDTH = 2.0 / 255.0"),
    ("likelihood decoder: the lowest bin not stretched to -infinity", "ddpm_lib/likelihood.py",
     "lo = torch.where(level == 0, torch.full_like(lo, -math.inf), lo)", "lo = lo"),
    ("likelihood decoder: mean of the last step taken as x_1 instead of mu_theta", "ddpm_lib/likelihood.py",
     "decoder = -_sum_per_image(discrete_gaussian_log_likelihood(x0, mean_theta, var.sqrt()))",
     "decoder = -_sum_per_image(discrete_gaussian_log_likelihood(x0, x_t, var.sqrt()))"),
    ("learning-rate warm-up: one step late", "ddpm_lib/runs.py",
     "min(1.0, (step + 1) / warmup_steps)", "min(1.0, step / warmup_steps)"),
    ("loss log: the mean of the logged window over one step too many", "ddpm_lib/runs.py",
     "sum(float(r) for r in self.running) / len(self.running)",
     "sum(float(r) for r in self.running) / (len(self.running) + 1)"),
    ("precision auto: fp16 on GPUs that have bf16", "ddpm_lib/accel.py",
     '    if gpu_has_bf16(device):\n        return "bf16"', '    if gpu_has_bf16(device):\n        return "fp16"'),
    ("DDP: every process keeps the first shard of the batch", "ddpm_lib/train.py",
     "shard = slice(rank * (B // world), (rank + 1) * (B // world))", "shard = slice(0, B // world)"),
    ("trusted_inputs does not switch the value checks off", "ddpm_lib/checks.py",
     "return not torch.compiler.is_compiling() and not _trusted.get()",
     "return not torch.compiler.is_compiling()"),
    ("v -> x0 (samplers): v added instead of subtracted", "ddpm_lib/diffusion.py",
     "return torch.sqrt(alpha_bar) * x_t - torch.sqrt(1.0 - alpha_bar) * v",
     "return torch.sqrt(alpha_bar) * x_t + torch.sqrt(1.0 - alpha_bar) * v"),
    ("v -> eps (samplers): sqrt(1 - alpha_bar) instead of sqrt(alpha_bar) on v", "ddpm_lib/diffusion.py",
     "return torch.sqrt(1.0 - alpha_bar) * x_t + torch.sqrt(alpha_bar) * v",
     "return torch.sqrt(1.0 - alpha_bar) * x_t + torch.sqrt(1.0 - alpha_bar) * v"),
    ("v target: sqrt(1 - alpha_bar) x0 added instead of subtracted", "ddpm_lib/objectives.py",
     "return x_t, schedule.velocity(x0, t, eps)",
     "return x_t, schedule.velocity(-x0, t, eps)"),
    ("min-SNR: the v weight divides by SNR, not SNR + 1", "ddpm_lib/objectives.py",
     "return clamped / (snr + 1.0)", "return clamped / snr"),
    ("min-SNR: the eps weight is not divided by SNR", "ddpm_lib/objectives.py",
     "        return clamped / snr\n", "        return clamped\n"),
    ("ELBO weights: sigma^2 = beta instead of beta_tilde", "ddpm_lib/objectives.py",
     'sigma2 = schedule.float64("beta_tilde").clone()', 'sigma2 = schedule.float64("betas").clone()'),
    ("ELBO weights: the x0 weight without the SNR factor", "ddpm_lib/objectives.py",
     'return {"eps": w_eps, "x0": w_eps * snr,', 'return {"eps": w_eps, "x0": w_eps,'),
    ("flow matching: the target velocity x0 - eps", "ddpm_lib/objectives.py",
     "return (1.0 - s) * x0 + s * eps, eps - x0", "return (1.0 - s) * x0 + s * eps, x0 - eps"),
    ("cross-attention: scale 1/d instead of 1/sqrt(d)", "ddpm_lib/layers.py",
     "scale = 1.0 / math.sqrt(d)", "scale = 1.0 / d"),
    ("cross-attention: no scale", "ddpm_lib/layers.py",
     "scores = q @ k.transpose(-2, -1) * scale", "scores = q @ k.transpose(-2, -1)"),
    ("inpainting: the known region re-noised to t, not t_prev", "ddpm_lib/editing.py",
     "known, _ = schedule.q_sample(x_known, t_prev, generator=generator)",
     "known, _ = schedule.q_sample(x_known, t, generator=generator)"),
    ("RePaint: the re-noising step without its noise", "ddpm_lib/editing.py",
     "x_t = math.sqrt(alpha) * out.x_prev + math.sqrt(1.0 - alpha) * z",
     "x_t = math.sqrt(alpha) * out.x_prev"),
    ("flow sampler: Heun's corrector takes the end slope alone", "ddpm_lib/flow.py",
     "x = x + (s_next - s) * 0.5 * (v + v_end)", "x = x + (s_next - s) * v_end"),
    ("flow: E[x0 | x] without the (1 - s) factor", "ddpm_lib/flow.py",
     "x0 = m + (1 - s) * sd[:, None] ** 2 * diff / var[..., None]",
     "x0 = m + sd[:, None] ** 2 * diff / var[..., None]"),
    ("Heun: the corrector takes the end slope alone (first order)", "ddpm_lib/sde.py",
     "y_prev = y + h * 0.5 * (eps + eps_end)", "y_prev = y + h * eps_end"),
    ("Euler-Maruyama: drift -beta x instead of -beta x / 2", "ddpm_lib/sde.py",
     "mean = x_t + beta * (x_t / 2 - score_term)", "mean = x_t + beta * (x_t - score_term)"),
    ("Euler-Maruyama: noise on the last step too", "ddpm_lib/sde.py",
     "    if t_prev < 0:\n        return StepOutput(mean, x0_hat)\n", "\n"),
    ("EDM grid: rho = 3 in the interior (the end points kept)", "ddpm_lib/sde.py",
     "lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)",
     "lo, hi = sigma_min ** (1.0 / 3), sigma_max ** (1.0 / 3)\n    rho = 3.0"),
    ("ODE likelihood: Gaussian probes instead of Rademacher signs", "ddpm_lib/likelihood.py",
     "return (2 * bits - 1).to(dtype)", "return torch.randn(bits.shape).to(dtype)"),
    ("ODE likelihood: Hutchinson without the second z (sum of z^T J)", "ddpm_lib/likelihood.py",
     "rows.append((zJ * z).flatten(1).double().sum(1))", "rows.append(zJ.flatten(1).double().sum(1))"),
    ("ODE likelihood: exact divergence sums a row of the Jacobian", "ddpm_lib/likelihood.py",
     "total = total + g.flatten(1)[:, j].double()", "total = total + g.flatten(1).sum(1).double()"),
    ("ODE likelihood: the divergence integral subtracted", "ddpm_lib/likelihood.py",
     "integral += h * 0.5 * (r * div + r_next * div_end)",
     "integral -= h * 0.5 * (r * div + r_next * div_end)"),
    ("ODE likelihood: Heun's state update takes the end slope alone", "ddpm_lib/likelihood.py",
     "xbar = xbar + (r_next - r) * 0.5 * (f + f_end)", "xbar = xbar + (r_next - r) * f_end"),
    ("ODE likelihood: no D/2 log(alpha_bar_T / alpha_bar_0) for x vs xbar", "ddpm_lib/likelihood.py",
     "log_scale = 0.5 * D * math.log(alpha_bar[-1] / alpha_bar[0])", "log_scale = 0.0"),
    ("ODE bits: bin width 1/255 instead of 2/255", "ddpm_lib/likelihood.py",
     "nats = D * math.log(0.5 / BIN_HALF_WIDTH)", "nats = D * math.log(1.0 / BIN_HALF_WIDTH)"),
    ("ODE bits: the Jacobian of x = sqrt(alpha_bar_0) y with the wrong sign", "ddpm_lib/likelihood.py",
     "nats = D * math.log(0.5 / BIN_HALF_WIDTH) - 0.5 * D * math.log(",
     "nats = D * math.log(0.5 / BIN_HALF_WIDTH) + 0.5 * D * math.log("),
    ("ODE bits: log q(x_1 | x0) with the wrong sign", "ddpm_lib/likelihood.py",
     "nats = part - 0.5 * _sum_per_image(noise**2) - 0.5 * D * \\",
     "nats = part + 0.5 * _sum_per_image(noise**2) + 0.5 * D * \\"),
    ("ODE bits: the probes' standard error not divided by P", "ddpm_lib/likelihood.py",
     "probe_standard_error=math.sqrt(probe_var / (P * n))",
     "probe_standard_error=math.sqrt(probe_var / n)"),
    ("mixture velocity: E[eps | x, k] without the factor s", "ddpm_lib/flow.py",
     "eps = s * diff / var[..., None]", "eps = diff / var[..., None]"),
    ("mixture velocity: responsibilities ignore the weights", "ddpm_lib/flow.py",
     "log_r = (pi / pi.sum()).log()", "log_r = 0 * pi"),
    ("VP on the straight path: s = a / (a + b)", "ddpm_lib/flow.py",
     "return x_t / (a + b), b / (a + b)", "return x_t / (a + b), a / (a + b)"),
    ("velocity from v: (a - b) x_t", "ddpm_lib/flow.py",
     "return (b - a) * x_t + (a + b) * v", "return (a - b) * x_t + (a + b) * v"),
    ("flow_path: Heun's corrector takes the end slope alone", "ddpm_lib/flow.py",
     "v = 0.5 * (v + velocity(x_euler, s_next))", "v = velocity(x_euler, s_next)"),
    ("straightness: the velocity not compared with the chord", "ddpm_lib/flow.py",
     "excess = ((velocity - chord) ** 2).sum(-1)", "excess = (velocity**2).sum(-1)"),
    ("chord distance: to the line, not the segment", "ddpm_lib/flow.py",
     "nearest = z[0] + u.clamp(0, 1)[..., None] * chord", "nearest = z[0] + u[..., None] * chord"),
    ("zero terminal SNR: sqrt(alpha_bar) shifted by half its last value", "ddpm_lib/schedules.py",
     "root = (root - root[-1]) / (root[0] - root[-1]) * root[0]",
     "root = (root - 0.5 * root[-1]) / (root[0] - root[-1]) * root[0]"),
    ("zero terminal SNR: the rescale does not keep the first sqrt(alpha_bar)", "ddpm_lib/schedules.py",
     "root = (root - root[-1]) / (root[0] - root[-1]) * root[0]",
     "root = (root - root[-1]) / (root[0] - root[-1])"),
    ("zero terminal SNR: DDPM's first step from pure noise without sqrt(alpha_bar_prev)", "ddpm_lib/samplers.py",
     "else math.sqrt(alpha_bar_prev) * x0_hat)", "else x0_hat)"),
    ("zero terminal SNR: the ELBO's x0 weight as kappa * SNR (inf * 0 at SNR = 0)", "ddpm_lib/objectives.py",
     'kappa_x0 = beta**2 * schedule.float64("alpha_bars_prev") / (2.0 * sigma2 * (1.0 - alpha_bar) ** 2)',
     "kappa_x0 = kappa * alpha_bar / (1.0 - alpha_bar)"),
    ("zero terminal SNR: the ELBO's v weight without 1 / (SNR + 1)", "ddpm_lib/objectives.py",
     'return {"x0": w_x0, "v": w_x0 / (snr + 1.0)}[prediction]', 'return {"x0": w_x0, "v": w_x0}[prediction]'),
]


def run(cmd, cwd, env) -> tuple[bool, str]:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    failed = sorted({line.split(" ", 1)[1].split(" - ")[0]
                     for line in r.stdout.splitlines() if line.startswith(("FAILED", "ERROR")) and "::" in line})
    return r.returncode != 0, ", ".join(failed[:6]) + (" ..." if len(failed) > 6 else "")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--chapters", action="store_true", help="also run the chapters under nbval")
    p.add_argument("--only", nargs="*", default=None,
                   help="run only these test paths (e.g. chapters/03_mathematics.ipynb) instead of all")
    p.add_argument("-k", nargs="*", default=None, help="only mutations whose name contains one of these")
    args = p.parse_args()
    survived = tried = 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "repo"
        shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns("_build", "runs", ".git", ".gpu", "checkpoints", "dist"))
        env = {**os.environ, "PYTHONPATH": str(work), "DDPM_PROFILE": "smoke"}
        targets = ["tests", "--ignore=tests/test_book_build.py", "--ignore=tests/test_cli.py"]
        if args.chapters:
            targets += ["chapters"]
        if args.only:
            targets = list(args.only)
        if args.chapters or any(t.endswith(".ipynb") for t in targets):
            targets += ["--nbval", "--nbval-sanitize-with", "tests/nbval_sanitize.cfg", "--nbval-current-env"]
        for name, rel, old, new in MUTATIONS:
            if args.k and not any(k in name for k in args.k):
                continue
            path = work / rel
            original = path.read_text()
            if old not in original:
                print(f"?? {name}: the original text is not in {rel} (update this script)")
                survived += 1
                tried += 1
                continue
            tried += 1
            path.write_text(original.replace(old, new, 1))
            try:
                caught, by = run([sys.executable, "-m", "pytest", "-q", "-x",
                                  "-p", "no:cacheprovider", *targets], work, env)
            finally:
                path.write_text(original)
            survived += not caught
            print(f"{'caught ' if caught else 'SURVIVED'} {name}: {by}", flush=True)
    print(f"{tried - survived} of {tried} mutations caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
