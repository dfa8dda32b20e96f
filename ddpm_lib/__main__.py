"""Command line: train, export and sample without notebooks.

    python -m ddpm_lib train  --checkpoint runs/fashion.pt --steps 20000
    python -m ddpm_lib export runs/fashion.pt weights.pt
    python -m ddpm_lib sample --weights weights.pt --n 64 --out samples.png --npy samples.npy
    torchrun --nproc_per_node=4 -m ddpm_lib train --checkpoint runs/fashion.pt   # several GPUs

``train`` resumes from ``--checkpoint`` when it exists (made with the same settings; another
live run on the same checkpoint is refused). ``export`` keeps the EMA weights,
the model's configuration and the schedule, in a file that loads with
``torch.load(..., weights_only=True)``. ``sample`` writes a PNG grid and a ``.npy`` of
uint8 images of shape (N, H, W) (or (N, H, W, 3) for colour).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import data, features
from .io import FILE_KINDS, CheckpointBusy, file_kind
from .pretrained import load_weights, save_weights
from .samplers import SAMPLERS, sample
from .schedules import NoiseSchedule
from .accel import PRECISIONS, distributed_info, init_distributed
from .io import load_checkpoint
from .train import TrainConfig, train
from .unet import UNet, count_parameters
from .viz import save_grid

# what --out may end with: formats that viz.save_grid (matplotlib, through PIL) writes
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tiff", ".webp", ".pdf", ".svg")
DEVICE_HELP = "cpu, cuda, cuda:N or mps (default: cuda if there is one)"


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


# ----------------------------------------------------------------------------------------
# Argument types: a bad value is a usage error (exit code 2) that names the flag
# ----------------------------------------------------------------------------------------
def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value
    return parse


def _device(text: str) -> torch.device:
    """A torch device this machine has: cpu, cuda, cuda:1, mps."""
    bad = argparse.ArgumentTypeError
    try:
        device = torch.device(text)
    except RuntimeError:
        raise bad(f"{text!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise bad(f"{text}: ddpm_lib runs on cpu, cuda or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise bad(f"{text}: this machine has no CUDA GPU (torch sees none); use cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise bad(f"{text}: there are only {torch.cuda.device_count()} CUDA GPUs")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise bad(f"{text}: MPS is not available on this machine; use cpu")
    return device


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}); pass an object such as "
                                         "'{\"note\": \"first run\"}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object ({{...}}), "
                                         f"got {type(value).__name__} {text}")
    return value


def _image_path(text: str) -> str:
    """An image file name save_grid can write, or "" for none."""
    if text and Path(text).suffix.lower() not in IMAGE_SUFFIXES:
        raise argparse.ArgumentTypeError(f"{text!r} does not end in an image suffix; use one of "
                                         f"{', '.join(IMAGE_SUFFIXES)} (or '' for no image)")
    return text


def _npy_path(text: str) -> str:
    if Path(text).suffix != ".npy":       # numpy would append .npy and write another file
        raise argparse.ArgumentTypeError(f"{text!r} must end in .npy")
    return text


def _switch(text: str):
    """auto -> None (on on a GPU), on -> True, off -> False."""
    return {"auto": None, "on": True, "off": False}[text]


def cmd_train(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    info = data.dataset_info(args.data)
    images, labels = data.load(info.name, "train", limit=args.limit)
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:   # started by torchrun
        device = init_distributed()
    else:
        device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    schedule = (NoiseSchedule.cosine(args.T) if args.schedule == "cosine" else NoiseSchedule.linear(args.T))
    torch.manual_seed(args.seed)
    model = UNet(in_channels=images.shape[1], base_channels=args.base_channels,
                 channel_mults=_ints(args.channel_mults), num_res_blocks=args.num_res_blocks,
                 attention_resolutions=(info.attention_resolutions if args.attention_resolutions is None
                                        else _ints(args.attention_resolutions)), dropout=args.dropout,
                 num_classes=info.num_classes if args.conditional else None, image_size=images.shape[-1])
    main_process = distributed_info()[0] == 0
    if main_process:
        print(f"{args.data}: {len(images)} images | UNet {count_parameters(model):,} parameters | {device}")
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                         ema_decay=args.ema_decay, grad_clip=args.grad_clip, seed=args.seed,
                         checkpoint_every=args.checkpoint_every, log_every=args.log_every,
                         hflip=args.hflip, precision=args.precision,
                         channels_last=_switch(args.channels_last),
                         compile={"auto": None, "off": False}.get(args.compile, args.compile))
    start = time.time()
    result = train(model, schedule, images, config, labels=labels if args.conditional else None,
                   checkpoint=args.checkpoint, device=device, progress=not args.no_progress)
    if main_process:
        resumed = f"resumed from step {result.resumed_from}, " if result.resumed_from is not None else ""
        losses = result.history["loss"]
        last = (f"last loss {losses[-1]:.4f}" if losses
                else f"no loss logged yet (every {args.log_every} steps)")
        print(f"{resumed}trained to step {result.step} in {time.time() - start:.0f} s this run; "
              f"{last}; checkpoint {args.checkpoint}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _training_checkpoint(path) -> dict:
    """Load ``path``, a checkpoint of ``python -m ddpm_lib train``; any other file is refused
    with what it is and what to pass instead."""
    state = load_checkpoint(path, what="training checkpoint",
                            remedy="pass the checkpoint `train` wrote")
    kind = file_kind(state)
    if kind == "weights":
        raise ValueError(f"{path} is already an exported weights file: sample from it with "
                         f"`python -m ddpm_lib sample --weights {path}`")
    if kind != "checkpoint":
        raise ValueError(f"{path} is {FILE_KINDS[kind]}, not a training checkpoint; pass the file "
                         "`python -m ddpm_lib train --checkpoint` wrote")
    if state.get("model_config") is None:
        raise ValueError(f"{path} has no model configuration; it was not made by ddpm_lib.train "
                         "with a UNet")
    return state


def _check_finite_output(model: UNet, schedule: NoiseSchedule, source) -> None:
    """Refuse weights that give NaN on pure noise: what a diverged run leaves."""
    g = torch.Generator().manual_seed(0)
    size, channels = model.config["image_size"], model.config["in_channels"]
    x = torch.randn((2, channels, size, size), generator=g)
    t = torch.tensor([0, schedule.T - 1])
    y = torch.full((2,), model.num_classes) if model.num_classes else None
    with torch.no_grad():
        out = model(x, t) if y is None else model(x, t, y)
    if not torch.isfinite(out).all():
        raise ValueError(f"the EMA weights in {source} give NaN or infinite output: the run "
                         "diverged. Export an earlier checkpoint, or train again with a lower --lr")


def cmd_export(args) -> None:
    state = _training_checkpoint(args.checkpoint)
    meta = {"step": state["step"], "train_config": state["config"], "source": Path(args.checkpoint).name}
    meta.update(args.meta or {})
    ema_model = UNet(**state["model_config"])
    ema_model.load_state_dict(state["ema"]["model"])
    _check_finite_output(ema_model.eval(), NoiseSchedule(state["betas"]), args.checkpoint)
    digest = save_weights(ema_model, NoiseSchedule(state["betas"]), args.out, meta)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1e6:.1f} MB), sha256 {digest}")


def _check_output_folder(path: str, flag: str) -> None:
    """Say before sampling, not after, that an output cannot be written."""
    folder = Path(path).parent
    if not folder.is_dir():
        raise ValueError(f"{flag} {path}: the folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{flag} {path}: the folder {folder} is not writable; pick another path")


def cmd_sample(args) -> None:
    for path, flag in ((args.out, "--out"), (args.npy, "--npy")):
        if path:
            _check_output_folder(path, flag)
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, schedule, _ = load_weights(args.weights, device)
    c, s = model.config["in_channels"], model.config["image_size"]
    g = torch.Generator(device).manual_seed(args.seed)
    shape = (args.n, c, s, s)
    options = {} if args.eta is None else {"eta": args.eta}     # main() checked the sampler takes it
    with torch.no_grad():
        x = sample(model, schedule, shape, sampler=args.sampler, steps=args.steps, generator=g,
                   progress=True, **options)
    if args.out:
        save_grid(x, args.out, nrow=int(np.ceil(np.sqrt(args.n))))
        print(f"wrote {args.out}")
    if args.npy:
        u8 = features.to_uint8(x)
        u8 = u8[:, 0] if c == 1 else u8.transpose(0, 2, 3, 1)
        np.save(args.npy, u8)
        print(f"wrote {args.npy} {u8.shape} {u8.dtype}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m ddpm_lib", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a UNet with L_simple (resumes from --checkpoint)")
    t.add_argument("--data", default="fashion_mnist", choices=sorted(data.DATASETS))
    t.add_argument("--limit", type=_int_at_least(1), default=None,
                   help="use only the first N training images")
    t.add_argument("--checkpoint", required=True)
    t.add_argument("--steps", type=int, default=20000)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--warmup-steps", type=int, default=0)
    t.add_argument("--ema-decay", type=float, default=0.9999)
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--T", type=_int_at_least(1), default=1000)
    t.add_argument("--schedule", choices=["linear", "cosine"], default="linear")
    t.add_argument("--base-channels", type=int, default=64)
    t.add_argument("--channel-mults", default="1,2,2")
    t.add_argument("--num-res-blocks", type=int, default=2)
    t.add_argument("--attention-resolutions", default=None,
                   help="comma-separated resolutions with self-attention, '' for none "
                        "(default: the dataset's, 7 for 28x28 images, 16 for CIFAR-10)")
    t.add_argument("--dropout", type=float, default=0.1)
    t.add_argument("--conditional", action="store_true", help="class-conditional (labels, null class)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--checkpoint-every", type=int, default=500)
    t.add_argument("--log-every", type=int, default=50)
    t.add_argument("--device", type=_device, default=None, help=DEVICE_HELP)
    t.add_argument("--threads", type=_int_at_least(0), default=0,
                   help="torch CPU threads (0: torch's default)")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--hflip", action="store_true", help="random horizontal flips (CIFAR-10; not for digits)")
    t.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="arithmetic of the training step (auto: bf16 on GPUs of compute "
                        "capability 8 and newer, fp16 with loss scaling on older ones such as "
                        "the T4, fp32 on a CPU)")
    t.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto")
    t.add_argument("--compile", choices=["auto", "off", "default", "reduce-overhead", "max-autotune",
                                         "max-autotune-no-cudagraphs"], default="auto",
                   help="torch.compile mode (auto: reduce-overhead on a GPU, off on a CPU)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("export", help="keep the EMA weights of a checkpoint for sampling")
    e.add_argument("checkpoint")
    e.add_argument("out")
    e.add_argument("--meta", type=_json_object, default=None,
                   help="JSON object of extra metadata to store")
    e.set_defaults(func=cmd_export)

    s = sub.add_parser("sample", help="sample images: a PNG grid and/or a .npy of uint8")
    s.add_argument("--weights", required=True)
    s.add_argument("--n", type=_int_at_least(1), default=64)
    s.add_argument("--sampler", choices=sorted(SAMPLERS), default="ddpm")
    s.add_argument("--steps", type=_int_at_least(1), default=None,
                   help="network calls (default: " + ", ".join(
                       f"{name} {entry.steps or 'all T'}" for name, entry in sorted(SAMPLERS.items())) + ")")
    s.add_argument("--eta", type=float, default=None,
                   help="noise of the samplers that take it (" + ", ".join(
                       f"{name} default {entry.options['eta']}" for name, entry in sorted(SAMPLERS.items())
                       if "eta" in entry.options) + ")")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", type=_image_path, default="samples.png",
                   help=f"image grid ({', '.join(IMAGE_SUFFIXES)}; '' for none)")
    s.add_argument("--npy", type=_npy_path, default=None, help="uint8 images as a .npy file")
    s.add_argument("--device", type=_device, default=None, help=DEVICE_HELP)
    s.set_defaults(func=cmd_sample)

    args = p.parse_args(argv)
    if args.command == "sample":       # a flag the sampler does not take is a usage error
        takes = {"--steps": lambda e: e.steps is not None, "--eta": lambda e: "eta" in e.options}
        given = [flag for flag, value in (("--steps", args.steps), ("--eta", args.eta))
                 if value is not None and not takes[flag](SAMPLERS[args.sampler])]
        if given:
            others = sorted(n for n, e in SAMPLERS.items() if all(takes[f](e) for f in given))
            why = " (it always takes all T steps)" if "--steps" in given else ""
            s.error(f"the {args.sampler} sampler takes no {' or '.join(given)}{why}: add --sampler "
                    f"{' or '.join(others)}, or leave {'it' if len(given) == 1 else 'them'} out")
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as err:      # bad input: what was wrong, what to do
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except (FloatingPointError, CheckpointBusy, OSError) as err:    # the run could not go on
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
