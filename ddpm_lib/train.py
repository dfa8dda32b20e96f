"""Training a noise predictor with L_simple. Taught in chapter 5, "The training loop".

One step (Ho et al. 2020, Algorithm 1)::

    x0 ~ data,  t ~ Uniform{0..T-1},  eps ~ N(0, I)
    loss = || eps - eps_theta(sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps, t) ||^2

:func:`train` is that step in a loop, read top to bottom: draw a batch (:func:`draw_batch`), the
loss (:func:`loss_simple`), an optimiser step (:func:`ddpm_lib.runs.optimizer_step` at the rate
:func:`ddpm_lib.runs.lr_at`), the EMA (:class:`~ddpm_lib.ema.EMA`), the log
(:class:`~ddpm_lib.runs.LossLog`), a checkpoint (:func:`save`). Around it: AdamW, gradient
clipping, random horizontal flips, label dropout for classifier-free guidance, a tqdm progress bar,
and checkpoints written atomically from which a run resumes exactly where it stopped
(:func:`resume_run`). How the device is used (precision, compile, several processes) is
:mod:`ddpm_lib.accel`'s business; what makes a checkpoint safe to write and to resume from is
:mod:`ddpm_lib.runs`'s."""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .accel import COMPILE_MODES, FastPath, check_precision, distributed_info, fast_path
from .captions import PAD_ID, check_tokens
from .checks import training_data, trusted_inputs
from .io import save_checkpoint
from .objectives import check as check_objective
from .objectives import diffusion_loss, loss_simple  # noqa: F401  (loss_simple: chapter 5)
from .ema import EMA
from .runs import (Generators, LossLog, hold_checkpoint, lr_at, optimizer_step, read_resumable,
                   resume_differences, unusable_weights)
from .text import TextConditionedUNet

Tensor = torch.Tensor


@dataclass
class TrainConfig:
    """Settings of a training run. ``steps`` is the total number of optimiser steps.
    Taught in chapter 5, "One optimiser step, by hand" and "What `train` adds around the step"."""
    steps: int = 1000
    batch_size: int = 128
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0            # linear learning-rate warm-up
    grad_clip: float | None = 1.0    # max global gradient norm, None for no clipping
    ema_decay: float = 0.9999        # EMA decay; warm-up uses min(decay, (1 + n) / (10 + n))
    label_dropout: float = 0.1       # for class-conditional models: P(label -> null class)
    hflip: bool = False              # flip each training image left-right with probability 1/2
    # The fast path (ddpm_lib.accel). "auto" and None mean "on a CUDA GPU": precision bf16 on
    # GPUs that compute it (A100, L4, H100), fp16 with loss scaling on the others (T4, V100),
    # fp32 on a CPU; the other switches on on a GPU, off on a CPU.
    precision: str = "auto"          # "fp32" | "bf16" | "fp16" | "auto"
    channels_last: bool | None = None  # NHWC memory layout for the convolutions
    compile: bool | str | None = None  # torch.compile the loss; a string picks the mode
    data_on_device: bool | None = None  # keep the dataset on the GPU and draw batches there
    # what the network predicts and how timesteps are weighted (ddpm_lib.objectives)
    prediction: str = "eps"          # "eps" | "x0" | "v" | "flow" (flow matching's velocity)
    weighting: str = "uniform"       # "uniform" (L_simple) | "min_snr" | "elbo" (objectives.py)
    snr_gamma: float = 5.0
    seed: int = 0
    checkpoint_every: int = 0        # 0: only at the end (when a checkpoint path is given)
    log_every: int = 10              # record the loss every this many steps

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be positive and finite, got {self.lr}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.label_dropout < 1:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be positive or None, got {self.grad_clip}")
        check_precision(self.precision)
        check_objective(self.prediction, self.weighting, self.snr_gamma)
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {self.compile!r}")
        if self.checkpoint_every < 0 or self.log_every < 1 or self.warmup_steps < 0:
            raise ValueError("checkpoint_every and warmup_steps must be >= 0, log_every >= 1")


@dataclass
class TrainResult:
    """What :func:`train` returns: the trained model, its EMA copy, and the history.

    ``history`` holds lists ``step`` and ``loss`` (mean over the last ``log_every`` steps),
    and float64 tensors ``loss_sum_by_t`` / ``count_by_t`` of shape (T,): the summed loss and
    the number of training examples seen at each timestep (for the per-timestep plot).
    Taught in chapter 5, "Clipping, mixed precision, progress and history"."""
    model: torch.nn.Module
    ema_model: torch.nn.Module
    history: dict = field(default_factory=dict)
    step: int = 0
    resumed_from: int | None = None


def draw_batch(gens: Generators, images: Tensor, labels: Tensor | None, config: TrainConfig,
               T: int, device: torch.device, fast: FastPath, null_class: int | None = None):
    """One batch ``(x0, t, eps, y)`` for Algorithm 1: images (with random flips if
    ``config.hflip``), timesteps, noise, and labels (each replaced by ``null_class`` with
    probability ``config.label_dropout``; None without labels), class labels (N,) or caption
    tokens (N, L), whose rows drop whole to padding (chapter 12). Every process draws the same
    global batch of ``config.batch_size`` from the same generators and keeps its own shard:
    x0, eps (B / world, C, H, W), t and y (B / world,).
    Taught in chapter 5, "One optimiser step, by hand"; sharded as in chapter 11 (``ch11-ddp``)."""
    rank, world = distributed_info()
    B, g = config.batch_size, gens.batch
    shard = slice(rank * (B // world), (rank + 1) * (B // world))
    idx = torch.randint(images.shape[0], (B,), generator=g, device=g.device)
    t = torch.randint(T, (B,), generator=g, device=g.device)
    eps = torch.randn((B, *images.shape[1:]), generator=gens.noise, device=device)
    drop = torch.rand(B, generator=g, device=g.device) < config.label_dropout if labels is not None else None
    flip = torch.rand(B, generator=g, device=g.device) < 0.5 if config.hflip else None
    idx, t, eps = idx[shard].to(images.device), t[shard].to(device), eps[shard]
    x0 = images[idx].to(device, non_blocking=True)
    if flip is not None:
        x0 = torch.where(flip[shard].to(device).view(-1, 1, 1, 1), x0.flip(-1), x0)
    if fast.channels_last:
        x0, eps = (v.contiguous(memory_format=torch.channels_last) for v in (x0, eps))
    y = None
    if labels is not None:
        y = labels[idx].to(device)
        dropped = drop[shard].to(device).view(-1, *[1] * (y.ndim - 1))   # a row of tokens whole
        y = torch.where(dropped, torch.full_like(y, null_class), y)
    return x0, t, eps, y


# -- A run's state, and what may resume it -----------------------------------------------
# What a resumed run must share with its checkpoint, besides the network (its .config and
# weight shapes) and the schedule (its betas). The batches, timesteps, noise, flips and label
# dropout are drawn as in an uninterrupted run only with the same seed, batch_size, number of
# images, hflip and label_dropout; and the checkpoint's EMA and optimiser carry ema_decay and
# weight_decay, which a new value would silently not change. The other settings may change on
# resume: steps, lr, warmup_steps, grad_clip, checkpoint_every, log_every and the fast-path
# switches (precision, channels_last, compile, data_on_device). The run then goes on from the
# checkpoint as asked, but no longer bit for bit as one uninterrupted run would (changing
# data_on_device, or the device, changes which generator draws the batches).
RESUME_MUST_MATCH = ("seed", "batch_size", "hflip", "label_dropout", "ema_decay", "weight_decay",
                     "prediction", "weighting", "snr_gamma")


@dataclass
class Run:
    """A training run in progress: what a checkpoint holds (model, EMA, optimiser, loss
    scaler, generators, log, step) and what checking and naming it takes.
    Taught in chapter 5, "What a checkpoint holds, and how it is written"."""
    model: torch.nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    gens: Generators
    log: LossLog
    config: TrainConfig
    schedule: object
    checkpoint: str | os.PathLike | None
    probe: tuple                     # a fixed batch (x0, t, eps, y) to check weights on
    num_images: int
    device: torch.device
    step: int = 0
    resumed_from: int | None = None
    last_good: int | None = None     # the step of the last checkpoint known good

    def loss_on_probe(self, net: torch.nn.Module) -> Tensor:
        c = self.config
        return diffusion_loss(net, self.schedule, *self.probe, prediction=c.prediction,
                              weighting=c.weighting, snr_gamma=c.snr_gamma)

    def unusable(self) -> str | None:
        return unusable_weights({"the model": self.model, "the EMA model": self.ema.model},
                                self.optimizer, self.loss_on_probe, self.device)

    def what_to_do(self) -> str:
        """Where to go on from after training diverged."""
        remedy = f"a lower lr (now {self.config.lr})"
        if self.config.grad_clip is None:
            remedy += " or grad_clip on"
        if self.checkpoint is None or self.last_good is None:
            return f"no checkpoint of this run was written: train afresh with {remedy}"
        return (f"the last good checkpoint is step {self.last_good} in {self.checkpoint}: "
                f"resume from it with {remedy}")

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "step": self.step, "history": self.log.history,
                "running": [float(r) for r in self.log.running], "rng": self.gens.state_dict(),
                "config": asdict(self.config), "model_config": getattr(self.model, "config", None),
                "betas": self.schedule.float64("betas"), "num_images": self.num_images}


def _probe_batch(images: Tensor, labels: Tensor | None, schedule, device, n: int = 4) -> tuple:
    """A fixed batch ``(x0, t, eps, y)`` to check weights on: the first ``n`` images (n, C, H,
    W), timesteps spread over 0..T-1 (n,), noise from a private generator (so the training's
    random streams are untouched and a resumed run stays exact), their labels or None."""
    n = min(n, images.shape[0])
    x0 = images[:n].to(device, torch.float32)
    t = torch.linspace(0, schedule.T - 1, n).round().long().to(device)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)).to(device)
    y = labels[:n].to(device) if labels is not None else None
    return x0, t, eps, y


def start(model, schedule, images: Tensor, labels: Tensor | None, config: TrainConfig,
          checkpoint, device: torch.device, fast: FastPath) -> Run:
    """A fresh run at step 0: seeded generators, the EMA, AdamW, the loss scaler, the log.
    Used by :func:`train`, chapter 5, "One optimiser step, by hand"."""
    gens = Generators.seeded(config.seed, device, fast.data_on_device)
    torch.manual_seed(config.seed + distributed_info()[0])   # dropout: a mask per process
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  **({"fused": True} if device.type == "cuda" else {}))
    return Run(model, EMA(model, config.ema_decay), optimizer, fast.grad_scaler(device), gens,
               LossLog(schedule.T, device), config, schedule, checkpoint,
               _probe_batch(images, labels, schedule, device), images.shape[0], device)


def resume_run(run: Run, state: dict) -> None:
    """Put a checked checkpoint's ``state`` (see :func:`ddpm_lib.runs.read_resumable`) into
    ``run``; a ``ValueError`` if its weights are unusable (saved by a run that diverged).
    Taught in chapter 5, "A simulated disconnect" (``ch05-checkpoints``)."""
    run.model.load_state_dict(state["model"])
    run.ema.load_state_dict(state["ema"])
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scaler.is_enabled() and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    run.log.history = {k: (v.cpu() if isinstance(v, torch.Tensor) else v)
                       for k, v in state["history"].items()}
    run.log.running = [torch.tensor(v) for v in state["running"]]
    run.step = run.resumed_from = state["step"]
    run.gens.load_state_dict(state["rng"])
    rank, world = distributed_info()
    if world > 1:     # the state saved is rank 0's: give each process its own dropout masks again
        torch.manual_seed(run.config.seed + rank + world * run.step)
    problem = run.unusable()
    if problem:
        raise ValueError(f"{run.checkpoint} (step {run.step}) cannot be resumed: {problem}. It "
                         "was saved by a run that diverged; resume from an earlier copy, or "
                         "delete it and train afresh with a lower lr")
    run.last_good = run.step


def flush(run: Run, write: bool = False) -> float | None:
    """:meth:`LossLog.flush` (or, with ``write``, :meth:`LossLog.write`, returning the logged
    loss), with what to do if the loss is no longer finite. Taught in chapter 11, "No
    synchronisation with the host" (``ch11-sync``)."""
    try:
        return run.log.write(run.step) if write else run.log.flush(run.step)
    except FloatingPointError as e:
        raise FloatingPointError(f"{e}; {run.what_to_do()}") from None


def save(run: Run) -> None:
    """Write a checkpoint, if the weights are worth one (every process checks, so that all
    of them stop together when they are not); rank 0 writes it, atomically.
    Taught in chapter 5, "What a checkpoint holds, and how it is written"."""
    flush(run)
    problem = run.unusable()
    if problem:
        raise FloatingPointError(f"after step {run.step} {problem}: training diverged, so "
                                 f"{run.checkpoint} was not overwritten; {run.what_to_do()}")
    if distributed_info()[0] == 0:
        save_checkpoint(run.state_dict(), run.checkpoint)
    run.last_good = run.step
    if distributed_info()[1] > 1:
        torch.distributed.barrier()     # nobody runs ahead of a checkpoint being written


def check_data(model, images: Tensor, labels: Tensor | None, check_range: bool = True):
    """Check the training set; return the null that label dropout puts in: the null class for
    class labels (N,), padding (id 0, the empty caption) for the caption tokens (N, L) of a
    :class:`~ddpm_lib.text.TextConditionedUNet`. Taught in chapter 12, "Training on captions"."""
    if not isinstance(model, TextConditionedUNet):
        training_data(images, labels, getattr(model, "num_classes", None), check_range)
        return getattr(model, "num_classes", None)
    training_data(images, None, None, check_range)
    if labels is not None:
        check_tokens(labels, len(model.vocabulary), images.shape[0], "caption tokens (labels)")
    return PAD_ID


def _place(model, schedule, images: Tensor, labels: Tensor | None, device: torch.device,
           fast: FastPath):
    """Move the model (channels-last if asked), the schedule and, with ``data_on_device``,
    the data to ``device``."""
    model.to(device)
    if fast.channels_last:
        model.to(memory_format=torch.channels_last)
    schedule = schedule.to(device) if schedule.device != device else schedule
    if fast.data_on_device:
        images = images.to(device)
        labels = labels.to(device) if labels is not None else None
    return schedule, images, labels


def loss_function(model, schedule, config: TrainConfig, fast: FastPath, device: torch.device):
    """``(x0, t, eps, y) -> per-image loss (B,)`` for the training step (L_simple, or the
    prediction and weighting of ``config``, :func:`ddpm_lib.objectives.diffusion_loss`): under the run's
    autocast, through DistributedDataParallel with several processes, compiled if asked.
    Taught in chapter 11, "torch.compile" (``ch11-compile``), with DDP in ``ch11-ddp``."""
    net = model
    if distributed_info()[1] > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None)

    def per_image_loss(x0, t, eps, y):
        with fast.autocast(device):
            return diffusion_loss(net, schedule, x0, t, eps, y=y, prediction=config.prediction,
                                  weighting=config.weighting, snr_gamma=config.snr_gamma,
                                  reduction="none")
    return torch.compile(per_image_loss, mode=fast.compile) if fast.compile else per_image_loss


def train(model: torch.nn.Module, schedule, images: Tensor, config: TrainConfig | None = None, *,
          labels: Tensor | None = None, checkpoint: str | os.PathLike | None = None,
          resume: bool = True, device=None, progress: bool = True, check_range: bool = True,
          callback=None, **overrides) -> TrainResult:
    """Train ``model`` to predict eps with L_simple on ``images`` (N, C, H, W) in [-1, 1] (or,
    with ``prediction=`` / ``weighting=``, another target or weighting: :mod:`ddpm_lib.objectives`).
    Taught in chapter 5, "What `train` adds around the step" (its GPU fast path in chapter 11).

    ``config`` (or keyword overrides such as ``steps=500``) sets the run. With ``checkpoint``, the
    state is saved there every ``checkpoint_every`` steps and at the end, and if the file already
    exists (and ``resume``) training continues from it up to ``config.steps``: run the same cell
    again after a disconnect and it picks up where it was. Class labels (N,) (or a text model's
    caption tokens (N, L), chapter 12) make a conditional model learn with label dropout.
    ``check_range=False`` accepts data outside [-1, 1] (latents of an autoencoder, say).
    ``callback(step, model, ema)``, if given, runs after every step; returning True stops
    training there (benchmarks use it to time steps and to stop at a wall-clock budget). With
    several processes it must give the same answer on all of them (decide from ``step``, not
    from a clock), or the others wait for ever at the next all-reduce.

    Checkpoints, before any training: the run takes the lock file ``<checkpoint>.lock``
    (another live run on the same checkpoint raises :class:`ddpm_lib.io.CheckpointBusy`; an
    unwritable folder an ``OSError``), and a checkpoint to resume from must be a training
    checkpoint made with the same network, schedule and drawing settings
    (:data:`RESUME_MUST_MATCH`; ``ValueError`` listing every difference), whose weights are
    finite and give a finite loss. Before each save the weights (model and EMA) and the
    optimiser's state must be finite and give a finite loss on a fixed batch; if not, the
    checkpoint is not overwritten and ``FloatingPointError`` names the last good one. A loss
    that becomes NaN or infinite raises ``FloatingPointError`` at the next logged step.

    On a CUDA GPU the fast path is on by default (:mod:`ddpm_lib.accel`): bf16 autocast (fp16
    with loss scaling on GPUs without bf16), channels_last, the data on the GPU, fused AdamW,
    a multi-tensor EMA update, ``torch.compile`` of the loss, and no host-device
    synchronisation between logged steps. Several processes (``torchrun``, after
    :func:`ddpm_lib.accel.init_distributed`) train one model with DistributedDataParallel,
    each on its shard of the same global batch (:func:`draw_batch`); every process keeps the
    EMA, rank 0 alone writes checkpoints and holds the lock.
    """
    if {"bf16", "fp16"} & overrides.keys():
        raise ValueError("bf16 and fp16 are one setting now: precision='fp32', 'bf16', 'fp16' or 'auto'")
    config = TrainConfig(**{**(asdict(config) if config else {}), **overrides})
    null_label = check_data(model, images, labels, check_range)
    rank, world = distributed_info()
    if config.batch_size % world:
        raise ValueError(f"batch_size {config.batch_size} must be divisible by the number of "
                         f"processes ({world})")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if device.type == "cuda" and device.index is None:      # "cuda" means the current GPU
        device = torch.device("cuda", torch.cuda.current_device())
    fast = fast_path(config.precision, config.channels_last, config.compile,
                     config.data_on_device, device)
    with hold_checkpoint(checkpoint, device):
        state = None          # a checkpoint is checked before the model, data or RNG are touched
        if checkpoint is not None and resume and Path(checkpoint).exists():
            keys = [k for k in RESUME_MUST_MATCH if labels is not None or k != "label_dropout"]
            state = read_resumable(checkpoint, lambda saved: resume_differences(
                saved, model, asdict(config), keys, images.shape[0], schedule.float64("betas")))
        schedule, images, labels = _place(model, schedule, images, labels, device, fast)
        run = start(model, schedule, images, labels, config, checkpoint, device, fast)
        if state is not None:
            resume_run(run, state)
        per_image_loss = loss_function(model, schedule, config, fast, device)
        model.train()
        bar = tqdm(total=config.steps, initial=run.step, desc="train",
                   disable=not progress or rank != 0)
        while run.step < config.steps:
            x0, t, eps, y = draw_batch(run.gens, images, labels, config, schedule.T, device,
                                       fast, null_label)
            for group in run.optimizer.param_groups:
                group["lr"] = lr_at(run.step, config.lr, config.warmup_steps)
            with trusted_inputs():           # valid by construction: no checks, no host reads
                per_image = per_image_loss(x0, t, eps, y)
            loss = per_image.mean()
            optimizer_step(loss, run.optimizer, run.scaler, model.parameters(), config.grad_clip)
            run.ema.update(model)
            run.step += 1
            run.log.add(loss, per_image, t)
            if run.step % config.log_every == 0:
                bar.set_postfix(loss=f"{flush(run, write=True):.4f}")
            bar.update(1)
            if checkpoint is not None and config.checkpoint_every and run.step % config.checkpoint_every == 0:
                save(run)
            if callback is not None and callback(run.step, model, run.ema):
                break
        bar.close()
        flush(run)
        if checkpoint is not None:
            save(run)
    model.eval()
    return TrainResult(model=model, ema_model=run.ema.model, history=run.log.history,
                       step=run.step, resumed_from=run.resumed_from)
