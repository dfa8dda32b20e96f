"""Training recipes as data, and runs that compare them: the book's small U-Net and the recipe it
ships with, the rows of the training ablation (each the shipped recipe with one thing changed),
a run of a row for a wall-clock budget (:func:`timed_run`) and its score (:func:`score`).
``scripts/ablation.py`` runs the rows one after the other.

A row's settings are three dicts (:func:`settings`): the network's (:class:`~ddpm_lib.unet.UNet`
arguments), the run's (:class:`~ddpm_lib.train.TrainConfig` fields) and the schedule's
(:func:`schedule`). Rows combine with ``+``: ``settings("v+batch_32")`` makes both changes.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from . import features, metrics
from .pretrained import load_weights, prediction_of, save_weights
from .samplers import sample
from .schedules import NoiseSchedule
from .train import train
from .unet import UNet, count_parameters

# The network of the shipped models (1.11 M parameters) and the recipe of chapter 5
SMALL_UNET = dict(base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=1,
                  attention_resolutions=(7,), dropout=0.0, image_size=28)
SHIPPED = dict(batch_size=128, lr=5e-4, warmup_steps=200, ema_decay=0.999, grad_clip=1.0,
               prediction="eps", weighting="uniform")
LINEAR = dict(kind="linear", zero_terminal_snr=False)

# row -> what it changes: "net", "recipe" or "schedule" entries
ABLATION: dict[str, dict] = {
    "shipped": {},
    # what the network predicts (chapter 3)
    "x0": dict(recipe=dict(prediction="x0")),
    "v": dict(recipe=dict(prediction="v")),
    # how the timesteps are weighted (of the eps loss)
    "min_snr": dict(recipe=dict(weighting="min_snr")),
    "elbo": dict(recipe=dict(weighting="elbo")),
    # the schedule; zero terminal SNR cannot train eps, so it goes with v (compare with "v")
    "cosine": dict(schedule=dict(kind="cosine")),
    "zero_snr_v": dict(schedule=dict(zero_terminal_snr=True), recipe=dict(prediction="v")),
    # the optimisation
    "lr_1e-3": dict(recipe=dict(lr=1e-3)),
    "lr_2e-3": dict(recipe=dict(lr=2e-3)),
    "warmup_20": dict(recipe=dict(warmup_steps=20)),
    "batch_16": dict(recipe=dict(batch_size=16)),
    "batch_32": dict(recipe=dict(batch_size=32)),
    "batch_64": dict(recipe=dict(batch_size=64)),
    "ema_0.99": dict(recipe=dict(ema_decay=0.99)),
    # the network, at the same wall clock
    "width_16": dict(net=dict(base_channels=16)),
    "width_48": dict(net=dict(base_channels=48)),
    "depth_2": dict(net=dict(num_res_blocks=2)),
    "no_attention": dict(net=dict(attention_resolutions=())),
}


def settings(row: str) -> tuple[dict, dict, dict]:
    """``(net, recipe, schedule)`` of an ablation row; ``"a+b"`` makes the changes of both."""
    net, recipe, sched = dict(SMALL_UNET), dict(SHIPPED), dict(LINEAR)
    for part in row.split("+"):
        if part not in ABLATION:
            raise ValueError(f"unknown ablation row {part!r}; the rows are {', '.join(ABLATION)}, "
                             "combined with +")
        net.update(ABLATION[part].get("net", {}))
        recipe.update(ABLATION[part].get("recipe", {}))
        sched.update(ABLATION[part].get("schedule", {}))
    return net, recipe, sched


def schedule(kind: str = "linear", zero_terminal_snr: bool = False, T: int = 1000) -> NoiseSchedule:
    """The noise schedule a row's ``schedule`` dict describes."""
    if kind not in ("linear", "cosine"):
        raise ValueError(f"schedule kind must be 'linear' or 'cosine', got {kind!r}")
    make = NoiseSchedule.linear if kind == "linear" else NoiseSchedule.cosine
    return make(T, zero_terminal_snr=zero_terminal_snr)


# `ddpm train`'s defaults, per device: on a GPU a larger network (64 channels, 2 residual blocks
# per level, dropout 0.1) with the rates of Ho et al. (2020); on a CPU the ablation's best row.
CPU_BEST = "batch_32+lr_1e-3+warmup_20"   # chapter 16: 0.42 of shipped's score at 10 min
GPU_TRAIN = dict(base_channels=64, num_res_blocks=2, dropout=0.1, batch_size=128, lr=2e-4,
                 warmup_steps=0, ema_decay=0.9999, prediction="eps", weighting="uniform",
                 schedule="linear", zero_terminal_snr=False)


def train_defaults(device_type: str) -> dict:
    """The defaults of ``ddpm train``'s flags (``GPU_TRAIN``'s keys) on ``"cuda"`` or ``"cpu"``."""
    if device_type != "cpu":
        return dict(GPU_TRAIN)
    net, recipe, sched = settings(CPU_BEST)
    return {**{k: net[k] for k in ("base_channels", "num_res_blocks", "dropout")},
            **{k: recipe[k] for k in ("batch_size", "lr", "warmup_steps", "ema_decay", "prediction",
                                      "weighting")},
            "schedule": sched["kind"], "zero_terminal_snr": sched["zero_terminal_snr"]}


def timed_run(row: str, images: torch.Tensor, budget: float, out, *, seed: int = 0,
              snapshots: int = 2, device=None, log_every: int = 10) -> dict:
    """Train row ``row`` on ``images`` (N, 1, 28, 28) for ``budget`` seconds of wall clock (it
    stops at the first step past it), keeping ``snapshots`` copies of the EMA weights evenly
    spaced in time, the last at the end, as weights files ``out/<row>_s<seed>_<k>of<K>.pt``.
    Returns what was measured: steps, seconds, images per second, the final logged loss, the
    1-minute load average before and after (was the machine idle?), and each snapshot's
    seconds, step and path. The network's initial weights come from ``seed``."""
    net_cfg, recipe, sched_cfg = settings(row)
    sched, out = schedule(**sched_cfg), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = UNet(**net_cfg)
    meta = dict(row=row, prediction=recipe["prediction"], seed=seed)
    due = [budget * k / snapshots for k in range(1, snapshots)]
    kept = []                                           # (seconds, step, path)
    start = time.perf_counter()

    def keep(step, model, ema):
        elapsed = time.perf_counter() - start
        if len(kept) < len(due) and elapsed >= due[len(kept)]:
            path = out / f"{row}_s{seed}_{len(kept) + 1}of{snapshots}.pt"
            save_weights(ema.model, sched, path, {**meta, "step": step})
            kept.append((round(elapsed, 1), step, str(path)))
        return elapsed >= budget

    load_before = os.getloadavg()[0]
    result = train(model, sched, images, steps=10**9, seed=seed, device=device, progress=False,
                   callback=keep, log_every=log_every, **recipe)
    seconds, load_after = time.perf_counter() - start, os.getloadavg()[0]
    path = out / f"{row}_s{seed}_{snapshots}of{snapshots}.pt"
    save_weights(result.ema_model, sched, path, {**meta, "step": result.step})
    kept.append((round(seconds, 1), result.step, str(path)))
    return dict(row=row, seed=seed, net=net_cfg, recipe=recipe, schedule=sched_cfg,
                params=count_parameters(model), steps=result.step, seconds=round(seconds, 1),
                images_per_s=round(result.step * recipe["batch_size"] / seconds, 1),
                final_loss=result.history["loss"][-1] if result.history["loss"] else None,
                load_average_before=round(load_before, 2), load_average_after=round(load_after, 2),
                snapshots=[dict(seconds=s, step=k, path=p) for s, k, p in kept])


def score(weights, n: int = 500, steps: int = 50, reference=None, seed: int = 1234) -> float:
    """The FID-style score of an exported weights file: the Frechet distance of the shipped
    classifier's features of ``n`` DDIM samples in ``steps`` steps (from noise drawn with
    ``seed``) to ``reference``'s (default: the 60,000 training images'), as in chapter 7.
    Compare it with :func:`ddpm_lib.metrics.real_floor` at the same ``n``."""
    model, sched, meta = load_weights(weights)
    shape = (n, model.config["in_channels"], model.config["image_size"], model.config["image_size"])
    with torch.no_grad():
        x = sample(model, sched, shape, sampler="ddim", steps=steps, prediction=prediction_of(meta),
                   generator=torch.Generator().manual_seed(seed))
    reference = features.reference_features() if reference is None else reference
    return metrics.frechet_distance(features.extract_features(x), reference)
