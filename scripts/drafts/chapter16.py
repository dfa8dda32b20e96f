"""DRAFT, not part of the book yet: the generator of chapters/16_training_recipes.ipynb (#22).
Cells marked TODO need the ablation's full results (ddpm_lib/results/ablation_cpu.json);
the next session turns this into the notebook and deletes it."""
import json
import sys
from pathlib import Path

cells = []


def md(text):
    cells.append(dict(cell_type="markdown", metadata={}, source=text.strip("\n")))


def code(text, tags=None, show=None):
    meta = {}
    if tags:
        meta["tags"] = list(tags)
    if show:
        meta["mystnb"] = {"code_prompt_show": show, "code_prompt_hide": "Hide the check"
                          if show.startswith("Checked") else "Hide the code"}
    cells.append(dict(cell_type="code", metadata=meta, source=text.strip("\n"),
                      execution_count=None, outputs=[]))


md(r"""
# 16. What a minute of training buys

{doc}`05_training` trained the book's U-Net with one recipe: predict the noise $\epsilon$,
weight every timestep alike ($L_\text{simple}$), the linear schedule, batch 128, learning rate
$5\cdot10^{-4}$ after 200 warm-up steps, an EMA of decay $0.999$. Every one of those choices
was argued for, none was tested against the alternatives that later papers proposed. On a GPU
the question is academic: the recipe gets there in a coffee break. On a laptop CPU it is not.
Training there is already close to the machine's arithmetic ceiling, so the only way to get
better samples in the same ten minutes is a recipe that gets more out of every FLOP.

This chapter runs the experiment the way the book runs everything. Each row of an ablation
changes **one** thing in the shipped recipe: what the network predicts, how the timesteps are
weighted, the noise schedule, the learning rate, warm-up, batch size and EMA, and the network's
width, depth and attention. Every row trains from the same seed on the same data for the same
ten minutes of wall clock on the same idle 2-core CPU, one after the other, and is scored the
same way (the Frechet distance of {doc}`07_evaluation`). Then the best changes are combined.

**In this chapter you will learn**

- why CPU training is bound by arithmetic, and what that leaves a recipe to improve;
- how to compare training recipes fairly: one change at a time, a wall-clock budget instead of
  a step count, one run after the other on an idle machine, the score next to its floor and the
  noise between seeds;
- the alternatives to the shipped recipe and what they change in the loss: the $x_0$ and $v$
  targets, min-SNR-$\gamma$ weights {cite}`hang2023` and the ELBO's weights, the cosine
  schedule and a schedule rescaled to zero terminal SNR {cite}`lin2024`;
- which of them buy quality per second on this small model, which do not, and which findings
  agree with the papers;
- the recipe that the book now uses on a CPU (chapter 5's `cpu` profile, `ddpm train` on a
  CPU), and what it reaches in 5 and 10 minutes.

Time to run (measured on a 2-core CPU): smoke TODO s, cpu TODO s; gpu: not yet measured.
""")

code(r"""
# Setup: where ddpm_lib is missing (Colab, Kaggle, Binder), install it,
# pinned to the release these chapters were written for (torch is kept).
REPO = "git+https://github.com/ddpm-book/ddpm-book@v0.3.0"
try:
    import ddpm_lib
except ImportError:
    %pip install -q "ddpm_lib[book] @ {REPO}"
from ddpm_lib import book
cfg = book.setup()
""", tags=["nbval-ignore-output"])

code(r"""
import math

import matplotlib.pyplot as plt
import torch

from ddpm_lib import features, metrics, objectives, recipes, viz
from ddpm_lib.bench import train_flops
from ddpm_lib.schedules import NoiseSchedule
from ddpm_lib.unet import UNet, count_parameters

runs = book.load_result("ablation_cpu.json")["runs"]
""")

md(r"""
(ch16-budget)=
## The budget: a CPU at its ceiling

A training step costs a fixed amount of arithmetic per image: the forward pass of the U-Net and
the backward pass, about twice the forward. `bench.train_flops` counts the FLOPs of the
convolutions and matrix products (as in {ref}`ch11-benchmark`); the shipped run of the
ablation below measured how many images per second this CPU pushed through.
""")

code(r"""
shipped = next(r for r in runs if (r["row"], r["seed"]) == ("shipped", 0))
net, recipe, _ = recipes.settings("shipped")
flops = train_flops(UNet(**net), (1, 28, 28), 8, torch.device("cpu")) / 8
rate = flops * shipped["images_per_s"]
print(f"shipped U-Net: {count_parameters(UNet(**net)):,} parameters")
print(f"forward + backward: {flops / 1e9:.2f} GFLOP per training image")
print(
    f"the shipped recipe trained {shipped['images_per_s']:.0f} images/s"
    f" on {shipped['machine']}"
)
print(f"that is {rate / 1e9:.0f} GFLOP/s of convolutions and matmuls")
""")

md(r"""
TODO (measured): compare with the machine's fp32 matmul rate (bench) and say what fraction
that is. The conclusion: at a fixed budget of seconds, a recipe can only win by (a) spending
fewer FLOPs per step (a smaller network, a smaller batch: more, cheaper steps) or (b) learning
more from each step (a better target, weighting, schedule, learning rate).
""")

md(r"""
(ch16-method)=
## The experiment

`scripts/ablation.py` runs one row at a time with `recipes.timed_run`: it builds the row's
network from the seed, trains it with `train` for a fixed number of **seconds** (a callback
stops it at the first step past the budget), and keeps two copies of the EMA weights, at half
the budget and at the end. Then `recipes.score` scores each copy: 500 samples of DDIM in 50
steps ({doc}`06_sampling`), from the same starting noise for every row, and the Frechet
distance of the book's classifier features to those of the 60,000 training images (the
FID-style score of {doc}`07_evaluation`). Beside it stands the floor: 500 real test images
scored the same way, what a perfect generator would get with 500 samples.

The rules that make the rows comparable:

- **One change per row** from the shipped recipe (`recipes.ABLATION`, printed below). The one
  exception is the zero-terminal-SNR schedule, which cannot train $\epsilon$ (at
  $\bar\alpha_{T-1} = 0$ the input is pure noise, so $\epsilon = x_t$ says nothing about $x_0$;
  see below); it is paired with $v$-prediction and compared with the $v$ row.
- **Wall clock, not steps.** A smaller batch or network takes more steps in the same time; a
  step count would hide exactly what a learner on a laptop cares about.
- **One after the other, on an idle machine.** Two runs at once share the cores and each
  slows the other unevenly. Each record keeps the 1-minute load average before and after.
- **The noise between seeds.** Rows near the top are run again with seed 1 (other initial
  weights, other batches): a difference smaller than the spread between two seeds of the same
  row is not a finding.
""")

code(r"""
print(f"{'row':>14s}  what it changes from the shipped recipe")
for name, change in recipes.ABLATION.items():
    what = "; ".join(
        f"{k} = {v}" for part in change.values() for k, v in part.items()
    )
    print(f"{name:>14s}  {what or '(the shipped recipe)'}")
""")

md(r"""
(ch16-weights)=
## What the rows change in the loss

Three of the rows change the loss, not the optimisation. {ref}`Chapter 3 <ch03-l0>` showed
that the three targets are one model written three ways: given $x_t$, an error $\delta$ in the
predicted $x_0$ is an error $\sqrt{\mathrm{SNR}_t}\,\delta$ in $\epsilon$ and
$\sqrt{\mathrm{SNR}_t + 1}\,\delta$ in $v$. So the squared error of each target is the squared
error of $x_0$ times a weight,

$$
\lVert \epsilon - \hat\epsilon \rVert^2 = \mathrm{SNR}_t\,\lVert x_0 - \hat x_0\rVert^2, \qquad
\lVert v - \hat v \rVert^2 = (\mathrm{SNR}_t + 1)\,\lVert x_0 - \hat x_0\rVert^2 ,
$$

and choosing a target with uniform weights *is* choosing a weighting of the $x_0$ error:
$\mathrm{SNR}_t$ for $\epsilon$ (huge at small $t$: $10^4$ at $t = 1$), $1$ for $x_0$,
$\mathrm{SNR}_t + 1$ for $v$ (never below 1, so the noisy steps keep weight).

**Min-SNR-$\gamma$** {cite}`hang2023` clamps the $x_0$ weight at $\gamma$:
$w_{x_0} = \min(\mathrm{SNR}_t, \gamma)$, with $\gamma = 5$. The authors read diffusion training
as many tasks, one per noise level, whose gradients conflict; the clamp stops the
nearly-clean steps (high SNR, an easy task) from dominating. Written for each target the same
weight is

$$
w_\epsilon = \frac{\min(\mathrm{SNR}_t, \gamma)}{\mathrm{SNR}_t},\qquad
w_{x_0} = \min(\mathrm{SNR}_t, \gamma),\qquad
w_v = \frac{\min(\mathrm{SNR}_t, \gamma)}{\mathrm{SNR}_t + 1}
$$

(`objectives.loss_weights`). The row `min_snr` trains $\epsilon$ with $w_\epsilon$; the
**ELBO** row trains $\epsilon$ with the weights $\kappa_t$ of the bound that
{ref}`chapter 3 <ch03-l0>` derived and $L_\text{simple}$ dropped, scaled to mean 1. The
folded cell checks that the three min-SNR weights put the same loss on the same $x_0$ error.
""")

code(r"""
schedule = NoiseSchedule.linear(1000)
t = torch.arange(0, 1000, 37)
g = torch.Generator().manual_seed(0)
x0 = torch.rand((len(t), 1, 28, 28), generator=g) * 2 - 1
eps = torch.randn(x0.shape, generator=g)
x_t = schedule.q_sample(x0, t, eps)
x0_hat = x0 + 0.1 * torch.randn(x0.shape, generator=g)  # an x0 error
targets = {  # each target's value and the prediction implied by x0_hat
    "x0": (x0, x0_hat),
    "eps": (eps, schedule.predict_eps(x_t, t, x0_hat)),
    "v": (
        schedule.velocity(x0, t, eps),
        schedule.velocity(x0_hat, t, schedule.predict_eps(x_t, t, x0_hat)),
    ),
}
losses = {}
for name, (target, pred) in targets.items():
    w = objectives.loss_weights(schedule, t, name, "min_snr", 5.0)
    losses[name] = w * (target - pred).double().pow(2).mean((1, 2, 3))
same = all(
    torch.allclose(losses[k], losses["x0"], rtol=1e-4) for k in ("eps", "v")
)
print("min-SNR: the same weighted loss for the same x0 error, all targets:", same)
assert same
""", tags=["hide-cell"], show="Checked: min-SNR weights give eps, x0 and v the same loss for the same x0 error (rtol 1e-4)")

md(r"""
**The schedule rows.** The cosine schedule {cite}`nichol2021` spends more steps at high and
middle SNR than the linear one. Both end with a little signal left: the linear schedule's
$\bar\alpha_{T-1} = 4\cdot10^{-5}$, so training never shows the network pure noise while
sampling starts from it. {cite:t}`lin2024` rescale $\sqrt{\bar\alpha_t}$ by an affine map that
keeps the first value and sends the last to 0 (`schedules.rescale_zero_terminal_snr`):

$$
\sqrt{\bar\alpha_t}\ \mapsto\ \sqrt{\bar\alpha_1}\,
\frac{\sqrt{\bar\alpha_t} - \sqrt{\bar\alpha_T}}{\sqrt{\bar\alpha_1} - \sqrt{\bar\alpha_T}} .
$$

At the last step $x_t = \epsilon$ exactly, so an $\epsilon$-predictor learns nothing about $x_0$
there and the samplers could not recover $\hat x_0$ from it; hence the pairing with $v$, which at
$\bar\alpha = 0$ is $-x_0$. The samplers start such a grid at $t = T-1$ (the "trailing"
spacing of the paper).
""")

code(r"""
zt = NoiseSchedule.linear(1000, zero_terminal_snr=True)
ab, ab_zt = schedule.float64("alpha_bars"), zt.float64("alpha_bars")
print(f"linear:   alpha_bar first {ab[0]:.6f}, last {ab[-1]:.2e}")
print(f"rescaled: alpha_bar first {ab_zt[0]:.6f}, last {ab_zt[-1]:.2e}")
print(
    "first kept (1e-12), last exactly 0:",
    abs(ab_zt[0] - ab[0]).item() < 1e-12 and ab_zt[-1].item() == 0.0,
)
""", tags=["hide-cell"], show="Checked: the rescaled schedule keeps the first alpha_bar and ends at exactly 0")

md(r"""
(ch16-results)=
## The results

TODO: table (rows grouped by question), both seeds for the top rows, the floor; discussion per
group; the combination; the plot of score against time for the best three.
""")

code(r"""
floor = runs[0]["fd_floor"]
base = shipped["full"]["fd"]
print(
    f"FD of 500 DDIM-50 samples (floor of 500 real images: {floor:.2f});"
    " steps and images/s in 600 s"
)
print(
    f"{'row':>14s}{'seed':>5s}{'steps':>7s}{'img/s':>7s}"
    f"{'FD 5 min':>10s}{'FD 10 min':>11s}{'/ shipped':>10s}"
)
for r in sorted(runs, key=lambda r: r["full"]["fd"]):
    print(
        f"{r['row']:>14s}{r['seed']:>5d}{r['steps']:>7d}"
        f"{r['images_per_s']:>7.0f}{r['half']['fd']:>10.1f}"
        f"{r['full']['fd']:>11.1f}{r['full']['fd'] / base:>10.2f}"
    )
""", tags=["hide-input"], show="Show the code: the ablation table (ddpm_lib/results/ablation_cpu.json)")

md(r"""
## Summary

TODO
""")

nb = dict(cells=cells, metadata={"kernelspec": {"display_name": "Python 3", "language": "python",
                                                "name": "python3"},
                                 "language_info": {"name": "python"}},
          nbformat=4, nbformat_minor=5)
for i, c in enumerate(nb["cells"]):
    c["id"] = f"ch16-{i:02d}"
    c["source"] = c["source"].splitlines(keepends=True)
out = Path(sys.argv[1] if len(sys.argv) > 1 else "chapters/16_training_recipes.ipynb")
out.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
print("wrote", out)
