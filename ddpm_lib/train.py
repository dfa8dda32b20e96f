"""Training a noise predictor with L_simple.

One step (Ho et al. 2020, Algorithm 1)::

    x0 ~ data,  t ~ Uniform{0..T-1},  eps ~ N(0, I)
    loss = || eps - eps_theta(sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps, t) ||^2

around which :func:`train` adds what a real run needs: AdamW, an exponential moving
average (EMA) of the weights with warm-up, gradient clipping, mixed precision on a GPU
(bf16, or fp16 with loss scaling where the GPU has no bf16), random horizontal flips, a
tqdm progress bar, a loss history, and checkpoints written atomically every N steps from
which a run resumes exactly where it stopped (model, EMA, optimiser, step, RNG states).

Nothing is lost: a checkpoint is written only when its weights are finite and give a finite
loss (a diverging run keeps its last good checkpoint), a resumed run must use the settings its
checkpoint was made with, and a lock file keeps two runs from writing the same checkpoint.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import diffusion
from .checks import trusted_inputs
from .io import FILE_KINDS, CheckpointBusy, acquire_lock, file_kind, release_lock
from .io import load_checkpoint, save_checkpoint  # noqa: F401  (importable from here, as before)

Tensor = torch.Tensor


COMPILE_MODES = (None, False, True, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# compile=None on a CUDA GPU: "reduce-overhead" adds CUDA graphs, which remove the launch
# overhead that dominates small networks (measured in the Benchmarks appendix)
DEFAULT_COMPILE_MODE = "reduce-overhead"


@dataclass
class TrainConfig:
    """Settings of a training run. ``steps`` is the total number of optimiser steps."""
    steps: int = 1000
    batch_size: int = 128
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0            # linear learning-rate warm-up
    grad_clip: float | None = 1.0    # max global gradient norm, None for no clipping
    ema_decay: float = 0.9999        # EMA decay; warm-up uses min(decay, (1 + n) / (10 + n))
    label_dropout: float = 0.1       # for class-conditional models: P(label -> null class)
    hflip: bool = False              # flip each training image left-right with probability 1/2
    # The fast path. None means "on a CUDA GPU"; all are harmless to leave at None on a CPU,
    # where they are off. Mixed precision: bf16 on GPUs that compute it (compute capability
    # >= 8: A100, L4, H100), fp16 with loss scaling on the others (T4, V100).
    bf16: bool | None = None         # bf16 autocast (GroupNorm, softmax and the loss stay float32)
    fp16: bool | None = None         # fp16 autocast + GradScaler; None: where bf16 is off and left at None
    channels_last: bool | None = None  # NHWC memory layout for the convolutions
    compile: bool | str | None = None  # torch.compile the loss; a string picks the mode, e.g. "reduce-overhead"
    data_on_device: bool | None = None  # keep the dataset on the GPU and draw batches there
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
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 are two kinds of mixed precision: turn on one of them")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {self.compile!r}")
        if self.checkpoint_every < 0 or self.log_every < 1 or self.warmup_steps < 0:
            raise ValueError("checkpoint_every and warmup_steps must be >= 0, log_every >= 1")


class EMA:
    """Exponential moving average of a model's parameters (and a copy of its buffers).

    After update n (counting from 0) the decay is ``min(decay, (1 + n) / (10 + n))``, so the
    average follows the fast-changing early weights and settles to ``decay`` later.
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.9999):
        self.decay = decay
        self.num_updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = self.current_decay()
        # ema <- ema + (1 - d) (p - ema) = d ema + (1 - d) p, for all parameters in a few kernels
        torch._foreach_lerp_(list(self.model.parameters()), [p.detach() for p in model.parameters()], 1.0 - d)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "num_updates": self.num_updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.num_updates = state["num_updates"]
        self.decay = state["decay"]


@dataclass
class TrainResult:
    """What :func:`train` returns: the trained model, its EMA copy, and the history.

    ``history`` holds lists ``step`` and ``loss`` (mean over the last ``log_every`` steps),
    and float64 tensors ``loss_sum_by_t`` / ``count_by_t`` of shape (T,): the summed loss and
    the number of training examples seen at each timestep (for the per-timestep plot).
    """
    model: torch.nn.Module
    ema_model: torch.nn.Module
    history: dict = field(default_factory=dict)
    step: int = 0
    resumed_from: int | None = None


def _rng_state(gen_cpu: torch.Generator, gen_device: torch.Generator | None) -> dict:
    state = {"cpu_generator": gen_cpu.get_state(), "torch": torch.get_rng_state()}
    if gen_device is not None:
        state["device_generator"] = gen_device.get_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, gen_cpu: torch.Generator, gen_device: torch.Generator | None) -> None:
    gen_cpu.set_state(state["cpu_generator"])
    torch.set_rng_state(state["torch"])
    if gen_device is not None and "device_generator" in state:
        gen_device.set_state(state["device_generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _check_data(images: Tensor, labels: Tensor | None, model, check_range: bool = True) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
        raise ValueError("images must be a float tensor of shape (N, C, H, W), values in [-1, 1]")
    if images.shape[0] == 0:
        raise ValueError("images is empty")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or infinite values")
    if check_range and (images.min() < -1.001 or images.max() > 1.001):
        raise ValueError(f"images must be scaled to [-1, 1], got values in "
                         f"[{images.min().item():.3g}, {images.max().item():.3g}]; "
                         "use ddpm_lib.data.load, or x * 2 - 1 for images in [0, 1]")
    num_classes = getattr(model, "num_classes", None)
    if labels is not None:
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        if not num_classes:
            raise ValueError("labels were given but the model is unconditional (num_classes=None)")
        if labels.is_floating_point() or labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"labels must be integers in 0..{num_classes - 1}, got {labels.dtype} values "
                             f"from {labels.min().item()} to {labels.max().item()}")


def gpu_has_bf16(device: torch.device) -> bool:
    """Whether ``device`` is a CUDA GPU that computes bf16 (compute capability 8 and newer)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def _resolve_fast_path(config: TrainConfig, device: torch.device) -> dict:
    """What the fast path does on this device: each ``None`` setting becomes "on a CUDA GPU"."""
    cuda = device.type == "cuda"
    has_bf16 = gpu_has_bf16(device)
    bf16 = config.bf16 if config.bf16 is not None else (has_bf16 and not config.fp16)
    fp16 = config.fp16 if config.fp16 is not None else (cuda and not has_bf16 and config.bf16 is None)
    # CUDA graphs under DDP have open bug reports upstream and were never run here: plain compile there
    default_mode = DEFAULT_COMPILE_MODE if distributed_info()[1] == 1 else "default"
    compile_mode = config.compile if config.compile is not None else (default_mode if cuda else False)
    if compile_mode is True:
        compile_mode = "default"
    return dict(bf16=bool(bf16), fp16=bool(fp16),
                channels_last=config.channels_last if config.channels_last is not None else cuda,
                compile=compile_mode or False,
                data_on_device=config.data_on_device if config.data_on_device is not None else cuda)


def distributed_info() -> tuple[int, int]:
    """``(rank, world_size)`` of this process: ``(0, 1)`` unless torch.distributed is initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_distributed(backend: str | None = None) -> torch.device:
    """Join the process group that ``torchrun`` describes (RANK, WORLD_SIZE, MASTER_ADDR, ...)
    and return this process's device: ``cuda:LOCAL_RANK`` with NCCL on GPUs, the CPU with gloo."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError("init_distributed needs the variables that torchrun sets; "
                           "start the script with `torchrun --nproc_per_node=N ...`")
    cuda = torch.cuda.is_available() and backend != "gloo"
    backend = backend or ("nccl" if cuda else "gloo")
    if cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend)
    return device


# ----------------------------------------------------------------------------------------
# Resuming: the checkpoint must belong to this run
# ----------------------------------------------------------------------------------------
# What a resumed run must share with its checkpoint, besides the network (its .config and
# weight shapes) and the schedule (its betas). The batches, timesteps, noise, flips and label
# dropout are drawn as in an uninterrupted run only with the same seed, batch_size, number of
# images, hflip and label_dropout; and the checkpoint's EMA and optimiser carry ema_decay and
# weight_decay, which a new value would silently not change. The other settings may change on
# resume: steps, lr, warmup_steps, grad_clip, checkpoint_every, log_every and the fast-path
# switches (bf16, fp16, channels_last, compile, data_on_device). The run then goes on from the
# checkpoint as asked, but no longer bit for bit as one uninterrupted run would (changing
# data_on_device, or the device, changes which generator draws the batches).
RESUME_MUST_MATCH = ("seed", "batch_size", "hflip", "label_dropout", "ema_decay", "weight_decay")


def _plain(value):
    """Tuples as lists (in dicts too), so that a configuration compares equal after a save
    and a load."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _betas_text(betas: Tensor) -> str:
    return f"T={betas.numel()}, betas {betas[0].item():.4g} .. {betas[-1].item():.4g}"


def _network_differences(state: dict, model) -> list[str]:
    """Lines ``network <key>: checkpoint <a>, this run <b>`` for the model's .config, or, for
    a model without one, the weights whose names or shapes differ."""
    saved, now = state.get("model_config"), getattr(model, "config", None)
    if saved is not None and now is not None:
        saved, now = _plain(saved), _plain(now)
        return [f"network {key}: checkpoint {saved.get(key)}, this run {now.get(key)}"
                for key in sorted(saved.keys() | now.keys()) if saved.get(key) != now.get(key)]
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    saved_shapes = {k: tuple(v.shape) for k, v in state["model"].items()}
    differing = sorted(k for k in shapes.keys() | saved_shapes.keys()
                       if shapes.get(k) != saved_shapes.get(k))
    if not differing:
        return []
    k = differing[0]
    return [f"network weights: {len(differing)} differ in name or shape, e.g. {k}: checkpoint "
            f"{saved_shapes.get(k, 'absent')}, this run {shapes.get(k, 'absent')}"]


def _resume_differences(state: dict, model, schedule, images: Tensor, labels: Tensor | None,
                        config: TrainConfig) -> list[str]:
    """Every way this run differs from the run that wrote ``state``, one line each (see
    :data:`RESUME_MUST_MATCH`); an empty list where it may resume."""
    found = []
    saved_betas, betas = state["betas"].double().cpu(), schedule.float64("betas")
    # the same schedule built on another CPU may differ in the last bit (torch.linspace's
    # vectorised and scalar paths round differently): compare to 1e-12, not bit for bit
    if saved_betas.shape != betas.shape or not torch.allclose(saved_betas, betas, rtol=1e-12, atol=0):
        found.append(f"schedule: checkpoint {_betas_text(saved_betas)}, "
                     f"this run {_betas_text(betas)}")
    found += _network_differences(state, model)
    saved_run = state.get("config") or {}
    for key in RESUME_MUST_MATCH:
        if key == "label_dropout" and labels is None:
            continue                                # no labels, nothing dropped
        if key in saved_run and saved_run[key] != getattr(config, key):
            found.append(f"{key}: checkpoint {saved_run[key]!r}, this run {getattr(config, key)!r}")
    if "num_images" in state and state["num_images"] != images.shape[0]:
        found.append(f"number of images: checkpoint {state['num_images']}, "
                     f"this run {images.shape[0]}")
    return found


def _read_resumable(checkpoint, model, schedule, images: Tensor, labels: Tensor | None,
                    config: TrainConfig) -> dict:
    """Load ``checkpoint`` (on the CPU) and check that this run may resume from it: a
    training checkpoint, made with the same network, schedule and drawing settings."""
    state = load_checkpoint(checkpoint, map_location="cpu")
    kind = file_kind(state)
    if kind != "checkpoint":
        hint = (" (to go on with the run it was exported from, pass that run's checkpoint)"
                if kind == "weights" else "")
        raise ValueError(f"{checkpoint} is {FILE_KINDS[kind]}, not a training checkpoint: it "
                         "holds no optimiser state or step to resume from. Pass a new checkpoint "
                         f"path to train afresh{hint}")
    differences = _resume_differences(state, model, schedule, images, labels, config)
    if differences:
        raise ValueError(f"{checkpoint} (step {state['step']}) was made by a run with other "
                         "settings:\n  " + "\n  ".join(differences)
                         + "\nResume with the checkpoint's settings, or pass another checkpoint "
                           "path to start a new run with these.")
    return state


# ----------------------------------------------------------------------------------------
# Weights worth keeping: finite, and a finite loss
# ----------------------------------------------------------------------------------------
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


@torch.no_grad()
def _probe_loss(model: torch.nn.Module, schedule, probe: tuple) -> float:
    """L_simple of ``model`` on the probe batch, in float32 and in eval mode (no dropout, so no
    random numbers are drawn). One host read."""
    was_training = model.training
    model.eval()
    try:
        return diffusion.loss_simple(model, schedule, *probe).item()
    finally:
        model.train(was_training)


def _all_finite(tensors, device) -> bool:
    """Whether every float tensor in ``tensors`` is finite, with one host read."""
    flags = [v.isfinite().all().to(device) for v in tensors if v.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def _largest_weight(model: torch.nn.Module) -> float:
    return max(p.detach().abs().max().item() for p in model.parameters())


def _unusable_weights(model, ema: EMA, optimizer, schedule, probe: tuple, device) -> str | None:
    """Why the state of a run is not worth a checkpoint (non-finite tensors, or a non-finite
    loss on the probe batch, model or EMA), or None when it is. Reads the device: call it only
    where a checkpoint is saved or loaded."""
    optimizer_state = [v for per_parameter in optimizer.state.values()
                       for v in per_parameter.values() if torch.is_tensor(v)]
    groups = (("the model's weights", model.state_dict().values()),
              ("the EMA's weights", ema.model.state_dict().values()),
              ("the optimiser's state", optimizer_state))
    for name, tensors in groups:
        if not _all_finite(list(tensors), device):
            return f"{name} hold NaN or infinite values"
    for name, net in (("the model", model), ("the EMA model", ema.model)):
        loss = _probe_loss(net, schedule, probe)
        if not math.isfinite(loss):
            return (f"{name}'s weights are finite (largest |w| {_largest_weight(net):.3g}) but "
                    f"give a {loss} loss on a fixed batch")
    return None


# ----------------------------------------------------------------------------------------
# One run per checkpoint
# ----------------------------------------------------------------------------------------
def _all_processes_agree(ok: bool, device: torch.device) -> bool:
    """Under DDP, whether ``ok`` holds on every process (one all-reduce); else ``ok``."""
    if distributed_info()[1] == 1:
        return ok
    on = device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([int(ok)], device=on)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


@contextlib.contextmanager
def _checkpoint_held(checkpoint, device: torch.device):
    """Hold the lock of ``checkpoint`` (``<checkpoint>.lock``, see :func:`ddpm_lib.io.acquire_lock`)
    for the run: rank 0 takes it, and under DDP every process learns whether it did. Taking it
    is also the up-front check that checkpoints can be written there."""
    if checkpoint is None:
        yield
        return
    lock, error = None, None
    if distributed_info()[0] == 0:
        try:
            lock = acquire_lock(checkpoint)
        except (OSError, ValueError, CheckpointBusy) as e:
            error = e
    if not _all_processes_agree(error is None, device):
        raise error or CheckpointBusy(f"process 0 could not take the lock of {checkpoint}; "
                                      "see its message")
    try:
        yield
    finally:
        if lock is not None:
            release_lock(lock)


def train(model: torch.nn.Module, schedule, images: Tensor, config: TrainConfig | None = None, *,
          labels: Tensor | None = None, checkpoint: str | os.PathLike | None = None,
          resume: bool = True, device=None, progress: bool = True, check_range: bool = True,
          callback=None, **overrides) -> TrainResult:
    """Train ``model`` to predict eps with L_simple on ``images`` (N, C, H, W) in [-1, 1].

    ``config`` (or keyword overrides such as ``steps=500``) sets the run. With
    ``checkpoint``, the state is saved there every ``checkpoint_every`` steps and at the end,
    and if the file already exists (and ``resume``) training continues from it up to
    ``config.steps``: run the same cell again after a disconnect and it picks up where it was.
    Class labels (N,) make a class-conditional model learn with label dropout.
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

    On a CUDA GPU the fast path is on by default (see :class:`TrainConfig`): bf16 autocast
    (fp16 with a GradScaler on GPUs without bf16), channels_last, the dataset kept on the GPU,
    fused AdamW, a multi-tensor EMA update, ``torch.compile`` of the loss, and no host-device
    synchronisation between logged steps (the checks above run only where a checkpoint is
    saved or loaded).

    Several processes (``torchrun``; call :func:`init_distributed` first) train one model
    with DistributedDataParallel: every process draws the same global batch of
    ``batch_size`` images, timesteps and noise from the same seeded generators and keeps its
    own slice of it, so the averaged gradient is the one a single process would compute on
    the whole batch. Every process keeps the EMA; rank 0 alone writes checkpoints and holds
    the lock.
    """
    config = TrainConfig(**{**(asdict(config) if config else {}), **overrides})
    _check_data(images, labels, model, check_range)
    rank, world = distributed_info()
    if config.batch_size % world:
        raise ValueError(f"batch_size {config.batch_size} must be divisible by the number of processes ({world})")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if device.type == "cuda" and device.index is None:      # "cuda" means the current GPU
        device = torch.device("cuda", torch.cuda.current_device())
    with _checkpoint_held(checkpoint, device):
        state = None
        if checkpoint is not None and resume and Path(checkpoint).exists():
            state = _read_resumable(checkpoint, model, schedule, images, labels, config)
        return _train(model, schedule, images, labels, config, state, checkpoint, device,
                      progress, callback)


def _train(model, schedule, images: Tensor, labels: Tensor | None, config: TrainConfig,
           state: dict | None, checkpoint, device: torch.device, progress: bool,
           callback) -> TrainResult:
    """The training loop of :func:`train`, from ``state`` (a checked checkpoint) or afresh."""
    rank, world = distributed_info()
    fast = _resolve_fast_path(config, device)
    model.to(device)
    if fast["channels_last"]:
        model.to(memory_format=torch.channels_last)
    schedule = schedule.to(device) if schedule.device != device else schedule
    if fast["data_on_device"]:
        images = images.to(device)
        labels = labels.to(device) if labels is not None else None

    # All randomness comes from seeded generators, identical on every process. gen_batch draws the
    # image indices, t, the label dropout and the flips; eps comes from the device's generator
    # (the same one on a CPU, a GPU generator on a GPU).
    gen_cpu = torch.Generator().manual_seed(config.seed)
    gen_device = torch.Generator(device).manual_seed(config.seed + 1) if device.type != "cpu" else None
    gen_batch = gen_device if fast["data_on_device"] and gen_device is not None else gen_cpu
    torch.manual_seed(config.seed + rank)                        # dropout: a different mask per process
    ema = EMA(model, config.ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  **({"fused": True} if device.type == "cuda" else {}))
    # fp16 loss scaling: the loss is multiplied by a large factor before backward, so that small
    # gradients do not round to zero in fp16; steps whose gradients overflow are skipped and the
    # factor shrinks. Disabled, the scaler passes everything through unchanged.
    scaler = torch.amp.GradScaler(device.type if fast["fp16"] else "cpu", enabled=fast["fp16"])
    running = []   # losses since the last logged step (device tensors until they are logged)
    stat_dtype = torch.float32 if device.type == "mps" else torch.float64
    history = {"step": [], "loss": [], "loss_sum_by_t": torch.zeros(schedule.T, dtype=torch.float64),
               "count_by_t": torch.zeros(schedule.T, dtype=torch.float64)}
    # this process's share of the per-timestep sums since the start (or the resume), on the device
    sum_by_t = torch.zeros(schedule.T, dtype=stat_dtype, device=device)
    count_by_t = torch.zeros(schedule.T, dtype=stat_dtype, device=device)
    step, resumed_from = 0, None
    last_good = None                # the step of the last checkpoint known good, for the messages
    probe = _probe_batch(images, labels, schedule, device)

    if state is not None:
        # loaded on the CPU: the generator states must stay CPU tensors; load_state_dict moves
        # the rest
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler.is_enabled() and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        history = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in state["history"].items()}
        step = resumed_from = state["step"]
        running = [torch.tensor(v) for v in state["running"]]
        _set_rng_state(state["rng"], gen_cpu, gen_device)
        if world > 1:     # the global state saved is rank 0's: give each process its own dropout masks again
            torch.manual_seed(config.seed + rank + world * step)
        problem = _unusable_weights(model, ema, optimizer, schedule, probe, device)
        if problem:
            raise ValueError(f"{checkpoint} (step {step}) cannot be resumed: {problem}. It was "
                             "saved by a run that diverged; resume from an earlier copy, or delete "
                             "it and train afresh with a lower lr")
        last_good = step

    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    def loss_per_image(x0, t, eps, y):
        with torch.autocast(device.type, dtype=torch.bfloat16 if fast["bf16"] else torch.float16,
                            enabled=fast["bf16"] or fast["fp16"]):
            return diffusion.loss_simple(net, schedule, x0, t, eps, y=y, reduction="none")
    if fast["compile"]:
        loss_per_image = torch.compile(loss_per_image, mode=fast["compile"])

    def reduced(x: Tensor) -> Tensor:       # summed over processes
        if world > 1:
            x = x.clone()
            torch.distributed.all_reduce(x)
        return x

    def what_to_do() -> str:
        """Where to go on from after training diverged."""
        remedy = f"a lower lr (now {config.lr})"
        if config.grad_clip is None:
            remedy += " or grad_clip on"
        if checkpoint is None or last_good is None:
            return f"no checkpoint of this run was written: train afresh with {remedy}"
        return (f"the last good checkpoint is step {last_good} in {checkpoint}: resume from it "
                f"with {remedy}")

    def flush_history() -> None:
        """Move the losses and per-timestep sums to ``history`` (one synchronisation)."""
        nonlocal running
        if running:
            losses = reduced(torch.stack([r.to(device) for r in running]).float()) / world
            losses = losses.cpu()
            if not torch.isfinite(losses).all():
                bad = step - len(running) + int((~torch.isfinite(losses)).nonzero()[0])
                raise FloatingPointError(f"the loss became {losses[~torch.isfinite(losses)][0].item()} at step "
                                         f"{bad + 1}; {what_to_do()}")
            running = [losses[i] for i in range(len(losses))]
        history["loss_sum_by_t"] += reduced(sum_by_t).cpu().double()
        history["count_by_t"] += reduced(count_by_t).cpu().double()
        sum_by_t.zero_()
        count_by_t.zero_()

    def checkpoint_state() -> dict:
        return {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "step": step, "history": history, "running": [float(r) for r in running],
                "rng": _rng_state(gen_cpu, gen_device), "config": asdict(config),
                "model_config": getattr(model, "config", None), "betas": schedule.float64("betas"),
                "num_images": images.shape[0]}

    def save() -> None:
        """Write a checkpoint, if the weights are worth one (every process checks, so that all
        of them stop together when they are not)."""
        nonlocal last_good
        flush_history()
        problem = _unusable_weights(model, ema, optimizer, schedule, probe, device)
        if problem:
            raise FloatingPointError(f"after step {step} {problem}: training diverged, so "
                                     f"{checkpoint} was not overwritten; {what_to_do()}")
        if rank == 0:
            save_checkpoint(checkpoint_state(), checkpoint)
        last_good = step
        if world > 1:
            torch.distributed.barrier()     # nobody runs ahead of a checkpoint being written

    B, shard = config.batch_size, slice(rank * (config.batch_size // world), (rank + 1) * (config.batch_size // world))
    model.train()
    bar = tqdm(total=config.steps, initial=step, desc="train", disable=not progress or rank != 0)
    while step < config.steps:
        # the global batch, drawn identically by every process; each keeps its shard
        idx = torch.randint(images.shape[0], (B,), generator=gen_batch, device=gen_batch.device)
        t = torch.randint(schedule.T, (B,), generator=gen_batch, device=gen_batch.device)
        eps = torch.randn((B, *images.shape[1:]), generator=gen_device or gen_cpu, device=device)
        drop = (torch.rand(B, generator=gen_batch, device=gen_batch.device) < config.label_dropout
                if labels is not None else None)
        flip = torch.rand(B, generator=gen_batch, device=gen_batch.device) < 0.5 if config.hflip else None
        idx, t, eps = idx[shard].to(images.device), t[shard].to(device), eps[shard]
        x0 = images[idx].to(device, non_blocking=True)
        if flip is not None:
            x0 = torch.where(flip[shard].to(device).view(-1, 1, 1, 1), x0.flip(-1), x0)
        if fast["channels_last"]:
            x0, eps = x0.contiguous(memory_format=torch.channels_last), eps.contiguous(memory_format=torch.channels_last)
        y = None
        if labels is not None:
            y = labels[idx].to(device)
            y = torch.where(drop[shard].to(device), torch.full_like(y, model.num_classes), y)

        lr = config.lr * min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else config.lr
        for group in optimizer.param_groups:
            group["lr"] = lr
        with trusted_inputs():           # valid by construction: no value checks, no host reads
            per_image = loss_per_image(x0, t, eps, y)
        loss = per_image.mean()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if config.grad_clip is not None:
            scaler.unscale_(optimizer)       # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        ema.update(model)
        step += 1

        running.append(loss.detach())
        sum_by_t.index_add_(0, t, per_image.detach().to(stat_dtype))
        count_by_t.index_add_(0, t, torch.ones_like(t, dtype=stat_dtype))
        if step % config.log_every == 0:
            flush_history()
            history["step"].append(step)
            history["loss"].append(sum(float(r) for r in running) / len(running))
            bar.set_postfix(loss=f"{history['loss'][-1]:.4f}")
            running = []
        bar.update(1)
        if checkpoint is not None and config.checkpoint_every and step % config.checkpoint_every == 0:
            save()
        if callback is not None and callback(step, model, ema):
            break
    bar.close()
    flush_history()
    if checkpoint is not None:
        save()
    model.eval()
    return TrainResult(model=model, ema_model=ema.model, history=history, step=step, resumed_from=resumed_from)
