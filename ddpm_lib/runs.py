"""The pieces of a training run that do not depend on what is trained: its random
generators, the learning rate, one optimiser step, the loss log, and the checkpoints a run stops and goes on
from. :func:`ddpm_lib.train.train` (the noise predictor) and
:func:`ddpm_lib.autoencoder.train_autoencoder` (the VAE) are both built from them. Taught in
chapter 5, "Checkpoints, Google Drive and resuming" (``ch05-checkpoints``).

Nothing is lost: a checkpoint is written only when its weights are finite and give a finite
loss (:func:`unusable_weights`), a run resumes only from a checkpoint made with the same
settings (:func:`read_resumable`), and a lock file keeps two runs from writing the same
checkpoint (:func:`hold_checkpoint`).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from .accel import all_processes_agree, distributed_info, summed_over_processes
from .io import FILE_KINDS, CheckpointBusy, acquire_lock, file_kind, load_checkpoint, release_lock

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------
# Randomness, learning rate, one optimiser step
# ----------------------------------------------------------------------------------------
@dataclass
class Generators:
    """All the randomness of a run, seeded: ``cpu`` (a CPU generator) and ``device`` (one on
    the GPU, or None on a CPU). Batches are drawn where the data are (``batch``), noise on the
    device (``noise``). With the same seed, every process of a DDP run draws the same.
    Taught in chapter 5, "One optimiser step, by hand" (one seeded generator draws the batch);
    saved as in "What a checkpoint holds, and how it is written" (``ch05-checkpoints``); shared
    by the processes in chapter 11, "How `train()` shards a batch" (``ch11-ddp``)."""
    cpu: torch.Generator
    device: torch.Generator | None
    data_on_device: bool = False

    @classmethod
    def seeded(cls, seed: int, device: torch.device, data_on_device: bool = False) -> "Generators":
        on_device = torch.Generator(device).manual_seed(seed + 1) if device.type != "cpu" else None
        return cls(torch.Generator().manual_seed(seed), on_device, data_on_device)

    @property
    def batch(self) -> torch.Generator:
        return self.device if self.data_on_device and self.device is not None else self.cpu

    @property
    def noise(self) -> torch.Generator:
        return self.device or self.cpu

    def state_dict(self) -> dict:
        """The generators' states, and torch's global ones (dropout draws from those)."""
        state = {"cpu_generator": self.cpu.get_state(), "torch": torch.get_rng_state()}
        if self.device is not None:
            state["device_generator"] = self.device.get_state()
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.cpu.set_state(state["cpu_generator"])
        torch.set_rng_state(state["torch"])
        if self.device is not None and "device_generator" in state:
            self.device.set_state(state["device_generator"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


_NO_SCALING = torch.amp.GradScaler("cpu", enabled=False)    # passes everything through


def lr_at(step: int, lr: float, warmup_steps: int = 0) -> float:
    """The learning rate of optimiser step ``step`` (counting from 0): a linear warm-up over
    ``warmup_steps`` steps, then constant. Taught in chapter 5, "One optimiser step, by hand"."""
    return lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps else lr


def optimizer_step(loss: Tensor, optimizer, scaler, parameters, grad_clip: float | None) -> None:
    """Backward and one step: gradients of ``loss`` (scaled by ``scaler`` for fp16; None for
    no scaling), clipped to a global norm of ``grad_clip`` (the true gradients, unscaled
    first), then the update. Taught in chapter 5, "One optimiser step, by hand"; the loss
    scaling in chapter 11, "float16 and loss scaling, for GPUs without bf16" (``ch11-fp16``)."""
    scaler = scaler or _NO_SCALING
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip is not None:
        scaler.unscale_(optimizer)       # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    scaler.step(optimizer)
    scaler.update()


class LossLog:
    """The losses of a run: kept on the device between logged steps (no host reads), moved
    to ``history`` (see :class:`ddpm_lib.train.TrainResult`) by :meth:`flush`. Under DDP the losses are
    averaged and the per-timestep sums summed over the processes.
    Taught in chapter 5, "Clipping, mixed precision, progress and history", and chapter 11,
    "No synchronisation with the host" (``ch11-sync``)."""

    def __init__(self, T: int, device: torch.device):
        self.device = device
        self.dtype = torch.float32 if device.type == "mps" else torch.float64
        self.history = {"step": [], "loss": [], "loss_sum_by_t": torch.zeros(T, dtype=torch.float64),
                        "count_by_t": torch.zeros(T, dtype=torch.float64)}
        self.running = []      # the batch losses since the last logged step
        # this process's share of the per-timestep sums since the last flush, on the device
        self.sum_by_t = torch.zeros(T, dtype=self.dtype, device=device)
        self.count_by_t = torch.zeros(T, dtype=self.dtype, device=device)

    def add(self, loss: Tensor, per_image: Tensor, t: Tensor) -> None:
        """One step's batch loss (a scalar) and its per-image losses at timesteps ``t``."""
        self.running.append(loss.detach())
        self.sum_by_t.index_add_(0, t, per_image.detach().to(self.dtype))
        self.count_by_t.index_add_(0, t, torch.ones_like(t, dtype=self.dtype))

    def flush(self, step: int) -> None:
        """Move the sums to ``history`` and the running losses to the host (one
        synchronisation); ``FloatingPointError`` naming the step where a loss is not finite."""
        world = distributed_info()[1]
        if self.running:
            losses = summed_over_processes(torch.stack([r.to(self.device) for r in self.running]).float())
            losses = (losses / world).cpu()
            bad = ~torch.isfinite(losses)
            if bad.any():
                first = int(bad.nonzero()[0])
                raise FloatingPointError(f"the loss became {losses[first].item()} at step "
                                         f"{step - len(self.running) + first + 1}")
            self.running = [losses[i] for i in range(len(losses))]
        self.history["loss_sum_by_t"] += summed_over_processes(self.sum_by_t).cpu().double()
        self.history["count_by_t"] += summed_over_processes(self.count_by_t).cpu().double()
        self.sum_by_t.zero_()
        self.count_by_t.zero_()

    def write(self, step: int) -> float:
        """Log the mean loss since the last logged step under ``step``, and return it."""
        self.flush(step)
        self.history["step"].append(step)
        self.history["loss"].append(sum(float(r) for r in self.running) / len(self.running))
        self.running = []
        return self.history["loss"][-1]


# ----------------------------------------------------------------------------------------
# Resuming: the checkpoint must belong to this run
# ----------------------------------------------------------------------------------------
def _plain(value):
    """Tuples as lists (in dicts too), so that a configuration compares equal after a save
    and a load."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def network_differences(state: dict, model) -> list[str]:
    """Lines ``network <key>: checkpoint <a>, this run <b>`` for the model's .config, or, for
    a model without one, the weights whose names or shapes differ. Used when a run resumes, in
    chapter 5, "Checkpoints, Google Drive and resuming" (``ch05-checkpoints``)."""
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


def _betas_text(betas: Tensor) -> str:
    return f"T={betas.numel()}, betas {betas[0].item():.4g} .. {betas[-1].item():.4g}"


def resume_differences(state: dict, model, settings: dict, keys: Iterable[str], num_images: int,
                       betas: Tensor | None = None) -> list[str]:
    """Every way this run differs from the run that wrote ``state``, one line each: the
    schedule (``betas``, for a diffusion model), the network, the ``settings`` named in
    ``keys``, and the number of training images. An empty list where it may resume.
    Used when a run resumes, in
    chapter 5, "Checkpoints, Google Drive and resuming" (``ch05-checkpoints``)."""
    found = []
    if betas is not None:
        # the same schedule built on another CPU may differ in the last bit (torch.linspace's
        # vectorised and scalar paths round differently): compare to 1e-12, not bit for bit
        saved, betas = state["betas"].double().cpu(), betas.double().cpu()
        if saved.shape != betas.shape or not torch.allclose(saved, betas, rtol=1e-12, atol=0):
            found.append(f"schedule: checkpoint {_betas_text(saved)}, this run {_betas_text(betas)}")
    found += network_differences(state, model)
    saved_settings = state.get("config") or {}
    found += [f"{key}: checkpoint {saved_settings[key]!r}, this run {settings[key]!r}"
              for key in keys if key in saved_settings and saved_settings[key] != settings[key]]
    if "num_images" in state and state["num_images"] != num_images:
        found.append(f"number of images: checkpoint {state['num_images']}, this run {num_images}")
    return found


def read_resumable(checkpoint, differences: Callable[[dict], list[str]],
                   kind: str = "checkpoint") -> dict:
    """Load ``checkpoint`` (on the CPU) and check that this run may resume from it: a file of
    ``kind`` (see :data:`ddpm_lib.io.FILE_KINDS`), and ``differences(state)`` (every way this
    run differs from the one that wrote it, one line each) empty. Else a ``ValueError`` that
    says what the file is, or lists the differences. Used in chapter 5, "A simulated
    disconnect" (``ch05-checkpoints``)."""
    state = load_checkpoint(checkpoint, map_location="cpu")
    found_kind = file_kind(state)
    if found_kind != kind:
        hint = (" (to go on with the run it was exported from, pass that run's checkpoint)"
                if found_kind == "weights" else "")
        raise ValueError(f"{checkpoint} is {FILE_KINDS[found_kind]}, not "
                         f"{FILE_KINDS[kind].split(' (')[0]}: it holds no state of this kind of "
                         f"run to resume from. Pass a new checkpoint path to train afresh{hint}")
    found = differences(state)
    if found:
        raise ValueError(f"{checkpoint} (step {state['step']}) was made by a run with other "
                         "settings:\n  " + "\n  ".join(found)
                         + "\nResume with the checkpoint's settings, or pass another checkpoint "
                           "path to start a new run with these.")
    return state


# ----------------------------------------------------------------------------------------
# Weights worth keeping: finite, and a finite loss
# ----------------------------------------------------------------------------------------
def _all_finite(tensors, device) -> bool:
    """Whether every float tensor in ``tensors`` is finite, with one host read."""
    flags = [v.isfinite().all().to(device) for v in tensors if v.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def _largest_weight(model: torch.nn.Module) -> float:
    return max(p.detach().abs().max().item() for p in model.parameters())


@torch.no_grad()
def probe_loss(loss: Callable[[torch.nn.Module], Tensor], net: torch.nn.Module) -> float:
    """``loss(net)`` on a fixed batch, in eval mode (no dropout, so no random numbers drawn)
    and as a Python float: one host read. Used before a checkpoint is saved or resumed, in
    chapter 5, "Checkpoints, Google Drive and resuming" (``ch05-checkpoints``)."""
    was_training = net.training
    net.eval()
    try:
        return loss(net).item()
    finally:
        net.train(was_training)


def unusable_weights(nets: dict[str, torch.nn.Module], optimizer,
                     loss_on_probe: Callable[[torch.nn.Module], Tensor], device) -> str | None:
    """Why the state of a run is not worth a checkpoint (non-finite weights or optimiser
    state, or a non-finite ``loss_on_probe(net)``, the loss on a fixed batch, for one of
    ``nets``, by name), or None
    when it is. Reads the device: call it only where a checkpoint is saved or loaded.
    Used in chapter 5, "Checkpoints, Google Drive and resuming" (``ch05-checkpoints``)."""
    optimizer_state = [v for per_parameter in optimizer.state.values()
                       for v in per_parameter.values() if torch.is_tensor(v)]
    groups = [(f"{name}'s weights", net.state_dict().values()) for name, net in nets.items()]
    for what, tensors in groups + [("the optimiser's state", optimizer_state)]:
        if not _all_finite(list(tensors), device):
            return f"{what} hold NaN or infinite values"
    for name, net in nets.items():
        value = probe_loss(loss_on_probe, net)
        if not math.isfinite(value):
            return (f"{name}'s weights are finite (largest |w| {_largest_weight(net):.3g}) but "
                    f"give a {value} loss on a fixed batch")
    return None


# ----------------------------------------------------------------------------------------
# One run per checkpoint
# ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def hold_checkpoint(checkpoint, device: torch.device):
    """Hold the lock of ``checkpoint`` (``<checkpoint>.lock``, see
    :func:`ddpm_lib.io.acquire_lock`) for the run: rank 0 takes it, and under DDP every process
    learns whether it did. Taking it is also the up-front check that checkpoints can be
    written there. Nothing to hold when ``checkpoint`` is None.
    Used in chapter 5, "Checkpoints, Google Drive and resuming" (``ch05-checkpoints``)."""
    if checkpoint is None:
        yield
        return
    lock, error = None, None
    if distributed_info()[0] == 0:
        try:
            lock = acquire_lock(checkpoint)
        except (OSError, ValueError, CheckpointBusy) as e:
            error = e
    if not all_processes_agree(error is None, device):
        raise error or CheckpointBusy(f"process 0 could not take the lock of {checkpoint}; "
                                      "see its message")
    try:
        yield
    finally:
        if lock is not None:
            release_lock(lock)
