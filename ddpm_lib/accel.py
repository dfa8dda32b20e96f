"""What the hardware offers a training run: mixed precision, ``torch.compile``, a memory
layout, and several processes. Taught in chapter 11, "The fast path, switch by switch"
(``ch11-fast-path``, ``ch11-fp16``, ``ch11-compile``) and "Several GPUs: data parallelism"
(``ch11-ddp``); :func:`ddpm_lib.train.train` asks this module how to run.

One setting says which arithmetic a run uses, ``precision``:

* ``"fp32"``: everything in float32.
* ``"bf16"``: matrix products and convolutions in bfloat16 under autocast (GroupNorm, softmax
  and the loss stay float32). Fast on GPUs of compute capability 8 or newer (A100, L4,
  H100); CPUs compute it too.
* ``"fp16"``: the same in float16, with a loss scale (``torch.amp.GradScaler``) so that small
  gradients do not round to zero. For GPUs without bf16 (T4, V100).
* ``"auto"``: bf16 where the GPU has it, fp16 on other CUDA GPUs, fp32 on a CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
COMPILE_MODES = (None, False, True, "default", "reduce-overhead", "max-autotune",
                 "max-autotune-no-cudagraphs")
# compile=None on a CUDA GPU: "reduce-overhead" adds CUDA graphs, which remove the launch
# overhead that dominates small networks (measured in the Benchmarks appendix)
DEFAULT_COMPILE_MODE = "reduce-overhead"


def gpu_has_bf16(device: torch.device) -> bool:
    """Whether ``device`` is a CUDA GPU that computes bf16 (compute capability 8 and newer).
    Taught in chapter 11, "Mixed precision: bf16" (``ch11-fast-path``)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else a ``ValueError`` listing them.
    Used by ``TrainConfig``; the precisions are taught in chapter 11,
    "The fast path, switch by switch" (``ch11-fast-path``)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"`` made concrete for ``device``: bf16 on GPUs that have it, fp16 on the other
    CUDA GPUs, fp32 elsewhere. The other values are returned as they are.
    Taught in chapter 11, "float16 and loss scaling, for GPUs without bf16" (``ch11-fp16``)."""
    if check_precision(precision) != "auto":
        return precision
    if gpu_has_bf16(device):
        return "bf16"
    return "fp16" if device.type == "cuda" else "fp32"


@dataclass(frozen=True)
class FastPath:
    """How a run uses its device: ``precision`` (fp32, bf16 or fp16), ``channels_last``
    (NHWC memory layout), ``compile`` (a ``torch.compile`` mode, or False) and
    ``data_on_device`` (the dataset kept on the GPU, batches drawn there).
    Taught in chapter 11, "The fast path, switch by switch" (``ch11-fast-path``)."""
    precision: str
    channels_last: bool
    compile: str | bool
    data_on_device: bool

    def autocast(self, device: torch.device):
        """The autocast context of this precision; for fp32 one that turns autocast off (so
        an enclosing autocast does not reach the loss)."""
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device.type, dtype=dtype, enabled=self.precision != "fp32")

    def grad_scaler(self, device: torch.device) -> torch.amp.GradScaler:
        """fp16 loss scaling: the loss is multiplied by a large factor before backward, steps
        whose gradients overflow are skipped and the factor shrinks. For the other precisions
        the scaler is disabled and passes everything through unchanged."""
        fp16 = self.precision == "fp16"
        return torch.amp.GradScaler(device.type if fp16 else "cpu", enabled=fp16)


def fast_path(precision: str, channels_last, compile, data_on_device, device) -> FastPath:
    """The :class:`FastPath` of a run on ``device``: ``precision`` through
    :func:`resolve_precision`, and each other setting left at ``None`` on exactly when
    ``device`` is a CUDA GPU.
    Taught in chapter 11, "The fast path, switch by switch" (``ch11-fast-path``)."""
    cuda = device.type == "cuda"
    # CUDA graphs under DDP have open bug reports upstream and were never run here
    default_mode = DEFAULT_COMPILE_MODE if distributed_info()[1] == 1 else "default"
    mode = compile if compile is not None else (default_mode if cuda else False)
    return FastPath(precision=resolve_precision(precision, device),
                    channels_last=channels_last if channels_last is not None else cuda,
                    compile="default" if mode is True else (mode or False),
                    data_on_device=data_on_device if data_on_device is not None else cuda)


# ----------------------------------------------------------------------------------------
# Several processes (DistributedDataParallel)
# ----------------------------------------------------------------------------------------
def distributed_info() -> tuple[int, int]:
    """``(rank, world_size)`` of this process: ``(0, 1)`` unless torch.distributed is
    initialised. Used in chapter 11, "How `train()` shards a batch" (``ch11-ddp``)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_distributed(backend: str | None = None) -> torch.device:
    """Join the process group that ``torchrun`` describes (RANK, WORLD_SIZE, MASTER_ADDR, ...)
    and return this process's device: ``cuda:LOCAL_RANK`` with NCCL on GPUs, the CPU with
    gloo. Taught in chapter 11, "Running on GPUs" (``ch11-ddp``)."""
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


def summed_over_processes(x: torch.Tensor) -> torch.Tensor:
    """``x`` summed over all processes (a copy), or ``x`` itself with one process.
    Taught in chapter 11, "How `train()` shards a batch" (``ch11-ddp``): the logged losses."""
    if distributed_info()[1] > 1:
        x = x.clone()
        torch.distributed.all_reduce(x)
    return x


def all_processes_agree(ok: bool, device: torch.device) -> bool:
    """Under DDP, whether ``ok`` holds on every process (one all-reduce); else ``ok``. Used by
    ``train`` under DDP, chapter 11, "Several GPUs: data parallelism" (``ch11-ddp``): every
    process learns whether rank 0 took the checkpoint's lock."""
    if distributed_info()[1] == 1:
        return ok
    on = device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([int(ok)], device=on)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())
