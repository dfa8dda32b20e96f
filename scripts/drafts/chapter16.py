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
import os
import time

import matplotlib.pyplot as plt
import torch

from ddpm_lib import data, features, metrics, objectives, recipes, viz
from ddpm_lib.bench import cpu_name, train_flops
from ddpm_lib.schedules import NoiseSchedule
from ddpm_lib.pretrained import load_weights
from ddpm_lib.samplers import ddim_sample
from ddpm_lib.train import train
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

code(r"""
def matmul_rate(n=1024, seconds=2.0):
    \"\"\"This CPU's float32 matrix-product rate (FLOP/s): n x n products
    for about `seconds`.\"\"\"
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start)


peak = matmul_rate()
print(
    f"this CPU: {peak / 1e9:.0f} GFLOP/s of float32 matrix products"
    f" ({torch.get_num_threads()} threads)"
)
print(
    "the shipped recipe (measured in the ablation) ran at"
    f" {rate / peak:.0%} of that rate"
    if shipped["machine"].startswith(f"cpu ({cpu_name()}, {os.cpu_count()}")
    else "the ablation ran on another CPU: compare its rate with"
    " that machine's, not this one's"
)
""", tags=["nbval-ignore-output"])

md(r"""
On the machine that made the ablation the shipped recipe ran at about TODO of the rate of a
plain matrix product, and a convolutional network's mixture of small convolutions, group
norms and attention rarely gets closer on a CPU. There is little speed left to win by
engineering. At a fixed budget of seconds, a recipe can therefore win only in two ways:

- **more steps for the same arithmetic**: a smaller batch, or a smaller network, makes each
  step cheaper, so more of them fit in ten minutes;
- **more learning per step**: a target, a weighting, a schedule or a learning rate that
  moves the network further towards good samples with the same gradient computation.

The rows below test both.
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

Three of the rows change the loss, not the optimisation. {ref}`Chapter 3 <ch03-targets>` showed
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
{ref}`chapter 3 <ch03-weights>` derived and $L_\text{simple}$ dropped, scaled to mean 1. The
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
print("min-SNR: one weighted loss for one x0 error, all targets:", same)
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
by = {(r["row"], r["seed"]): r for r in runs}
BEST = "batch_32+lr_1e-3+warmup_20"
groups = {
    "target": ["shipped", "x0", "v"],
    "weights": ["min_snr", "elbo"],
    "schedule": ["cosine", "zero_snr_v"],
    "optimiser": ["lr_1e-3", "lr_2e-3", "warmup_20", "ema_0.99"],
    "batch": ["batch_16", "batch_32", "batch_64"],
    "network": ["width_16", "width_48", "depth_2", "no_attention"],
    "combined": [BEST],
}
floor, base = by["shipped", 0]["fd_floor"], by["shipped", 0]["full"]["fd"]
print(f"FD of 500 DDIM-50 samples; floor (500 real images) {floor:.2f}")
print(
    f"{'row':>26s}{'steps':>6s}{'img/s':>6s}{'5 min':>7s}{'10 min':>7s}"
    f"{'ratio':>6s}{'seed 1':>7s}"
)
for group, rows in groups.items():
    print(f"-- {group}")
    for row in (r for r in rows if (r, 0) in by):
        r, again = by[row, 0], by.get((row, 1))
        seed1 = f"{again['full']['fd']:7.1f}" if again else f"{'':7s}"
        print(
            f"{row:>26s}{r['steps']:6d}{r['images_per_s']:6.0f}"
            f"{r['half']['fd']:7.1f}{r['full']['fd']:7.1f}"
            f"{r['full']['fd'] / base:6.2f}{seed1}"
        )
""", tags=["hide-input"], show="Show the code: the ablation table (ddpm_lib/results/ablation_cpu.json)")

md(r"""
**How large is a difference?** The shipped recipe scored 66.6 with seed 0 and 68.5 with seed
1 at ten minutes (122.3 and 122.2 at five); the best combination 26.1 and 28.9; batch 16
27.8 and 32.0. Other initial weights and other batches, and a machine whose speed drifts
(the seed-1 runs of the two best rows fell in an hour when the CPU ran about 7% fewer steps
per second), move a score by 3 to 15%. So below, a single-seed difference of less than about
15% is reported as "no difference this experiment can show", and one of 15 to 25% as a
likely effect that a second seed would have to confirm.

**The batch is the biggest lever.** Batch 32 instead of 128 scores 31.3 instead of 66.6, and
batch 16 27.8 (32.0 with seed 1). A smaller batch is hardly cheaper per image on this CPU (137 and 128 images
per second against 146: the convolutions of a small batch use the cores a little less well),
so in ten minutes every row sees about the same number of images. What changes is how many
times the weights are updated: 686 steps at batch 128, 2,564 at 32, 4,820 at 16. Early in
training the gradient of a small batch already points the right way, and four small steps
go further than one large step with a four times more accurate gradient. This is the regime
that {cite:t}`mccandlish2018` describe: the largest useful batch (their "critical batch
size") is small while the loss is high and grows as training goes on, so the best batch for
ten minutes is smaller than the best batch for a day. On a GPU, which processes a batch of
128 nearly as fast as a batch of 32, the trade is different: there, a larger batch costs
almost no time.

**The optimiser.** A higher learning rate ($10^{-3}$: 48.0) helps, and so does a shorter
warm-up (20 steps: 54.1): 200 warm-up steps are 29% of the shipped run's 686 steps, time spent
at a reduced learning rate. $2\cdot10^{-3}$ scored the same as $10^{-3}$ (48.3) with 16% fewer
steps (it ran in the slower hour described next): at batch 128 the best learning rate for ten
minutes is $10^{-3}$ or higher.

**The EMA row measured the machine instead.** The EMA of {doc}`05_training` has a warm-up:
after update $n$ its decay is $\min\!\big(d, \tfrac{1+n}{10+n}\big)$, and
$\tfrac{1+n}{10+n}$ stays below 0.99 until update 890. A run of 700 steps at batch 128
therefore averages exactly the same weights with $d = 0.99$ as with $d = 0.999$ (the folded
cell checks it on a small run): the row `ema_0.99` is the shipped run of seed 0 again, only
stopped earlier. It ran 609 steps instead of 686, because the CPU (a virtual machine) ran
about 11% slower during that hour, and scored 76.5 instead of 66.6. That is an honest
measure of how much 77 fewer steps cost at ten minutes, and a reminder that wall-clock
comparisons are only as steady as the machine: the rows' steps and images per second are in
the table for this reason. Where the decay does matter, with the best recipe's 2,700 steps,
the row `batch_32+lr_1e-3+warmup_20+ema_0.99` ran in an even slower hour (1,959 steps instead
of 2,698) and scored 37.4; the seed-1 run of the best recipe had 35.4 after 1,902 steps (the
plot's third point). At equal steps, no difference this experiment can show.

**The target and the weights.** Predicting $x_0$ (55.5) or $v$ (53.4) instead of $\epsilon$
scores about 20% better at ten minutes and 27 to 32% better at five (82.8 and 89.7 against
122.3): a likely effect, measured with one seed. Through the lens of the weights above it is
what one would expect: $\epsilon$-prediction puts the $x_0$ error at
nearly clean timesteps under a weight of up to $10^4$, so a short run spends much of its
gradient on details that a sampler barely uses. Min-SNR-$\gamma$ clamps exactly that weight,
but at this budget it shows no difference from uniform weights (57.0 at ten minutes, 14%
better; 125.9 at five, no better). The **ELBO** weights go
the other way: they weight the $\epsilon$ loss of the first few timesteps 50 to 100 times more
than that of the middle ones (printed below) and score 149.6, more than twice the shipped recipe's. That is the finding of
{cite:t}`ho2020` on CIFAR-10 that {ref}`chapter 3 <ch03-l0>` quotes, made again in ten
minutes: the bound is the better likelihood, $L_\text{simple}$ the better sampler.

**The schedule.** The cosine schedule (61.7) is not measurably better than the linear one
here. Rescaling to zero terminal SNR with $v$ (54.7) is no different from $v$ on the
ordinary schedule (53.4): the problem {cite:t}`lin2024` fix (a model that never saw pure
noise cannot make images much brighter or darker than average) does not show in a score of
Fashion-MNIST's mostly dark backgrounds, at least not at this budget.

**The network.** A narrower U-Net (16 channels: 4 times fewer FLOPs per image) takes 2.8 times
as many steps but scores about the same (62.4): the extra steps buy nothing that a quarter of
the channels can hold. Without attention the network is 10% faster and no worse (59.3).
A deeper U-Net (two residual blocks per level) goes the other way and loses: 406 steps in ten
minutes (in the slower hour) and 91.4. At this budget no network change paid for itself;
the shipped one is already about as large as ten minutes can train. (A wider network, 48
channels, was not run: the CPU had slowed down too much by then for a fair row.)

**Together.** Batch 32, learning rate $10^{-3}$ and 20 warm-up steps combine to 26.1 (seed 0)
and 28.9 (seed 1) at ten minutes, 43.1 and 49.6 at five. Run one after the other with the
shipped recipe's seed-1 run, that is 0.42 of its score at ten minutes (28.9 against 68.5) and
0.41 at five (49.6 against 122.2): the quality that the shipped recipe reaches in ten minutes,
the best recipe passes in a little over four (the plot). The pictures below are the two
seed-1 models after ten minutes, sampled from the same noise.
""")

code(r"""
elbo_w = objectives.loss_weights(
    schedule, torch.tensor([0, 1, 10, 100, 500, 999]), "eps", "elbo"
)
print("ELBO weights of the eps loss (mean 1 over t):")
for t_, w in zip([0, 1, 10, 100, 500, 999], elbo_w.tolist()):
    print(f"  t = {t_:3d}: {w:8.3f}")
""", tags=["hide-input"], show="Show the code: the ELBO weights at five timesteps")

code(r"""
few, _ = data.load("fashion_mnist", "train", limit=256)


def ema_after(decay, steps=20):
    torch.manual_seed(0)
    net = UNet(
        base_channels=8, channel_mults=(1, 2), attention_resolutions=()
    )
    run = train(
        net, schedule, few, steps=steps, batch_size=8,
        ema_decay=decay, seed=0, progress=False, device="cpu",
    )
    return run.ema_model.state_dict()


a, b = ema_after(0.99), ema_after(0.999)
print(
    "20 steps: the EMA with decay 0.99 == the EMA with decay 0.999:",
    all(torch.equal(a[k], b[k]) for k in a),
)
""", tags=["hide-cell"], show="Checked: up to update 890 the EMA's warm-up makes decays 0.99 and 0.999 the same average")

code(r"""
fig, axes = plt.subplots(1, 2, figsize=(viz.COLUMN_WIDTH, 3.9))
for ax, (name, file) in zip(
    axes,
    [
        ("shipped recipe", "ablation_shipped_s1_10min.pt"),
        ("best CPU recipe", "ablation_best_s1_10min.pt"),
    ],
):
    model, sched_w, meta = load_weights(book.result_path(file))
    x = ddim_sample(
        model.eval(),
        sched_w,
        (32, 1, 28, 28),
        steps=50,
        generator=torch.Generator().manual_seed(0),
    )
    viz.show_grid(x, nrow=8, ax=ax, title=f"{name}: {meta['step']} steps")
fig.tight_layout()
plt.show()
""", tags=["hide-input"], show="Show the code: samples after ten minutes, both recipes")

code(r"""
fig, ax = plt.subplots(figsize=(viz.COLUMN_WIDTH, 3.6))
for row, colour in zip(
    ["shipped", "batch_16", BEST], ["tab:gray", "tab:blue", "tab:red"]
):
    for seed, style in ((0, "o:"), (1, "s-")):
        if (row, seed) not in by:
            continue
        r = by[row, seed]  # the first rows kept only half and full
        curve = r.get("curve", [r["half"], r["full"]])
        ax.plot(
            [c["seconds"] / 60 for c in curve],
            [c["fd"] for c in curve],
            style,
            color=colour,
            label=f"{row} (seed {seed})",
        )
ax.axhline(floor, color="k", lw=1, ls="--", label="floor (real images)")
ax.set(
    xlabel="training time (minutes, 2-core CPU)",
    ylabel="FD, 500 samples (log scale)",
    yscale="log",
    title="score against training time",
)
ax.legend(fontsize=7, ncol=2)
ax.grid(alpha=0.3, which="both")
fig.tight_layout()
plt.show()
""", tags=["hide-input"], show="Show the code: the plot of score against time")

md(r"""
## Summary

- On a CPU, training is bound by arithmetic; a better recipe is the only way to better samples
  in the same time. Compare recipes by wall clock, one change at a time, one after the other on
  an idle machine, with the floor and the spread between seeds next to every score.
- The batch size was the lever: at about the same images per second, batch 32 gives four times
  the optimiser steps of batch 128 and halves the score at ten minutes. Small batches are
  efficient early in training, while the loss is high {cite}`mccandlish2018`.
- With a higher learning rate ($10^{-3}$) and a short warm-up (20 steps) it becomes the book's
  CPU recipe (`recipes.CPU_BEST`, the default of `ddpm train` on a CPU, the `cpu` profile of
  {doc}`05_training`): 0.42 of the shipped recipe's score at ten minutes and 0.41 at five,
  measured one after the other.
- Predicting $x_0$ or $v$ instead of $\epsilon$ is likely to help at this budget (about 20%,
  one seed); min-SNR weights, the cosine schedule and zero terminal SNR showed no difference;
  the ELBO's weights more than doubled the score, as {cite:t}`ho2020` found on CIFAR-10.
- A narrower, deeper or attention-free network did not pay for itself in ten minutes; nor did a
  shorter EMA, which the EMA's warm-up makes identical to the long one for the first 890 steps.
- A virtual machine's speed drifts by 10 to 30% within hours: keep the steps and images per
  second of every run next to its score.
""")

md(r"""
## Exercises

```{exercise}
:label: ch16-ex-epochs

How many times did the shipped recipe's ten-minute run see each training image on average, and
how many times did the best recipe's? What does the answer say about where the difference
between the two comes from?
```

```{solution} ch16-ex-epochs
:class: dropdown

Steps times batch over 60,000 images: the shipped run (seed 0) $686 \cdot 128 / 60\,000 = 1.46$
epochs, the best $2\,698 \cdot 32 / 60\,000 = 1.44$. Both saw about one and a half passes over
the data, so the difference is not more data: it is four times as many updates made from the
same images.
```

```{exercise}
:label: ch16-ex-gpu

On a GPU the shipped network processes a batch of 128 almost as fast as a batch of 32 (the
hardware is far from busy at either size). Would batch 32 still be the better choice for ten
minutes of training there? What would you measure to decide?
```

```{solution} ch16-ex-gpu
:class: dropdown

Not necessarily. On the CPU a step of batch 32 costs about a quarter of a step of batch 128, so
the small batch buys four times the steps. If a step of 128 costs about as much time as a step
of 32, the large batch gets as many steps, each with a four times less noisy gradient, and
should win. Measure images per second at each batch size ({ref}`ch11-benchmark` does), then
run the two recipes for the same wall clock, one after the other, and score both as here.
```

```{exercise}
:label: ch16-ex-target

Train the best recipe with $v$-prediction for ten minutes with the command line and score it
as the chapter does. Does the change that helped the shipped recipe (about 20%, one seed) help
the best one? Run the best recipe with $\epsilon$ right after it for a fair comparison.
```

```{solution} ch16-ex-target
:class: dropdown

`python scripts/ablation.py run batch_32+lr_1e-3+warmup_20+v batch_32+lr_1e-3+warmup_20
--seed 2` trains and scores both, one after the other (the same as `ddpm train --prediction v`
with a stop after 600 s, then `recipes.score` on the exported weights). The book has not run
it: the answer is yours to measure, and a difference smaller than the spread between two
seeds (up to 15% here) is not an answer.
```
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
